"""The project's task kinds for lm-evaluation-harness, each reading a local JSONL file.

lm-evaluation-harness runs the model (batching, chat template, repeats, stderr); this module only
says what a document looks like and what counts as right. Generated answers are scored by the GRPO
reward parsers of :mod:`megatron_apriel.rl.rewards`, so "right" means here what it means to the RL
reward: math equivalence, the code sandbox, the instruction checks, tool calls against their schema.

Every generated completion gets one outcome:

- ``right``      the extracted answer is correct;
- ``wrong``      an answer was extracted and it is not correct;
- ``malformed``  the completion has no ``[BEGIN FINAL RESPONSE]...[END FINAL RESPONSE]`` block
                 (only with ``require_final_response``, the default for the Apriel reasoning format);
- ``no_answer``  the final response holds nothing the kind can read (no number, no letter, no code
                 block, no parsable tool call).

Only ``right`` scores 1. Records of a task file that cannot be read are counted and reported with
their line number, never silently dropped.

Any record may carry ``"images": ["a.png", ...]`` (paths relative to the task file, or absolute):
its prompt then holds one ``<image>`` per image where the image goes, or none and the images come
first (the LLaVA convention of ``apriel preprocess-multimodal``). Images are read by the loader
preprocessing uses (:func:`megatron_apriel.data.images.load_image`), so a missing, unreadable,
truncated or oversized image skips its record under the same counted reason, named with its line.
Such tasks need a Llava/Pixtral checkpoint (:mod:`megatron_apriel.eval.images`).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import re
import string
from pathlib import Path
from typing import Any, Callable

from megatron_apriel.config import load_yaml
from megatron_apriel.data.images import ImageError, load_image
from megatron_apriel.data.multimodal_format import PLACEHOLDER
from megatron_apriel.errors import InputError
from megatron_apriel.jsonl import iter_jsonl
from megatron_apriel.rl.rewards import (
    Reward,
    code_reward,
    final_response,
    format_reward,
    instruction_reward,
    math_reward,
    tool_call_reward,
)
from megatron_apriel.rl.rewards.base import answer_region
from megatron_apriel.rl.rewards.code import extract_program
from megatron_apriel.rl.rewards.instructions import CHECKS
from megatron_apriel.rl.rewards.math import answers_equal, extract_answer
from megatron_apriel.rl.rewards.tool_calls import parse_tool_calls

LETTERS = string.ascii_uppercase


class TaskFileError(InputError):
    """A task file or task spec that cannot be used at all (missing, empty, bad key)."""


# ------------------------------------------------------------------------------ records per kind
def _need(rec: dict, key: str, kind: type | tuple) -> Any:
    if key not in rec:
        raise ValueError(f"missing key {key!r}")
    if not isinstance(rec[key], kind):
        raise ValueError(f"{key!r} is {type(rec[key]).__name__}, expected "
                         f"{'/'.join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))}")
    return rec[key]


def _check_math(rec):
    _need(rec, "question", str)
    if str(_need(rec, "answer", (str, int, float))).strip() == "":
        raise ValueError("'answer' is empty")


def _check_choice(rec):
    _need(rec, "question", str)
    choices = _need(rec, "choices", list)
    if not 2 <= len(choices) <= len(LETTERS) or not all(isinstance(c, str) for c in choices):
        raise ValueError("'choices' must be a list of 2 to 26 strings")
    answer_index(rec)


def _check_code(rec):
    _need(rec, "question", str)
    tests = _need(rec, "tests", list)
    if not tests or not all(isinstance(t, dict) and ("assert" in t or "output" in t) for t in tests):
        raise ValueError("'tests' must be a non-empty list of {input, output} or {assert} objects")


def _check_instructions(rec):
    _need(rec, "question", str)
    checks = _need(rec, "checks", list)
    if not checks:
        raise ValueError("'checks' is empty")
    for c in checks:
        if not isinstance(c, dict) or c.get("type") not in CHECKS:
            raise ValueError(f"unknown check {c!r} (known types: {', '.join(CHECKS)})")


def _check_tools(rec):
    _need(rec, "question", str)
    tools = _need(rec, "tools", list)
    if not tools or not all(isinstance(t, dict) and isinstance(t.get("function", t).get("name"), str)
                            for t in tools):
        raise ValueError("'tools' must be a non-empty list of function objects with a name")
    _need(rec, "expected_call", (dict, list))


def answer_index(rec: dict) -> int:
    """The gold choice as an index: records give a letter ("B") or a 0-based index."""
    a, n = rec.get("answer"), len(rec["choices"])
    if isinstance(a, bool) or not isinstance(a, (int, str)):
        raise ValueError("'answer' must be a letter or a 0-based index")
    i = LETTERS.index(a.strip().upper()) if isinstance(a, str) and len(a.strip()) == 1 and \
        a.strip().upper() in LETTERS else a if isinstance(a, int) else -1
    if not 0 <= i < n:
        raise ValueError(f"'answer' {a!r} is not one of the {n} choices")
    return i


# ------------------------------------------------------------------------------ prompts per kind
def choice_prompt(rec: dict) -> str:
    lines = [rec["question"].strip(), ""] + [f"{LETTERS[i]}. {c}" for i, c in enumerate(rec["choices"])]
    return "\n".join(lines)


def tools_prompt(rec: dict) -> str:
    return (f"{rec['question'].strip()}\n\nAvailable tools (JSON schema):\n{json.dumps(rec['tools'], indent=1)}\n"
            "Answer with the call as <tool_calls>[{\"name\": ..., \"arguments\": {...}}]</tool_calls>.")


# ------------------------------------------------------------------------------ scoring per kind
@dataclasses.dataclass
class Scored:
    outcome: str          # right | wrong | malformed | no_answer
    extracted: Any        # what was read from the completion (None when nothing)
    score: float = 0.0    # partial credit where the kind has one (tests passed, checks met)
    reason: str = ""

    @property
    def correct(self) -> bool:
        return self.outcome == "right"


def _scorer(extract: Callable[[str, dict], Any], reward: Callable[[str, dict], Reward], missing: str):
    """A kind's scoring: malformed without the final-response block (when strict), no_answer when
    ``extract`` reads nothing, else right only when the kind's reward gives full marks."""

    def score(completion: str, rec: dict, strict: bool = True) -> Scored:
        if strict and final_response(completion) is None:
            return Scored("malformed", None, reason="no final response block")
        got = extract(completion, rec)  # the reward parsers read the final response when it is there
        if got is None:
            return Scored("no_answer", None, reason=missing)
        r = reward(completion, rec)
        return Scored("right" if r.score == 1.0 else "wrong", got, r.score, r.reason)

    return score


# Letters are upper case only: "the answer is a prime" must not read as choice A.
_LETTER_PATTERNS = [re.compile(p, re.M) for p in (
    r"\\boxed\{\s*\(?([A-Z])\)?\s*\}", r"(?i:answer)\s*(?:is|:)\s*\(?([A-Z])\b\)?", r"^\s*\(?([A-Z])[).:]?\s*$")]


def extract_letter(completion: str, n_choices: int) -> str | None:
    """The chosen letter: ``\\boxed{B}``, ``answer: B``, ``(B)`` or a response that is just ``B``."""
    text = answer_region(completion)
    valid = LETTERS[:n_choices]
    for pat in _LETTER_PATTERNS:
        found = [m for m in pat.findall(text) if m in valid]
        if found:
            return found[-1]
    return None


def choice_reward(completion: str, rec: dict) -> Reward:
    letter, gold = extract_letter(completion, len(rec["choices"])), LETTERS[answer_index(rec)]
    return Reward(float(letter == gold), f"chose {letter}, gold {gold}")


score_math = _scorer(lambda c, r: extract_answer(c), lambda c, r: math_reward(c, answer=str(r["answer"])),
                     "no answer in the final response")
score_choice = _scorer(lambda c, r: extract_letter(c, len(r["choices"])), choice_reward,
                       "no choice letter in the final response")
score_code = _scorer(lambda c, r: extract_program(c), lambda c, r: code_reward(c, tests=r["tests"]),
                     "no python code block")
score_instructions = _scorer(lambda c, r: answer_region(c).strip() or None,
                             lambda c, r: instruction_reward(c, checks=r["checks"]), "empty response")
score_tools = _scorer(lambda c, r: parse_tool_calls(c) or None,
                      lambda c, r: tool_call_reward(c, tools=r["tools"], expected_call=r["expected_call"]),
                      "no parsable tool call")


@dataclasses.dataclass(frozen=True)
class Kind:
    check: Callable[[dict], None]
    prompt: Callable[[dict], str] | None   # None: log-likelihood over the choices
    score: Callable[..., Scored] | None
    doc: str


KINDS: dict[str, Kind] = {
    "math": Kind(_check_math, lambda r: r["question"], score_math,
                 '{"question": str, "answer": str}; pass@1 over the samples, maj@n, format rate'),
    "choice": Kind(_check_choice, choice_prompt, score_choice,
                   '{"question": str, "choices": [str, ...], "answer": "B" or 1}; the model answers a letter'),
    "choice_ll": Kind(_check_choice, None, None,
                      'same records as choice; scored by log-likelihood of each choice (acc, acc_norm)'),
    "code": Kind(_check_code, lambda r: r["question"], score_code,
                 '{"question": str, "tests": [{"input": str, "output": str} | {"assert": str}]}; run in the sandbox'),
    "instructions": Kind(_check_instructions, lambda r: r["question"], score_instructions,
                         '{"question": str, "checks": [{"type": ..., ...}]}; strict (all checks) and loose'),
    "tools": Kind(_check_tools, tools_prompt, score_tools,
                  '{"question": str, "tools": [schema, ...], "expected_call": {"name", "arguments"}}'),
}


# ------------------------------------------------------------------------------ images
def user_text(rec: dict, kind: str) -> str:
    """The user turn of a record as lm-eval is given it, ``<image>`` placeholders included."""
    text = choice_prompt(rec) + "\nAnswer:" if KINDS[kind].prompt is None else KINDS[kind].prompt(rec)
    n = len(rec.get("images", []))
    return PLACEHOLDER * n + text if n and PLACEHOLDER not in text else text


def load_record_images(rec: dict, kind: str, base: Path) -> list:
    """The record's images as RGB PIL images; ValueError names the first that cannot be used."""
    paths = rec["images"]
    if not isinstance(paths, list) or not all(isinstance(p, str) and p for p in paths):
        raise ValueError("'images' must be a list of file paths")
    found = user_text(rec, kind).count(PLACEHOLDER)
    if found != len(paths):
        raise ValueError(f"placeholder_mismatch: {found} {PLACEHOLDER} for {len(paths)} images")
    images = []
    for p in paths:
        full = Path(p) if Path(p).is_absolute() else base / p
        try:
            images.append(load_image(str(full)).image)
        except ImageError as e:
            raise ValueError(f"{e.reason}: {p} ({e})") from None
    return images


# ------------------------------------------------------------------------------ reading task files
def read_records(path: str | Path, kind: str) -> tuple[list[dict], list[dict]]:
    """Valid records (each with its ``_line``, and ``_images`` when it has images) and the skipped ones
    as ``{"line", "reason"}``.

    A missing file, or a file with no valid record at all, is a :class:`TaskFileError`.
    """
    path = Path(path)
    if not path.is_file():
        raise TaskFileError(f"{path}: task file not found")
    check = KINDS[kind].check
    records, skipped = [], []

    def skip(lineno: int, e: ValueError) -> None:
        skipped.append({"line": lineno, "reason": str(e).split("\n")[0][:200]})

    for lineno, rec in iter_jsonl(path, on_bad=skip):
        try:
            check(rec)
            images = load_record_images(rec, kind, path.parent) if "images" in rec else None
        except ValueError as e:
            skip(lineno, e)
            continue
        records.append({**rec, "_line": lineno, **({"_images": images} if images is not None else {})})
    if any("_images" in r for r in records):  # a task with images: lm-eval reads every <image> as one
        kept = []
        for r in records:
            if "_images" not in r and PLACEHOLDER in user_text(r, kind):
                skip(r["_line"], ValueError(f"placeholder_mismatch: {PLACEHOLDER} in a record without images"))
            else:
                kept.append(r)
        records = kept
        skipped.sort(key=lambda s: s["line"])
    if not records:
        why = f"; first problem: line {skipped[0]['line']}: {skipped[0]['reason']}" if skipped else ""
        raise TaskFileError(f"{path}: no valid {kind} record ({len(skipped)} skipped){why}")
    return records, skipped


# ------------------------------------------------------------------------------ task specs
@dataclasses.dataclass
class TaskSpec:
    """One evaluation task: a kind, a local JSONL file and its settings.

    Written on the command line as ``KIND=PATH`` or as a YAML file with these keys.
    """

    task: str
    kind: str
    path: str
    samples: int = 1                    # n completions per prompt (pass@1 averaged, maj@n)
    require_final_response: bool = True
    system_prompt: str | None = None
    limit: int | None = None

    def validate(self, where: str):
        if self.kind not in KINDS:
            raise TaskFileError(f"{where}: unknown kind {self.kind!r} (known: {', '.join(KINDS)})")
        if self.samples < 1:
            raise TaskFileError(f"{where}: samples must be >= 1, got {self.samples}")
        if self.kind == "choice_ll" and self.samples != 1:
            raise TaskFileError(f"{where}: choice_ll is scored by log-likelihood; samples must be 1")


def parse_task_arg(arg: str, samples: int = 1, require_final_response: bool = True) -> TaskSpec | str:
    """``KIND=PATH``, a YAML with ``kind:`` (a TaskSpec), or else an lm-eval task name/YAML (returned as is)."""
    if "=" in arg:
        kind, path = arg.split("=", 1)
        spec = TaskSpec(task=Path(path).stem, kind=kind, path=path, samples=samples,
                        require_final_response=require_final_response)
        spec.validate(arg)
        return spec
    if arg.endswith((".yaml", ".yml")):
        if not Path(arg).is_file():
            raise TaskFileError(f"{arg}: task YAML not found")
        data = load_yaml(arg) or {}
        if "kind" not in data:
            return arg  # an lm-evaluation-harness task YAML
        fields = {f.name for f in dataclasses.fields(TaskSpec)}
        unknown = set(data) - fields
        if unknown:
            raise TaskFileError(f"{arg}: unknown key {sorted(unknown)[0]!r} (allowed: {', '.join(sorted(fields))})")
        data.setdefault("task", Path(arg).stem)
        data.setdefault("samples", samples)
        data.setdefault("require_final_response", require_final_response)
        path = Path(str(data.get("path", "")))
        if not data.get("path"):
            raise TaskFileError(f"{arg}: 'path' (the task's JSONL file) is required")
        data["path"] = str(path if path.is_absolute() else Path(arg).parent / path)
        spec = TaskSpec(**data)
        spec.validate(arg)
        return spec
    return arg


class BuiltTask:
    """A TaskSpec made into an lm-eval ConfigurableTask; keeps the per-sample details it scored.

    ``image_token``: the image token string of the checkpoint (``[IMG]``) when it takes images; a
    record whose text spells it would read as an image there, so it is skipped and counted.
    """

    def __init__(self, spec: TaskSpec, gen_kwargs: dict, image_token: str | None = None):
        # lm-evaluation-harness and datasets are optional (extra "eval"): reading task files needs neither
        from datasets import Dataset, DatasetDict
        from lm_eval.api.task import ConfigurableTask

        self.spec = spec
        self.kind = KINDS[spec.kind]
        records, self.skipped = read_records(spec.path, spec.kind)
        if image_token:
            spelled = [r for r in records if image_token in user_text(r, spec.kind)
                       or any(image_token in c for c in r.get("choices", []))]
            self.skipped = sorted(self.skipped + [{"line": r["_line"], "reason": f"image_token_in_text: the text "
                                                   f"spells the image token {image_token}"} for r in spelled],
                                  key=lambda s: s["line"])
            records = [r for r in records if r not in spelled]
        if spec.limit:
            records = records[:spec.limit]
        self.n_records = len(records)
        self.details: dict[int, dict] = {}
        self.images = {r["_line"]: r.pop("_images") for r in records if "_images" in r}
        # Arrow needs one schema: nested fields travel as JSON strings and are decoded per document.
        rows = [{"_line": r["_line"], "_json": json.dumps(r)} for r in records]
        dataset = DatasetDict({"test": Dataset.from_list(rows)})
        config: dict[str, Any] = {
            "task": spec.task,
            "custom_dataset": lambda **_: dataset,
            "test_split": "test",
            "num_fewshot": 0,
            "metadata": {"version": 1},
        }
        if any(self.images.values()):  # lm-eval's multimodal requests: each document's images ride along
            config["doc_to_image"] = lambda d: self.images.get(d["_line"], [])
        if self.kind.prompt is None:
            config.update(output_type="multiple_choice",
                          doc_to_text=lambda d: user_text(_rec(d), spec.kind),
                          doc_to_choice=lambda d: _rec(d)["choices"],
                          doc_to_target=lambda d: answer_index(_rec(d)),
                          metric_list=[{"metric": m, "aggregation": "mean", "higher_is_better": True}
                                       for m in ("acc", "acc_norm")])
        else:
            n = spec.samples
            metrics = ["pass@1", f"maj@{n}", "format"] if spec.kind == "math" else ["pass@1", "score", "format"]
            config.update(output_type="generate_until", doc_to_text=lambda d: user_text(_rec(d), spec.kind),
                          doc_to_target=lambda d: "", repeats=n, generation_kwargs=dict(gen_kwargs),
                          filter_list=[{"name": "all", "filter": [{"function": "take_first_k", "k": n}]}],
                          process_results=self.process_results,
                          metric_list=[{"metric": m, "aggregation": "mean", "higher_is_better": True}
                                       for m in metrics])
        self.task = ConfigurableTask(config=config)

    def process_results(self, doc: dict, results: list) -> dict:
        rec = _rec(doc)
        completions = list(results[0])
        scored = [self.kind.score(c, rec, self.spec.require_final_response) for c in completions]
        n = len(scored)
        out = {"pass@1": sum(s.correct for s in scored) / n,
               "format": sum(format_reward(c).score == 1.0 for c in completions) / n}
        if self.spec.kind == "math":
            out[f"maj@{n}"] = float(majority_correct(scored, rec))
        else:
            out["score"] = sum(s.score for s in scored) / n
        self.details[rec["_line"]] = {
            "line": rec["_line"],
            "completions": completions,
            "extracted": [_jsonable(s.extracted) for s in scored],
            "outcome": [s.outcome for s in scored],
            "correct": [s.correct for s in scored],
            "reason": [s.reason for s in scored],
        }
        return out


def majority_correct(scored: list[Scored], rec: dict) -> bool:
    """maj@n: the most common extracted answer (ties: the first seen) is right.

    Answers are grouped by math equivalence, not by string, so ``1/2`` and ``0.5`` vote together.
    """
    groups: list[list[Scored]] = []
    for s in scored:
        if s.extracted is None:
            continue
        for g in groups:
            if answers_equal(str(s.extracted), str(g[0].extracted))[0]:
                g.append(s)
                break
        else:
            groups.append([s])
    if not groups:
        return False
    best = max(groups, key=len)  # max keeps the first of equal-sized groups
    return best[0].correct


def _rec(doc: dict) -> dict:
    return json.loads(doc["_json"])


def _jsonable(x):
    try:
        json.dumps(x)
        return x
    except TypeError:
        return str(x)


def skip_counts(skipped: list[dict]) -> dict[str, int]:
    """Skipped records per reason: the counter a reason starts with (``image_missing: ...``), else
    ``invalid_record``."""
    return dict(collections.Counter(m.group(1) if (m := re.match(r"([a-z_]+):", s["reason"])) else "invalid_record"
                                    for s in skipped))


def outcome_counts(details: dict[int, dict]) -> dict[str, int]:
    c = collections.Counter(o for d in details.values() for o in d["outcome"])
    return {k: c.get(k, 0) for k in ("right", "wrong", "malformed", "no_answer")}
