"""Code reward: the fraction of test cases a completion's program passes, each run in the sandbox.

A test case is ``{"input": stdin, "output": expected stdout}`` (compared after stripping trailing
whitespace per line) or ``{"assert": "python statements"}``. Each stdin/stdout test runs the program
in a sandbox of its own; the output is compared here. A completion's assert tests run together in two
sandboxes (``sandbox.run_asserts``): the program's process answers calls with values, the test code
runs in the test process with stand-ins for the program's names, and that process's verdict per test
is what counts. The program never holds an object the asserts compare, nor a way to the verdict. The
jobs of a completion run concurrently on the sandbox pool.
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
    stdio = [i for i, case in enumerate(tests) if "assert" not in case]
    asserts = [i for i, case in enumerate(tests) if "assert" in case]
    jobs = [(program, str(tests[i].get("input", "")), None) for i in stdio]
    if asserts:
        jobs.append((program, "", [str(tests[i]["assert"]) for i in asserts]))
    results = run_many(jobs, limits)
    outcome: dict[int, tuple[bool, str]] = {}
    for i, result in zip(stdio, results):
        ok = result.ok and _same_output(result.stdout, str(tests[i].get("output", "")))
        err = result.stderr.strip().splitlines()
        if result.timed_out:
            why = f"timed out after {(limits or SandboxLimits()).wall_seconds:g}s"
        elif result.cpu_limited:
            why = f"exceeded the CPU limit of {(limits or SandboxLimits()).cpu_seconds}s"
        elif result.signal:
            why = f"killed by signal {result.signal}"
        elif result.returncode and err:
            why = f"exit {result.returncode}: {err[-1][:80]}"
        else:
            why = "wrong output"
        outcome[i] = (ok, why)
    if asserts:
        outcome.update(zip(asserts, results[-1].outcomes))
    passed = sum(outcome[i][0] for i in range(len(tests)))
    failed = [i for i in range(len(tests)) if not outcome[i][0]]
    first_failure = f"; test {failed[0]} {outcome[failed[0]][1]}" if failed else ""
    return Reward(passed / len(tests), f"{passed}/{len(tests)} tests passed{first_failure}")
