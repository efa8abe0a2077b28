"""The demo's corpus and tasks, made on the spot so the demo needs no download.

Written by hand because no library ships what the recipe's curriculum needs at toy scale:
problems a 1M-parameter model can learn in minutes on a CPU, each with a step-by-step trace
(the "reasoning" source), a one-line chain of thought ("cot"), and replay text this project did
not write (the docstrings of the Python standard library, read with ``ast`` from its source files).

Problems: two-digit addition with carries, subtraction with borrows and comparison of two numbers.
Digits are single tokens (the tokenizer splits them), so a trace is a short sequence of one-digit
facts the model can learn and reuse on pairs it never saw; the answer is assembled from the digits
of the lines just above it, at the same distance in every trace (see ``Problem.trace``), because
copying from far back or from a varying place is what a tiny model learns last. A fixed hash of each
problem sends a tenth of all problems to the held-out test split: no test problem appears in any
training text.
"""

from __future__ import annotations

import ast
import hashlib
import json
import random
import shutil
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from megatron_apriel.data.chat_template import APRIEL_CHAT_TEMPLATE

KINDS = ("add", "sub", "compare")
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<|system|>", "<|user|>", "<|assistant|>", "<|tool_result|>",
                  "<|end|>"]
# Kept as plain added tokens (not special): completions decoded with skip_special_tokens keep them,
# so the format reward sees them, and each marker costs one position instead of ten.
MARKERS = ["[BEGIN FINAL RESPONSE]", "[END FINAL RESPONSE]", "Here are my reasoning steps:"]


@dataclass(frozen=True)
class Problem:
    kind: str
    a: int
    b: int

    @property
    def held_out(self) -> bool:
        digest = hashlib.sha256(f"{self.kind}:{self.a}:{self.b}".encode()).digest()
        return digest[0] % 10 == 0

    @property
    def question(self) -> str:
        if self.kind == "add":
            return f"What is {self.a} + {self.b}?"
        if self.kind == "sub":
            return f"What is {self.a} - {self.b}?"
        return f"Which is larger, {self.a} or {self.b}?"

    @property
    def answer(self) -> str:
        if self.kind == "add":
            return str(self.a + self.b)
        if self.kind == "sub":
            return str(self.a - self.b)
        return str(max(self.a, self.b))

    @property
    def trace(self) -> str:
        """Step-by-step reasoning, one digit fact per line, every line of a kind the same length.

        Sums and borrowed digits are written with two digits ("06", "03") and the carry or borrow
        always appears ("+ 0", "borrow 0"), so the digits the answer is assembled from sit at the
        same distance before it in every trace: a fixed-offset copy, which a tiny model learns
        long before a copy that must search for its source.
        """
        a, b = self.a, self.b
        a1, a0, b1, b0 = a // 10, a % 10, b // 10, b % 10
        # the operands first, digit by digit and zero-padded: the only copy from the question is
        # right after it, and every later line copies from this one at a fixed offset
        op = {"add": "+", "sub": "-"}.get(self.kind, "and")
        restate = f"Digits: {a1} {a0} {op} {b1} {b0}."
        if self.kind == "add":
            s0 = a0 + b0
            carry = s0 // 10
            lines = [f"Ones: {a0} + {b0} = {s0:02d}.", f"Tens: {a1} + {b1} + {carry} = {a1 + b1 + carry:02d}.",
                     f"So the answer is {a + b}."]
        elif self.kind == "sub":
            borrow = int(a0 < b0)
            lines = [f"Ones: {a0} - {b0}, borrow {borrow}: {a0 + 10 * borrow:02d} - {b0} = {a0 + 10 * borrow - b0}.",
                     f"Tens: {a1} - {b1} - {borrow} = {a1 - b1 - borrow}.", f"So the answer is {a - b}."]
        else:
            if a1 != b1:
                lines = [f"Tens: {a1} and {b1}; {max(a1, b1)} is larger."]
            else:
                lines = [f"Tens: both {a1}.", f"Ones: {a0} and {b0}; {max(a0, b0)} is larger."]
            lines.append(f"So the answer is {max(a, b)}.")
        return "\n".join([restate, *lines])

    @property
    def cot(self) -> str:
        """The short chain-of-thought form: one line, the answer and its reason."""
        first = self.trace.split("\n")[1]
        if self.kind == "compare":
            return f"{self.question} {self.answer}, because {first[0].lower()}{first[1:]}"
        return f"{self.question} {self.answer}. {first}"

    def messages(self) -> list[dict]:
        return [{"role": "user", "content": self.question},
                {"role": "assistant", "reasoning": self.trace, "content": self.answer}]


def sample_problem(rng: random.Random, kind: str) -> Problem:
    a = rng.randint(10, 99)
    if kind == "add":
        b = rng.randint(1, 99)
    elif kind == "sub":
        b = rng.randint(1, a)
    else:
        b = rng.randint(10, 99)
        while b == a:
            b = rng.randint(10, 99)
    return Problem(kind, a, b)


def problems(seed: int, n: int, kinds=KINDS, held_out: bool = False) -> list[Problem]:
    """``n`` problems of the train (or held-out) split, kinds in turn."""
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        p = sample_problem(rng, kinds[len(out) % len(kinds)])
        if p.held_out == held_out:
            out.append(p)
    return out


def reasoning_document(ps: list[Problem]) -> str:
    return "\n\n".join(f"Problem: {p.question}\nReasoning:\n{p.trace}\nAnswer: {p.answer}" for p in ps)


def stdlib_docstrings(max_chars: int, min_len: int = 80, max_len: int = 1500) -> list[str]:
    """Module, class and function docstrings of the running Python's standard library."""
    root = Path(sysconfig.get_paths()["stdlib"])
    docs, total = [], 0
    for path in sorted(root.glob("*.py")) + sorted(root.glob("*/*.py")):
        if "test" in path.parts[-2:][0] or path.name.startswith("test"):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and min_len <= len(doc) <= max_len and doc.isascii():
                    docs.append(doc)
                    total += len(doc)
                    if total >= max_chars:
                        return docs
    return docs


def write_jsonl(path: Path, records) -> int:
    tmp = path.with_name(path.name + ".tmp")
    n = 0
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
            n += 1
    tmp.replace(path)
    return n


def make_sources(out: Path, n_reasoning_docs: int, n_cot_docs: int, replay_chars: int, sft: dict[str, tuple],
                 n_grpo: int, n_test: int, seed: int = 0) -> dict:
    """Write {reasoning,cot,replay}.jsonl, one ``<name>.jsonl`` per SFT set, grpo_prompts.jsonl and
    test_{add,sub,compare}.jsonl. ``sft``: name -> (conversations, kinds in turn), e.g. a balanced
    ``KINDS`` or a specialist's ``("add", "add", "add", "sub", "compare")``."""
    out.mkdir(parents=True, exist_ok=True)
    per_doc = 4
    train = problems(seed, n_reasoning_docs * per_doc)
    counts = {
        "reasoning": write_jsonl(out / "reasoning.jsonl", (
            {"text": reasoning_document(train[i:i + per_doc])} for i in range(0, len(train), per_doc))),
        "cot": write_jsonl(out / "cot.jsonl", (
            {"text": "\n".join(p.cot for p in problems(seed + 1 + i, 6))} for i in range(n_cot_docs))),
        "replay": write_jsonl(out / "replay.jsonl", ({"text": d} for d in stdlib_docstrings(replay_chars))),
        "grpo_prompts": write_jsonl(out / "grpo_prompts.jsonl", (
            {"prompt": [{"role": "user", "content": p.question}], "domain": "math", "answer": p.answer}
            for p in problems(seed + 30_000, n_grpo))),
    }
    # each SFT set draws its own problems (its own seed), so the sets overlap only by chance
    for i, (name, (n, kinds)) in enumerate(sft.items()):
        counts[name] = write_jsonl(out / f"{name}.jsonl", ({"messages": p.messages(), "source": p.kind}
                                                          for p in problems(seed + 10_000 * (i + 1) + 50_000, n,
                                                                            kinds=kinds)))
    # one held-out file per family, so ``apriel eval`` scores each family on its own
    for kind in KINDS:
        counts[f"test_{kind}"] = write_jsonl(out / f"test_{kind}.jsonl", (
            {"question": p.question, "answer": p.answer, "kind": p.kind}
            for p in problems(seed + 40_000, n_test // len(KINDS), kinds=(kind,), held_out=True)))
    return counts


def train_tokenizer(files: list[Path], out_dir: Path, vocab_size: int = 1024) -> dict:
    """A byte-level BPE (HF tokenizers) with digits split, saved as an HF fast-tokenizer folder.

    The Tekken vocabulary (131k) would make the tiny model's output layer most of its compute on a
    CPU; a 1k vocabulary trained on the demo corpus keeps the model small and its text short.
    """
    def lines():
        for f in files:
            with open(f, encoding="utf-8") as fh:
                for line in fh:
                    yield json.loads(line)["text"]

    return save_bpe(lines(), out_dir, vocab_size, SPECIAL_TOKENS, MARKERS, APRIEL_CHAT_TEMPLATE)


def save_bpe(texts, out_dir: Path, vocab_size: int, special_tokens: list[str], markers: list[str],
             chat_template: str, check: Optional[Callable[[PreTrainedTokenizerFast], None]] = None) -> dict:
    """Train a byte-level BPE with digits split on ``texts`` (``special_tokens`` first, at their
    ids; ``markers`` added after, as plain tokens) and save it with ``chat_template`` as an HF
    fast-tokenizer folder, replaced whole. The text and multimodal demos' tokenizers."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(markers), special_tokens=special_tokens,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    tok.add_tokens(markers)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="<|end|>",
                                   unk_token="<unk>", pad_token="<pad>")
    if check is not None:
        check(fast)
    fast.chat_template = chat_template
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    fast.save_pretrained(tmp)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.replace(out_dir)
    return {"vocab_size": len(fast), "eos_token_id": fast.eos_token_id, "bos_token_id": fast.bos_token_id,
            "pad_token_id": fast.pad_token_id}
