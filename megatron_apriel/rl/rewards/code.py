"""Code reward: the fraction of test cases a completion's program passes, each run in the sandbox.

A test case is ``{"input": stdin, "output": expected stdout}`` (compared after stripping trailing
whitespace per line) or ``{"assert": "python statements"}`` appended to the program (passes when
the program exits 0).
"""

from __future__ import annotations

from .base import Reward, answer_region, code_blocks, completion_text
from .sandbox import SandboxLimits, run_python


def extract_program(completion) -> str | None:
    """The last ```python block of the final response (else of the whole completion)."""
    text = completion_text(completion)
    for region in (answer_region(text), text):
        blocks = [code for lang, code in code_blocks(region) if lang in ("python", "py", "python3", "")]
        if blocks:
            return blocks[-1]
    return None


def _same_output(got: str, want: str) -> bool:
    clean = lambda s: [line.rstrip() for line in s.strip().splitlines()]
    return clean(got) == clean(want)


def code_reward(completion, tests=None, limits: SandboxLimits | None = None, **_) -> Reward:
    if not tests:
        return Reward(0.0, "sample has no test cases")
    program = extract_program(completion)
    if program is None:
        return Reward(0.0, "no python code block")
    passed, first_failure = 0, ""
    for i, case in enumerate(tests):
        if "assert" in case:
            result = run_python(program + "\n\n" + case["assert"] + "\n", "", limits)
            ok = result.ok
        else:
            result = run_python(program, str(case.get("input", "")), limits)
            ok = result.ok and _same_output(result.stdout, str(case.get("output", "")))
        passed += ok
        if not ok and not first_failure:
            why = "timed out" if result.timed_out else (
                f"exit {result.returncode}: {result.stderr.strip().splitlines()[-1][:80]}"
                if result.returncode and result.stderr.strip() else "wrong output")
            first_failure = f"; test {i} {why}"
    return Reward(passed / len(tests), f"{passed}/{len(tests)} tests passed{first_failure}")
