"""Tool-call reward: the call parses, names an available tool, its arguments validate against that
tool's JSON schema (jsonschema), and, when the sample gives one, it matches the expected call.

Calls are read from ``<tool_calls>[...]</tool_calls>`` (the Apriel chat template's form) or
``<tool_call>{...}</tool_call>`` in the final response, or from the final
response itself when it is one JSON object ``{"name": ..., "arguments": {...}}``. Tools are given
in the OpenAI form (``{"type": "function", "function": {...}}``) or as the bare function object.
"""

from __future__ import annotations

import json
import re

import jsonschema

from .base import Reward, answer_region, completion_text

_TAG = re.compile(r"<tool_calls?>\s*(.*?)\s*</tool_calls?>", re.S)


def parse_tool_calls(completion) -> list[dict] | None:
    region = answer_region(completion_text(completion))
    raw = _TAG.findall(region) or [region.strip()]
    calls = []
    for item in raw:
        item = re.sub(r"^```(?:json)?\s*|\s*```$", "", item.strip())
        try:
            obj = json.loads(item)
        except (json.JSONDecodeError, RecursionError):
            return None
        for call in obj if isinstance(obj, list) else [obj]:
            if not isinstance(call, dict):
                return None
            if isinstance(call.get("function"), dict):  # OpenAI message form
                call = call["function"]
            if not isinstance(call.get("name"), str):
                return None
            args = call.get("arguments", call.get("parameters", {}))
            if isinstance(args, str):
                try:
                    args = json.loads(args)
                except json.JSONDecodeError:
                    return None
            calls.append({"name": call["name"], "arguments": args})
    return calls


def _tool_table(tools) -> dict[str, dict]:
    table = {}
    for tool in tools or ():
        fn = tool.get("function", tool)
        table[fn["name"]] = fn.get("parameters", {"type": "object"})
    return table


def tool_call_reward(completion, tools=None, expected_call=None, **_) -> Reward:
    table = _tool_table(tools)
    if not table:
        return Reward(0.0, "sample has no tools")
    calls = parse_tool_calls(completion)
    if not calls:
        return Reward(0.0, "no parsable tool call")
    for call in calls:
        if call["name"] not in table:
            return Reward(0.0, f"unknown tool {call['name']!r}")
        try:
            jsonschema.validate(call["arguments"], table[call["name"]])
        except jsonschema.ValidationError as e:
            return Reward(0.0, f"arguments of {call['name']} do not validate: {e.message[:80]}")
        except jsonschema.SchemaError as e:
            return Reward(0.0, f"schema of {call['name']} is invalid: {e.message[:80]}")
    if expected_call:
        expected = expected_call if isinstance(expected_call, list) else [expected_call]
        want = [{"name": c["name"], "arguments": c.get("arguments", {})} for c in expected]
        if calls != want:
            return Reward(0.0, f"call differs from the expected {json.dumps(want)[:80]}")
    return Reward(1.0, f"{len(calls)} valid call(s)")
