"""Instruction-following reward (IFEval style): verifiable checks on the final response, with
partial credit (the fraction of checks satisfied).

Each check is ``{"type": NAME, ...}``; unknown types are an error, not a silent pass.
"""

from __future__ import annotations

import json
import re

from .base import Reward, answer_region, completion_text


def _words(t):
    return re.findall(r"\b\w+\b", t)


CHECKS = {
    "min_words": lambda t, c: len(_words(t)) >= c["value"],
    "max_words": lambda t, c: len(_words(t)) <= c["value"],
    "max_chars": lambda t, c: len(t) <= c["value"],
    "include_keywords": lambda t, c: all(k.lower() in t.lower() for k in c["keywords"]),
    "exclude_keywords": lambda t, c: not any(k.lower() in t.lower() for k in c["keywords"]),
    "keyword_frequency": lambda t, c: t.lower().count(c["keyword"].lower()) >= c["value"],
    "starts_with": lambda t, c: t.startswith(c["value"]),
    "ends_with": lambda t, c: t.rstrip().endswith(c["value"]),
    "lowercase": lambda t, c: t == t.lower() and any(ch.isalpha() for ch in t),
    "uppercase": lambda t, c: t == t.upper() and any(ch.isalpha() for ch in t),
    "bullet_count": lambda t, c: len(re.findall(r"^\s*[-*] ", t, re.M)) == c["value"],
    "paragraph_count": lambda t, c: len([p for p in re.split(r"\n\s*\n", t.strip()) if p.strip()]) == c["value"],
    "json_format": lambda t, c: _is_json(t),
    "regex": lambda t, c: re.search(c["pattern"], t) is not None,
}


def _is_json(t: str) -> bool:
    t = re.sub(r"^```(?:json)?\s*|\s*```$", "", t.strip())
    try:
        json.loads(t)
        return True
    except (json.JSONDecodeError, RecursionError):
        return False


def instruction_reward(completion, checks=None, **_) -> Reward:
    if not checks:
        return Reward(0.0, "sample has no checks")
    text = answer_region(completion_text(completion))
    failed = []
    for check in checks:
        kind = check.get("type")
        if kind not in CHECKS:
            raise ValueError(f"unknown instruction check type {kind!r} (known: {', '.join(CHECKS)})")
        try:
            ok = bool(CHECKS[kind](text, check))
        except KeyError as e:
            raise ValueError(f"instruction check {kind!r} needs the key {e.args[0]!r}") from None
        if not ok:
            failed.append(kind)
    score = 1 - len(failed) / len(checks)
    return Reward(score, f"{len(checks) - len(failed)}/{len(checks)} checks" + (f"; failed {failed}" if failed else ""))
