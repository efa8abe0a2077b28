"""The one shape every reward has: ``fn(completion, **sample_fields) -> Reward(score, reason)``.

The reason travels with the score so a rollout's reward can be explained in logs and tests
(why did this code answer get 0.4?) without re-running the check.
"""

from __future__ import annotations

import re
from typing import NamedTuple

BEGIN = "[BEGIN FINAL RESPONSE]"
END = "[END FINAL RESPONSE]"
END_OF_TURN = "<|end|>"
# What may follow the final response: nothing (special tokens skipped when decoding), the end-of-turn
# token, or, in the released Apriel-1.5 format whose turns end with "<|end|>\n" + eos, both.
_TURN_END = re.compile(r"(<\|end\|>)?\s*(</s>)?")


def is_turn_end(tail: str) -> bool:
    return _TURN_END.fullmatch(tail.strip()) is not None


class Reward(NamedTuple):
    score: float
    reason: str


def completion_text(completion) -> str:
    """TRL passes a string for plain prompts and a list of messages for conversational ones."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list):
        return "".join(m.get("content", "") if isinstance(m, dict) else str(m) for m in completion)
    if isinstance(completion, dict):
        return str(completion.get("content", ""))
    return str(completion)


def final_response(text: str) -> str | None:
    """The text between the last BEGIN/END markers, or None when the markers are missing."""
    start = text.rfind(BEGIN)
    if start < 0:
        return None
    end = text.find(END, start)
    if end < 0:
        return None
    return text[start + len(BEGIN):end].strip()


def answer_region(text: str) -> str:
    """Where to look for an answer: the final response when present, else the whole text."""
    resp = final_response(text)
    return resp if resp is not None else text


_FENCE = re.compile(r"```([a-zA-Z0-9_+-]*)[ \t]*\n(.*?)```", re.S)


def code_blocks(text: str) -> list[tuple[str, str]]:
    return [(m.group(1).lower(), m.group(2)) for m in _FENCE.finditer(text)]
