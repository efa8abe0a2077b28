"""Held-out answer accuracy (overall and per task family) and format-reward rate of an HF
checkpoint, by ``apriel eval``'s engine.

The demo's test set is one ``math`` task file per family (``test_add.jsonl``, ...;
``{"question", "answer"}`` per line), scored in one call by lm-evaluation-harness with the
project's math kind, greedy, with the Apriel chat template. An answer counts as correct only inside
the final-response block (``[BEGIN FINAL RESPONSE]...``), as in the GRPO reward, and the format
rate is the format reward's full-marks rate. Each call also writes the full results JSON
(per-sample records) when ``results`` is given.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from transformers.utils import logging as hf_logging

from megatron_apriel.eval.run import Settings, run


def load_test(path: Path, n: int | None = None) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return rows[:n] if n else rows


def evaluate(hf_dir: Path, test_files: dict[str, Path], max_new_tokens: int = 72, batch_size: int = 64,
             results: Path | None = None, temperature: float = 0.0, samples: int = 1) -> dict:
    """``test_files``: family -> task file. Overall figures are over all records of all files.
    ``temperature`` 0 is greedy; above it, ``samples`` sampled answers per problem (seeded), and a
    problem scores the share of its answers that are right (its interval over problems, not answers:
    answers to one problem are not independent)."""

    hf_logging.disable_progress_bar()  # one weight-loading bar per evaluated checkpoint is noise here
    settings = Settings(max_gen_toks=max_new_tokens, batch_size=batch_size, chat_template="apriel",
                        temperature=temperature, samples=samples)
    out = results or Path(hf_dir) / "eval.json"
    r = run([str(hf_dir)], [f"math={p}" for p in test_files.values()], str(out), settings, log=lambda *_: None)
    scores, rows = r["results"][str(hf_dir)], r["samples"][str(hf_dir)]
    fam, fam_se, n, correct, formatted, shown, per_problem = {}, {}, 0, 0.0, 0.0, [], []
    for family, path in test_files.items():
        s = scores[Path(path).stem]
        fam[family], fam_se[family] = s["pass@1"], s.get("pass@1_stderr", 0.0)
        n += s["records"]
        correct += s["pass@1"] * s["records"]
        formatted += s["format"] * s["records"]
        tests = load_test(path)  # the demo's files have no blank lines: record i is on line i + 1
        shown += [{"question": tests[x["line"] - 1]["question"], "answer": tests[x["line"] - 1]["answer"],
                   "completion": x["completions"][0], "correct": x["correct"][0]} for x in rows[Path(path).stem][:1]]
        per_problem += [_share_right(x) for x in rows[Path(path).stem]]
    acc = correct / n
    # over problems: with one answer each this is sqrt(acc (1 - acc) / (n - 1))
    spread = sum((x - acc) ** 2 for x in per_problem) / max(1, len(per_problem) - 1)
    return {"accuracy": acc, "accuracy_stderr": math.sqrt(spread / max(1, len(per_problem))),
            "format_rate": formatted / n, "n": n, "families": fam, "families_stderr": fam_se, "samples": shown}


def _share_right(record: dict) -> float:
    return sum(map(float, record["correct"])) / len(record["correct"])


def paired_difference(before: Path, after: Path) -> dict:
    """Accuracy of ``after`` minus ``before`` on the same problems (two ``apriel eval`` results
    JSONs of the same task files), with its 95% normal interval over the per-problem differences:
    pairing removes the spread of problem difficulty that two separate intervals both carry."""
    def flags(path: Path) -> dict:
        rows = next(iter(json.loads(Path(path).read_text())["samples"].values()))
        return {(task, x["line"]): _share_right(x) for task, recs in rows.items() for x in recs}

    a, b = flags(before), flags(after)
    d = [b[k] - a[k] for k in a]
    n = len(d)
    mean = sum(d) / n
    se = math.sqrt(sum((x - mean) ** 2 for x in d) / max(1, n - 1) / n)
    return {"mean": mean, "low": mean - 1.96 * se, "high": mean + 1.96 * se, "n": n}

