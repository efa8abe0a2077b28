"""Every reward on right, wrong, malformed and adversarial answers, and the per-domain combiner."""

from __future__ import annotations

import json
import time

import pytest

from megatron_apriel.config import ConfigError, from_dict
from megatron_apriel.rl.rewards import (
    RewardsConfig,
    SandboxLimits,
    TRLReward,
    code_reward,
    combined_reward,
    format_reward,
    instruction_reward,
    math_reward,
    tool_call_reward,
)
from megatron_apriel.rl.rewards.math import extract_answer, last_boxed


def apriel(final: str, reasoning: str = "Let me think step by step.") -> str:
    return f"{reasoning}\n[BEGIN FINAL RESPONSE]\n{final}\n[END FINAL RESPONSE]\n<|end|>"


# ---- format -------------------------------------------------------------------------------------

def test_format_right():
    assert format_reward(apriel("42")).score == 1.0
    prefixed = "Here are my reasoning steps:\n" + apriel("42")
    assert format_reward(prefixed, reasoning_prefix="Here are my reasoning steps:").score == 1.0
    assert format_reward(apriel("<answer>4</answer>"), required_tags=["answer"]).score == 1.0


@pytest.mark.parametrize("text,why", [
    ("[BEGIN FINAL RESPONSE]42[END FINAL RESPONSE]", "no reasoning"),
    ("thinking... the answer is 42", "expected one"),
    ("thinking [BEGIN FINAL RESPONSE] 42", "expected one"),
    ("thinking [END FINAL RESPONSE] 42 [BEGIN FINAL RESPONSE]", "comes before"),
    ("thinking [BEGIN FINAL RESPONSE]   [END FINAL RESPONSE]", "empty final response"),
    ("thinking [BEGIN FINAL RESPONSE] 1 [END FINAL RESPONSE] more text", "text after"),
    # Adversarial: stuffing several answer blocks to hedge.
    (apriel("1") + apriel("2"), "expected one"),
])
def test_format_wrong(text, why):
    r = format_reward(text)
    assert r.score == 0.0 and why in r.reason


def test_format_missing_prefix_and_tags():
    assert format_reward(apriel("42"), reasoning_prefix="Here are my reasoning steps:").score == 0.0
    assert format_reward(apriel("4"), required_tags=["answer"]).score == 0.0
    assert format_reward(apriel("</answer>4<answer>"), required_tags=["answer"]).score == 0.0


def test_both_released_formats_are_read():
    """Apriel-Nemotron's completion starts inside the reasoning its prompt opened and ends at <|end|>;
    Apriel-1.5's writes the reasoning line itself and ends with <|end|> then </s>: both get full format
    and answer marks, in the rewards and in the evaluation's scoring; other text after the turn does not."""
    from megatron_apriel.eval.tasks import score_math
    from megatron_apriel.rl.rewards import final_response

    nemotron, v15 = apriel("42"), "Here are my reasoning steps:\n" + apriel("42") + "\n</s>"
    for text in (nemotron, v15, v15.replace("<|end|>\n</s>", "")):  # the last: special tokens skipped
        assert format_reward(text).score == 1.0 and math_reward(text, answer="42").score == 1.0
        assert final_response(text) == "42" and score_math(text, {"answer": 42}).outcome == "right"
    assert format_reward(v15, reasoning_prefix="Here are my reasoning steps:").score == 1.0
    assert "text after" in format_reward(v15 + " more").reason


# ---- math ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("final,ref", [
    ("The answer is \\boxed{\\frac{1}{2}}", "0.5"),
    ("\\boxed{\\dfrac{3}{4}}", "3/4"),
    ("So $x = \\boxed{12}$.", "12"),
    ("The total is 1,000.", "1000"),
    ("\\boxed{50\\%}", "0.5"),
    ("\\boxed{2x+2}", "2(x+1)"),
    ("\\boxed{\\sqrt{8}}", "2\\sqrt{2}"),
    ("\\boxed{\\frac{\\pi}{2}}", "\\pi/2"),
])
def test_math_right(final, ref):
    r = math_reward(apriel(final), answer=ref)
    assert r.score == 1.0, r.reason


@pytest.mark.parametrize("text,ref", [
    (apriel("\\boxed{3}"), "4"),
    (apriel("\\boxed{2x+1}"), "2(x+1)"),
    (apriel("no idea"), "4"),  # no answer at all
    (apriel("\\boxed{"), "4"),  # malformed box, no number
    ("", "4"),
])
def test_math_wrong_or_malformed(text, ref):
    assert math_reward(text, answer=ref).score == 0.0


def test_math_reads_the_final_response_not_the_reasoning():
    # The correct value only in the reasoning does not count.
    text = apriel("\\boxed{5}", reasoning="Maybe \\boxed{4}?")
    assert math_reward(text, answer="4").score == 0.0
    assert last_boxed("\\boxed{\\frac{1}{\\sqrt{2}}}") == "\\frac{1}{\\sqrt{2}}"
    assert extract_answer(apriel("first 3 then 7")) == "7"


def test_math_adversarial_is_bounded():
    start = time.monotonic()
    r = math_reward(apriel("\\boxed{9^{9^{9^{9}}}}"), answer="1", timeout=1.0)
    assert r.score == 0.0 and "timed out" in r.reason
    assert time.monotonic() - start < 30  # includes the worker's first sympy import
    # The worker is restarted and still answers afterwards.
    assert math_reward(apriel("\\boxed{x^2-1}"), answer="(x-1)(x+1)", timeout=5.0).score == 1.0
    assert math_reward(apriel("\\boxed{" + "1+" * 500 + "1}"), answer="501").score == 0.0  # too long
    assert math_reward(apriel("\\boxed{__import__('os').system('true')}"), answer="0").score == 0.0
    assert math_reward(apriel("\\boxed{4}"), answer=None).score == 0.0


# ---- code ---------------------------------------------------------------------------------------

LIMITS = SandboxLimits(cpu_seconds=2, wall_seconds=5)
TESTS = [{"input": "2 3", "output": "5"}, {"input": "-1 1", "output": "0"}, {"input": "10 20", "output": "30"}]


def code_answer(body: str) -> str:
    return apriel(f"```python\n{body}\n```")


@pytest.mark.bwrap
def test_code_right_partial_wrong():
    assert code_reward(code_answer("a, b = map(int, input().split())\nprint(a + b)"), tests=TESTS,
                       limits=LIMITS).score == 1.0
    partial = code_reward(code_answer("a, b = map(int, input().split())\nprint(a + b if a > 0 else 7)"),
                          tests=TESTS, limits=LIMITS)
    assert partial.score == pytest.approx(2 / 3) and "2/3" in partial.reason
    assert code_reward(code_answer("print(5)"), tests=TESTS, limits=LIMITS).score == pytest.approx(1 / 3)
    asserts = [{"assert": "assert add(2, 3) == 5"}, {"assert": "assert add(3, 0) == 3"}]
    assert code_reward(code_answer("def add(a, b):\n    return a + b"), tests=asserts, limits=LIMITS).score == 1.0
    assert code_reward(code_answer("def add(a, b):\n    return a - b"), tests=asserts, limits=LIMITS).score == 0.5


@pytest.mark.bwrap
def test_code_malformed_and_adversarial():
    assert code_reward(apriel("just print the sum"), tests=TESTS, limits=LIMITS).score == 0.0
    assert code_reward(code_answer("def f(:\n"), tests=TESTS, limits=LIMITS).score == 0.0
    assert code_reward(code_answer("print(5)"), tests=None).score == 0.0
    # Trying to read the expected output or crash the grader scores nothing.
    assert code_reward(code_answer("import sys; sys.exit(0)"), tests=TESTS, limits=LIMITS).score == 0.0
    assert code_reward(code_answer("import os; os.kill(os.getppid(), 9)"), tests=TESTS[:1], limits=LIMITS).score == 0.0


# ---- tool calls ---------------------------------------------------------------------------------

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["C", "F"]}},
    "required": ["city"], "additionalProperties": False}}}]


def call(name="get_weather", **args) -> str:
    return apriel(f'<tool_calls>[{{"name": "{name}", "arguments": {json.dumps(args)}}}]</tool_calls>')


def test_tool_calls_right():
    assert tool_call_reward(call(city="Paris"), tools=TOOLS).score == 1.0
    expected = {"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}
    assert tool_call_reward(call(city="Paris", unit="C"), tools=TOOLS, expected_call=expected).score == 1.0
    bare = apriel('{"name": "get_weather", "arguments": "{\\"city\\": \\"Rome\\"}"}')  # arguments as a JSON string
    assert tool_call_reward(bare, tools=TOOLS).score == 1.0


@pytest.mark.parametrize("text,why", [
    (call(city=3), "do not validate"),
    (call(unit="C"), "do not validate"),  # missing required
    (call(city="Paris", evil="rm -rf /"), "do not validate"),  # extra argument
    (call(name="delete_files", city="Paris"), "unknown tool"),
    (apriel('<tool_calls>[{"name": "get_weather", "arguments": {"city": "Paris"}</tool_calls>'), "no parsable"),
    (apriel("I would call the weather tool."), "no parsable"),
    (apriel("<tool_calls>" + "[" * 5000 + "]" * 5000 + "</tool_calls>"), "no parsable"),
])
def test_tool_calls_wrong(text, why):
    r = tool_call_reward(text, tools=TOOLS)
    assert r.score == 0.0 and why in r.reason, r.reason


def test_tool_calls_expected_mismatch():
    r = tool_call_reward(call(city="Rome"), tools=TOOLS,
                         expected_call={"name": "get_weather", "arguments": {"city": "Paris"}})
    assert r.score == 0.0 and "expected" in r.reason


# ---- instruction following ----------------------------------------------------------------------

def test_instructions_partial_credit():
    checks = [{"type": "max_words", "value": 10}, {"type": "include_keywords", "keywords": ["apple"]},
              {"type": "lowercase"}, {"type": "bullet_count", "value": 2}]
    assert instruction_reward(apriel("- an apple\n- a pear"), checks=checks).score == 1.0
    r = instruction_reward(apriel("- An apple\n- a pear"), checks=checks)
    assert r.score == 0.75 and "lowercase" in r.reason
    assert instruction_reward(apriel("PEAR " * 20), checks=checks).score == 0.0
    assert instruction_reward(apriel('{"a": 1}'), checks=[{"type": "json_format"}]).score == 1.0
    assert instruction_reward(apriel('{"a": 1'), checks=[{"type": "json_format"}]).score == 0.0
    # Adversarial: the keyword hidden in the reasoning does not count.
    assert instruction_reward(apriel("pear", reasoning="apple apple"),
                              checks=[{"type": "include_keywords", "keywords": ["apple"]}]).score == 0.0


def test_instructions_bad_check_is_an_error():
    with pytest.raises(ValueError, match="unknown instruction check type 'max_wordz'"):
        instruction_reward("x", checks=[{"type": "max_wordz", "value": 1}])
    with pytest.raises(ValueError, match="needs the key 'value'"):
        instruction_reward("x", checks=[{"type": "max_words"}])


# ---- combination --------------------------------------------------------------------------------

def test_combined_weights_per_domain():
    cfg = RewardsConfig()
    good = apriel("\\boxed{4}")
    r, parts = combined_reward(good, {"domain": "math", "answer": "4"}, cfg)
    assert r.score == 1.0 and set(parts) == {"format", "math"}
    # Right answer, broken format: only the math weight (0.8) counts.
    r, _ = combined_reward("the answer is \\boxed{4}", {"domain": "math", "answer": "4"}, cfg)
    assert r.score == pytest.approx(0.8)
    cfg = from_dict(RewardsConfig, {"domains": {"math": {"format": 1.0, "math": 3.0}}})
    r, _ = combined_reward(apriel("\\boxed{5}"), {"domain": "math", "answer": "4"}, cfg)
    assert r.score == pytest.approx(0.25)
    with pytest.raises(ValueError, match="domain 'poetry'"):
        combined_reward(good, {"domain": "poetry"}, cfg)


def test_trl_reward_reads_json_columns():
    fn = TRLReward(RewardsConfig())
    completions = [[{"role": "assistant", "content": call(city="Oslo")}],
                   [{"role": "assistant", "content": apriel("no")}]]
    metrics, extra = {}, {}
    scores = fn(prompts=["p", "p"], completions=completions, domain=["tools", "tools"],
                tools=[json.dumps(TOOLS)] * 2, expected_call=["", ""],
                log_metric=metrics.__setitem__, log_extra=extra.__setitem__)
    assert scores == [1.0, pytest.approx(0.2)]
    assert metrics == {"rewards/tools/format": 1.0, "rewards/tools/tool_calls": 0.5}
    assert "no parsable tool call" in extra["reward_reason"][1]


def test_rewards_config_rejects_unknown_reward():
    with pytest.raises(ConfigError, match="rewards.domains.math.maths"):
        from_dict(RewardsConfig, {"domains": {"math": {"maths": 1.0}}})
