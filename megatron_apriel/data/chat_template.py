"""The Apriel chat template, and rendering conversations to tokens with an assistant-token mask.

The template is a Jinja chat template for HF tokenizers (``tokenizer.chat_template``), so training
data, ``apply_chat_template`` at serving time and vLLM all render the same bytes. Assistant turns sit
inside ``{% generation %}`` blocks: transformers then reports the character span of every assistant
turn while rendering and maps it onto tokens through the fast tokenizer's offsets
(``return_assistant_tokens_mask``). The loss mask therefore comes from the template's structure,
never from searching decoded text, and any HF template with generation blocks works the same way.

Layout (RECIPE.md)::

    <|system|>\\n{system}\\n<|end|>\\n
    <|user|>\\n{user}\\n<|end|>\\n
    <|assistant|>\\nHere are my reasoning steps:\\n{reasoning}\\n[BEGIN FINAL RESPONSE]\\n{content}\\n[END FINAL RESPONSE]\\n<|end|>\\n
    <|tool_result|>\\n{tool output}\\n<|end|>\\n

The mask covers an assistant turn from the first token after ``<|assistant|>\\n`` up to and
including its ``<|end|>``: the model learns to write the reasoning, the answer and to stop; the
role header and the newline that follows ``<|end|>`` are prompt. An assistant message without a
``reasoning`` (or ``reasoning_content``) field is rendered as its content alone. Tool calls
(``tool_calls``, OpenAI style) are written as JSON inside ``<tool_calls>...</tool_calls>`` in the
final response; available tools (``tools=``) are listed in the system turn.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|tool_result|>", "<|end|>")

APRIEL_CHAT_TEMPLATE = (
    "{%- if bos_token is defined and bos_token %}{{ bos_token }}{% endif %}"
    "{%- if tools %}"
    "{%- set sys = messages[0]['content'] if messages and messages[0]['role'] == 'system' else '' %}"
    "{{ '<|system|>\\n' }}{% if sys %}{{ sys }}{{ '\\n\\n' }}{% endif %}"
    "{{ 'Available tools:\\n' }}{{ tools | tojson }}{{ '\\n<|end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'system' %}"
    "{%- if not tools %}{{ '<|system|>\\n' + message['content'] + '\\n<|end|>\\n' }}{% endif %}"
    "{%- elif message['role'] == 'user' %}"
    "{{ '<|user|>\\n' + message['content'] + '\\n<|end|>\\n' }}"
    "{%- elif message['role'] == 'tool' %}"
    "{{ '<|tool_result|>\\n' + message['content'] + '\\n<|end|>\\n' }}"
    "{%- elif message['role'] == 'assistant' %}"
    "{{ '<|assistant|>\\n' }}"
    "{%- generation %}"
    "{%- set reasoning = message.get('reasoning') or message.get('reasoning_content') %}"
    "{%- if reasoning %}"
    "{{ 'Here are my reasoning steps:\\n' + reasoning + '\\n[BEGIN FINAL RESPONSE]\\n' }}"
    "{%- endif %}"
    "{{ message['content'] or '' }}"
    "{%- if message.get('tool_calls') %}"
    "{{ '\\n<tool_calls>' }}{{ message['tool_calls'] | tojson }}{{ '</tool_calls>' }}"
    "{%- endif %}"
    "{%- if reasoning %}{{ '\\n[END FINAL RESPONSE]' }}{% endif %}"
    "{{ '\\n<|end|>' }}"
    "{%- endgeneration %}"
    "{{ '\\n' }}"
    "{%- else %}"
    "{{ raise_exception('unknown role: ' + message['role']) }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)

ROLES = ("system", "user", "assistant", "tool")


class ConversationError(ValueError):
    """A conversation record is malformed; the message says which field."""


@dataclass
class Rendered:
    tokens: list[int]
    mask: list[int]  # 1 where the token belongs to an assistant turn (the token is trained on)
    text: str


def validate_messages(messages: Any) -> list[dict]:
    """Check the fields the template reads, so a bad record fails with a readable reason."""
    if not isinstance(messages, list) or not messages:
        raise ConversationError("'messages' must be a non-empty list")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ConversationError(f"messages[{i}] is not an object")
        role = m.get("role")
        if role not in ROLES:
            raise ConversationError(f"messages[{i}].role is {role!r}, expected one of {list(ROLES)}")
        content = m.get("content")
        if content is None and not (role == "assistant" and m.get("tool_calls")):
            raise ConversationError(f"messages[{i}].content is missing")
        if content is not None and not isinstance(content, str):
            raise ConversationError(f"messages[{i}].content is not a string")
    if not any(m["role"] == "assistant" for m in messages):
        raise ConversationError("no assistant turn: nothing to train on")
    return messages


def resolve_template(tokenizer, chat_template: str = "apriel") -> str:
    """'apriel' -> the template above; 'tokenizer' -> the tokenizer's own; else a path to a .jinja file."""
    if chat_template == "apriel":
        return APRIEL_CHAT_TEMPLATE
    if chat_template == "tokenizer":
        if not getattr(tokenizer, "chat_template", None):
            raise ConversationError("the tokenizer has no chat_template; use --chat-template apriel")
        template = tokenizer.chat_template
    else:
        with open(chat_template, encoding="utf-8") as f:
            template = f.read()
    if "{% generation" not in template and "{%- generation" not in template:
        raise ConversationError(
            f"chat template {chat_template!r} has no {{% generation %}} block: the assistant mask "
            "cannot be derived from it; mark assistant turns with {% generation %}...{% endgeneration %}"
        )
    return template


def render(tokenizer, messages: Sequence[dict], template: str = APRIEL_CHAT_TEMPLATE,
           tools: Optional[list] = None) -> Rendered:
    """Tokens and assistant mask of one conversation (``tokenizer``: a transformers fast tokenizer)."""
    out = tokenizer.apply_chat_template(
        list(messages),
        chat_template=template,
        tools=tools,
        tokenize=True,
        return_dict=True,
        return_assistant_tokens_mask=True,
        add_generation_prompt=False,
    )
    text = tokenizer.apply_chat_template(list(messages), chat_template=template, tools=tools, tokenize=False)
    return Rendered(tokens=list(out["input_ids"]), mask=list(out["assistant_masks"]), text=text)
