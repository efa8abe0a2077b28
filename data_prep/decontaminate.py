"""Drop training samples that share a long n-gram with an evaluation set, and report what was dropped.

    python data_prep/decontaminate.py --input sft.jsonl --eval gsm8k.jsonl math500.jsonl \\
        --output sft.clean.jsonl --report decontam.json [--n 13]

Text is normalised (Unicode NFKC, lower case, punctuation removed, split on whitespace) and a
training record is dropped when any of its word n-grams (default 13, as in the GPT-3 and Llama
reports) occurs in any evaluation record. Training text is every string of ``messages[*].content``
(and ``reasoning``) or the ``text``/``prompt``/``question``/``problem``/``answer``/``solution``
fields; evaluation text is the same fields. Evaluation records shorter than ``n`` words cannot be
matched this way and are counted in the report. The report gives per evaluation set (named by file
stem) the number of training records it contaminated and their ids (``id`` field, else
``<file>:<line>``). Written by hand: the n-gram rule is a few lines and the HF ``datasets``
pipelines for it pull in heavy extra dependencies.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
import unicodedata
from typing import Iterable, Optional

FIELDS = ("text", "prompt", "question", "problem", "answer", "solution", "input", "output")
_PUNCT = re.compile(r"[^\w\s]", re.UNICODE)


def normalize(text: str) -> list[str]:
    text = unicodedata.normalize("NFKC", text).lower()
    return _PUNCT.sub(" ", text).split()


def record_texts(record: dict) -> Iterable[str]:
    messages = record.get("messages")
    if isinstance(messages, list):
        for m in messages:
            if isinstance(m, dict):
                for key in ("content", "reasoning", "reasoning_content"):
                    if isinstance(m.get(key), str):
                        yield m[key]
    for key in FIELDS:
        if isinstance(record.get(key), str):
            yield record[key]


def ngrams(words: list[str], n: int) -> Iterable[int]:
    # Hashes keep the eval index small; a 64-bit collision costs at most one wrongly dropped sample.
    for i in range(len(words) - n + 1):
        yield hash(" ".join(words[i : i + n]))


def read_jsonl(path: str):
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise SystemExit(f"decontaminate: {path}:{lineno}: invalid JSON ({e.msg})") from None
            if not isinstance(record, dict):
                raise SystemExit(f"decontaminate: {path}:{lineno}: record is not a JSON object")
            yield lineno, line, record


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--input", nargs="+", required=True, help="training JSONL files")
    p.add_argument("--eval", nargs="+", required=True, help="evaluation JSONL files")
    p.add_argument("--output", required=True, help="kept training records (JSONL)")
    p.add_argument("--report", required=True, help="JSON report of what was dropped")
    p.add_argument("--n", type=int, default=13, help="n-gram length in normalised words")
    args = p.parse_args(argv)
    for path in [*args.input, *args.eval]:
        if not os.path.exists(path):
            print(f"decontaminate: {path}: no such file", file=sys.stderr)
            return 2

    start = time.time()
    index: dict[int, set[str]] = {}
    per_eval: dict[str, dict] = {}
    for path in args.eval:
        name = os.path.basename(path).split(".")[0]
        stats = per_eval.setdefault(name, {"eval_records": 0, "eval_records_shorter_than_n": 0, "dropped": 0,
                                           "ids": []})
        for _, _, record in read_jsonl(path):
            stats["eval_records"] += 1
            words = normalize(" ".join(record_texts(record)))
            if len(words) < args.n:
                stats["eval_records_shorter_than_n"] += 1
                continue
            for h in ngrams(words, args.n):
                index.setdefault(h, set()).add(name)
    print(f"decontaminate: {len(index)} {args.n}-grams from {len(per_eval)} evaluation sets", file=sys.stderr)

    kept = dropped = 0
    from megatron_apriel.config import atomic_path, atomic_write_text

    with atomic_path(os.path.abspath(args.output)) as tmp, open(tmp, "w", encoding="utf-8") as out:
        for path in args.input:
            for lineno, line, record in read_jsonl(path):
                words = normalize(" ".join(record_texts(record)))
                hits: set[str] = set()
                for h in ngrams(words, args.n):
                    if h in index:
                        hits |= index[h]
                if hits:
                    dropped += 1
                    rid = record.get("id", f"{os.path.basename(path)}:{lineno}")
                    for name in sorted(hits):
                        per_eval[name]["dropped"] += 1
                        per_eval[name]["ids"].append(rid)
                else:
                    kept += 1
                    out.write(line if line.endswith("\n") else line + "\n")
                if (kept + dropped) % 100000 == 0:
                    rate = (kept + dropped) / max(time.time() - start, 1e-9)
                    print(f"decontaminate: {kept + dropped} records, {rate:.0f}/s", file=sys.stderr)
    report = {"n": args.n, "kept": kept, "dropped": dropped, "per_eval_set": per_eval,
              "inputs": args.input, "evals": args.eval, "output": args.output}
    atomic_write_text(args.report, json.dumps(report, indent=2) + "\n")
    summary = ", ".join(f"{k}: {v['dropped']}" for k, v in per_eval.items())
    print(f"decontaminate: kept {kept}, dropped {dropped} ({summary}) -> {args.output}; report {args.report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
