"""Held-out answer accuracy and format-reward rate of an HF checkpoint, by ``apriel eval``'s engine.

The demo's test set is a ``math`` task file (``{"question", "answer"}`` per line); it is scored by
lm-evaluation-harness with the project's math kind, greedy, with the Apriel chat template. An
answer counts as correct only inside the final-response block (``[BEGIN FINAL RESPONSE]...``),
as in the GRPO reward, and the format rate is the format reward's full-marks rate. Each call also
writes the full results JSON (per-sample records) when ``results`` is given.
"""

from __future__ import annotations

import json
from pathlib import Path


def load_test(path: Path, n: int | None = None) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return rows[:n] if n else rows


def evaluate(hf_dir: Path, test_file: Path, n: int | None = None, max_new_tokens: int = 72, batch_size: int = 32,
             results: Path | None = None) -> dict:
    from transformers.utils import logging as hf_logging

    from megatron_apriel.eval.run import Settings, run

    hf_logging.disable_progress_bar()  # one weight-loading bar per evaluated checkpoint is noise here
    settings = Settings(max_gen_toks=max_new_tokens, batch_size=batch_size, chat_template="apriel", limit=n)
    out = results or Path(hf_dir) / "eval.json"
    r = run([str(hf_dir)], [f"math={test_file}"], str(out), settings, log=lambda *_: None)
    task = Path(test_file).stem
    scores, rows = r["results"][str(hf_dir)][task], r["samples"][str(hf_dir)][task]
    tests = load_test(test_file)  # the demo's file has no blank lines: record i is on line i + 1
    samples = [{"question": tests[s["line"] - 1]["question"], "answer": tests[s["line"] - 1]["answer"],
                "completion": s["completions"][0], "correct": s["correct"][0]} for s in rows[:3]]
    return {"accuracy": scores["pass@1"], "format_rate": scores["format"], "n": scores["records"], "samples": samples,
            "outcomes": scores["outcomes"]}
