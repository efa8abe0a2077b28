"""Math reward: extract the final answer and compare it with the reference.

Comparison goes from cheap to expensive: normalised strings, exact rationals (integers, decimals,
fractions, ``\\frac``, percentages), then sympy equivalence (``simplify(a - b) == 0``). sympy runs in
a separate worker process with a timeout, because an adversarial answer such as ``9^{9^{9^9}}``
spends its time inside C big-integer code that no signal can interrupt; on timeout the worker is
killed and restarted and the answer scores zero. ``parse_expr`` evaluates Python, so only answers
made of arithmetic, single-letter symbols and a few named functions are handed to it.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import select
import subprocess
import sys
import threading
from fractions import Fraction

from .base import Reward, answer_region, completion_text

MAX_ANSWER_CHARS = 400


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox``), with nested braces balanced."""
    idx = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if idx < 0:
        return None
    i = text.find("{", idx)
    if i < 0:
        return None
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1:j]
    return None


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?|-?\.\d+")


def extract_answer(completion) -> str | None:
    """The boxed answer in the final response, else ``answer: X``, else its last number."""
    region = answer_region(completion_text(completion))
    boxed = last_boxed(region)
    if boxed is not None:
        return boxed.strip()
    m = re.findall(r"(?:final answer|answer)\s*(?:is|:)\s*\$?([^\n$]+)", region, re.I)
    if m:
        return m[-1].strip().rstrip(".")
    nums = _NUMBER.findall(region)
    return nums[-1] if nums else None


def normalize(ans: str) -> str:
    s = ans.strip().strip("$").strip()
    s = re.sub(r"\\text\{\s*([^}]*)\}", r"\1", s)
    s = re.sub(r"\\(?:mathrm|mathbf|textbf)\{([^}]*)\}", r"\1", s)
    for a, b in (("\\left", ""), ("\\right", ""), ("\\!", ""), ("\\,", ""), ("\\;", ""), ("\\ ", ""),
                 ("\\dfrac", "\\frac"), ("\\tfrac", "\\frac"), ("^\\circ", ""), ("^{\\circ}", ""),
                 ("\\%", "%"), ("\\cdot", "*"), ("\\times", "*"), ("\\le", "<="), ("\\ge", ">=")):
        s = s.replace(a, b)
    s = re.sub(r"^[a-zA-Z]\s*=\s*", "", s)  # "x = 3" -> "3"
    s = s.rstrip(".").replace(" ", "")
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", s):
        s = s.replace(",", "")
    return s


def as_rational(s: str) -> Fraction | None:
    m = re.fullmatch(r"(-?)\\frac\{(-?\d+)\}\{(-?\d+)\}", s) or re.fullmatch(r"(-?)\\frac(\d)(\d)", s)
    try:
        if m:
            v = Fraction(int(m.group(2)), int(m.group(3)))
            return -v if m.group(1) else v
        if s.endswith("%"):
            return Fraction(s[:-1]) / 100
        if re.fullmatch(r"-?\d+(\.\d+)?(/\d+)?|-?\.\d+", s):
            return Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None
    return None


def latex_to_sympy_text(s: str) -> str:
    """Light LaTeX -> sympy syntax for the common answer shapes (no antlr grammar needed)."""
    s = s.replace("{", "(").replace("}", ")")
    for _ in range(5):
        s = re.sub(r"\\frac\(([^()]*)\)\(([^()]*)\)", r"((\1)/(\2))", s)
        s = re.sub(r"\\sqrt\(([^()]*)\)", r"sqrt(\1)", s)
    s = s.replace("\\pi", "pi").replace("^", "**").replace("\\infty", "oo")
    s = re.sub(r"\\(sin|cos|tan|log|ln|exp)", r"\1", s)
    s = re.sub(r"(\d)([a-zA-Z(])", r"\1*\2", s)  # 2x -> 2*x, 2(x+1) -> 2*(x+1)
    return s


_SAFE_CHARS = re.compile(r"[0-9a-zA-Z+\-*/^().,=<>! ]*")
_SAFE_NAMES = {"sqrt", "pi", "sin", "cos", "tan", "log", "ln", "exp", "oo", "E", "I"}


def safe_for_parse_expr(text: str) -> bool:
    """sympy's ``parse_expr`` ends in ``eval``: only arithmetic on single-letter symbols and a few
    known functions may reach it, never attribute access, strings, dunder names or calls of
    arbitrary names (``__import__('os').system(...)``)."""
    if not _SAFE_CHARS.fullmatch(text):
        return False
    return all(len(name) == 1 or name in _SAFE_NAMES for name in re.findall(r"[A-Za-z]+", text))


# ---- sympy worker -------------------------------------------------------------------------------

def _worker_loop() -> None:  # runs in the worker process
    # sympy (about a second to import) is loaded by the worker only, not by every process that scores
    import sympy
    from sympy.parsing.sympy_parser import convert_xor, implicit_multiplication, parse_expr, standard_transformations

    transformations = standard_transformations + (implicit_multiplication, convert_xor)

    def parse(text):
        if "\\" in text:
            try:
                from sympy.parsing.latex import parse_latex  # needs the optional antlr4 runtime
                return parse_latex(text)
            except Exception:
                pass
        plain = latex_to_sympy_text(text)
        if not safe_for_parse_expr(plain):
            raise ValueError("not a plain arithmetic expression")
        return parse_expr(plain, transformations=transformations, evaluate=True)

    for line in sys.stdin:
        a, b = json.loads(line)
        try:
            ea, eb = parse(a), parse(b)
            same = bool(sympy.simplify(ea - eb) == 0)
            if not same and getattr(ea, "is_number", False) and getattr(eb, "is_number", False):
                same = abs(complex(sympy.N(ea - eb))) < 1e-9
            out = {"equal": same}
        except Exception as e:  # unparsable answers are simply not equal
            out = {"equal": False, "error": type(e).__name__}
        sys.stdout.write(json.dumps(out) + "\n")
        sys.stdout.flush()


class _SympyWorker:
    def __init__(self):
        self.proc: subprocess.Popen | None = None
        self.lock = threading.Lock()
        atexit.register(self.close)

    def _start(self):
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen([sys.executable, "-c", "from megatron_apriel.rl.rewards.math import "
                                      "_worker_loop; _worker_loop()"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env, bufsize=1)

    def close(self):
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def equal(self, a: str, b: str, timeout: float) -> tuple[bool, str]:
        with self.lock:
            first = self.proc is None or self.proc.poll() is not None
            if first:
                self._start()
            self.proc.stdin.write(json.dumps([a, b]) + "\n")
            self.proc.stdin.flush()
            # The first call also pays for importing sympy in the worker.
            ready, _, _ = select.select([self.proc.stdout], [], [], timeout + (20 if first else 0))
            if not ready:
                self.close()
                return False, f"sympy timed out after {timeout}s"
            line = self.proc.stdout.readline()
            if not line:
                self.close()
                return False, "sympy worker died"
            out = json.loads(line)
            return out["equal"], out.get("error", "")


_WORKER = _SympyWorker()


def answers_equal(pred: str, ref: str, timeout: float = 5.0) -> tuple[bool, str]:
    if len(pred) > MAX_ANSWER_CHARS:
        return False, f"answer longer than {MAX_ANSWER_CHARS} characters"
    p, r = normalize(pred), normalize(ref)
    if p == r:
        return True, "same string"
    pr, rr = as_rational(p), as_rational(r)
    if pr is not None and rr is not None:
        return pr == rr, "same number" if pr == rr else f"{pred!r} != {ref!r}"
    ok, err = _WORKER.equal(p, r, timeout)
    return ok, ("sympy-equivalent" if ok else (err or f"{pred!r} is not equivalent to {ref!r}"))


def math_reward(completion, answer: str | None = None, timeout: float = 5.0, **_) -> Reward:
    if answer is None or str(answer).strip() == "":
        return Reward(0.0, "sample has no reference answer")
    pred = extract_answer(completion)
    if pred is None:
        return Reward(0.0, "no answer found")
    ok, why = answers_equal(pred, str(answer), timeout)
    return Reward(1.0 if ok else 0.0, why)
