"""Code reward: the fraction of test cases a completion's program passes, each run in the sandbox.

A test case is ``{"input": stdin, "output": expected stdout}`` (compared after stripping trailing
whitespace per line) or ``{"assert": "python statements"}`` run after the program in its namespace.
An assert test passes only when the sandbox's harness saw the program and the statements run to
their end (``SandboxResult.completed``): the exit status is the program's to choose, so
``sys.exit(0)`` before the asserts passes nothing. A completion's tests run concurrently on the
sandbox pool.
"""

from __future__ import annotations

from .base import Reward, answer_region, code_blocks, completion_text
from .sandbox import SandboxLimits, run_many


def extract_program(completion) -> str | None:
    """The last ```python block of the final response (else of the whole completion)."""
    text = completion_text(completion)
    for region in (answer_region(text), text):
        blocks = [code for lang, code in code_blocks(region) if lang in ("python", "py", "python3", "")]
        if blocks:
            return blocks[-1]
    return None


def _lines(text: str) -> list[str]:
    return [line.rstrip() for line in text.strip().splitlines()]


def _same_output(got: str, want: str) -> bool:
    return _lines(got) == _lines(want)


def code_reward(completion, tests=None, limits: SandboxLimits | None = None, **_) -> Reward:
    if not tests:
        return Reward(0.0, "sample has no test cases")
    program = extract_program(completion)
    if program is None:
        return Reward(0.0, "no python code block")
    jobs = [(program, "", case["assert"]) if "assert" in case else (program, str(case.get("input", "")), None)
            for case in tests]
    passed, first_failure = 0, ""
    for i, (case, result) in enumerate(zip(tests, run_many(jobs, limits))):
        if "assert" in case:
            ok = result.completed and not result.timed_out
        else:
            ok = result.ok and _same_output(result.stdout, str(case.get("output", "")))
        passed += ok
        if not ok and not first_failure:
            err = result.stderr.strip().splitlines()
            if result.timed_out:
                why = f"timed out after {(limits or SandboxLimits()).wall_seconds:g}s"
            elif result.returncode and err:
                why = f"exit {result.returncode}: {err[-1][:80]}"
            elif "assert" in case:
                why = f"left before the test code finished (exit {result.returncode})"
            else:
                why = "wrong output"
            first_failure = f"; test {i} {why}"
    return Reward(passed / len(tests), f"{passed}/{len(tests)} tests passed{first_failure}")
