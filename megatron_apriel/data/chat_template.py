"""The Apriel chat template, and rendering conversations to tokens with an assistant-token mask.

The template is a Jinja chat template for HF tokenizers (``tokenizer.chat_template``), so training
data, ``apply_chat_template`` at serving time and vLLM all render the same bytes. Assistant turns sit
inside ``{% generation %}`` blocks: transformers then reports the character span of every assistant
turn while rendering and maps it onto tokens through the fast tokenizer's offsets
(``return_assistant_tokens_mask``). The loss mask therefore comes from the template's structure,
never from searching decoded text, and any HF template with generation blocks works the same way.
A template without them (the released models' templates) is rendered incrementally instead: an
assistant turn is what it adds to the conversation before it plus the generation prompt (see
:func:`assistant_spans`); on the Apriel template both derivations give the same mask.

Layout (RECIPE.md)::

    <|system|>\\n{system}\\n<|end|>\\n
    <|user|>\\n{user}\\n<|end|>\\n
    <|assistant|>\\nHere are my reasoning steps:\\n{reasoning}\\n
        [BEGIN FINAL RESPONSE]\\n{content}\\n[END FINAL RESPONSE]\\n<|end|>\\n   (one line, wrapped here)
    <|tool_result|>\\n{tool output}\\n<|end|>\\n

The mask covers an assistant turn from the first token after ``<|assistant|>\\n`` up to and
including its ``<|end|>``: the model learns to write the reasoning, the answer and to stop; the
role header and the newline that follows ``<|end|>`` are prompt. An assistant message without a
``reasoning`` (or ``reasoning_content``) field is rendered as its content alone. Tool calls
(``tool_calls``, OpenAI style) are written as JSON inside ``<tool_calls>...</tool_calls>`` in the
final response; available tools (``tools=``) are listed in the system turn.

Structure and content are kept apart when tokenizing: a message whose text spells a control token
(``<|assistant|>``, ``<|end|>``, ``</s>``...; chat logs and documents about chat templates do) must
not open or close a turn. :func:`encode_chat` encodes through transformers'
``apply_chat_template(..., sanitize_control_tokens=True)``: control-token strings inside messages,
tools and template variables become ordinary text tokens, and only the control tokens the template
writes itself stay control tokens. transformers does not combine that with the assistant mask, so
the mask is derived here from the same template spans, mapped onto the same token pieces (see
:func:`_marked_offsets`), and the ids are checked to equal transformers' before they are used.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from jinja2 import TemplateError

from megatron_apriel.errors import InputError

ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|tool_result|>", "<|end|>")
# the role tokens of every format below (Apriel-1.5's template also has a document turn, <|content|>)
FORMAT_TOKENS = (*ROLE_TOKENS, "<|content|>")

# Fragments both templates share: user and tool turns, and an assistant answer (reasoning when
# ``reasoning`` is set, the content, tool calls, the final-response markers).
_USER_AND_TOOL_TURNS = (
    "{%- elif message['role'] == 'user' %}"
    "{{ '<|user|>\\n' + message['content'] + '\\n<|end|>\\n' }}"
    "{%- elif message['role'] == 'tool' %}"
    "{{ '<|tool_result|>\\n' + message['content'] + '\\n<|end|>\\n' }}"
    "{%- elif message['role'] == 'assistant' %}"
    "{{ '<|assistant|>\\n' }}"
)
_REASONING = "{%- set reasoning = message.get('reasoning') or message.get('reasoning_content') %}"
_ANSWER = (
    "{%- if reasoning %}"
    "{{ 'Here are my reasoning steps:\\n' + reasoning + '\\n[BEGIN FINAL RESPONSE]\\n' }}"
    "{%- endif %}"
    "{{ message['content'] or '' }}"
    "{%- if message.get('tool_calls') %}"
    "{{ '\\n<tool_calls>' }}{{ message['tool_calls'] | tojson }}{{ '</tool_calls>' }}"
    "{%- endif %}"
    "{%- if reasoning %}{{ '\\n[END FINAL RESPONSE]' }}{% endif %}"
)
_UNKNOWN_ROLE_AND_END = (
    "{%- else %}"
    "{{ raise_exception('unknown role: ' + message['role']) }}"
    "{%- endif %}"
    "{%- endfor %}"
)

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
    + _USER_AND_TOOL_TURNS
    + "{%- generation %}" + _REASONING + _ANSWER + "{{ '\\n<|end|>' }}{%- endgeneration %}{{ '\\n' }}"
    + _UNKNOWN_ROLE_AND_END
    + "{%- if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)

# The released Apriel-Nemotron-15B-Thinker's format, written from its model card and public inference
# code: a built-in system prompt that the user's system text is appended to, a generation prompt that
# already starts the reasoning, and past assistant turns carried as their final response only. The
# reasoning of the last assistant turn (the one a training sample ends with) is rendered in full, so
# it is an extension of the generation prompt; a conversation with reasoning in earlier turns has no
# single rendering and SFT refuses it naming the turn (train on conversations ending at each turn).
# Not compared here with the released tokenizer_config's template file; tools are listed as in the
# Apriel template above.
NEMOTRON_SYSTEM_PROMPT = (
    "You are a thoughtful and systematic AI assistant built by ServiceNow Language Models (SLAM) lab. Before "
    "providing an answer, analyze the problem carefully and present your reasoning step by step. After explaining "
    "your thought process, provide the final solution in the following format: [BEGIN FINAL RESPONSE] ... "
    "[END FINAL RESPONSE]."
)

APRIEL_NEMOTRON_CHAT_TEMPLATE = (
    "{%- if bos_token is defined and bos_token %}{{ bos_token }}{% endif %}"
    "{%- set sys = messages[0]['content'] if messages and messages[0]['role'] == 'system' else '' %}"
    "{{ '<|system|>\\n" + NEMOTRON_SYSTEM_PROMPT + "' }}{{ sys }}"
    "{%- if tools %}{{ '\\n\\nAvailable tools:\\n' }}{{ tools | tojson }}{% endif %}"
    "{{ '\\n<|end|>\\n' }}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'system' %}"
    "{%- if not loop.first %}{{ raise_exception('a system message must come first') }}{% endif %}"
    + _USER_AND_TOOL_TURNS
    + _REASONING + "{%- set reasoning = reasoning if loop.last else '' %}" + _ANSWER + "{{ '\\n<|end|>\\n' }}"
    + _UNKNOWN_ROLE_AND_END
    + "{%- if add_generation_prompt %}{{ '<|assistant|>\\nHere are my reasoning steps:\\n' }}{% endif %}"
)

# The released Apriel-1.5-15B-Thinker's chat template, byte for byte: the ``chat_template`` of
# huggingface.co/ServiceNow-AI/Apriel-1.5-15b-Thinker as llama.cpp stores it for its template tests
# (models/templates/ServiceNow-AI-Apriel-1.5-15b-Thinker.jinja, written by its
# scripts/get_chat_template.py; copied from github.com/ochafik/llama.cpp at commit
# 1e7262be5b599b3a3c412f3f28a7754f6634a3af). Vendored rather than rewritten so every renderer
# (transformers, vLLM, llama.cpp) gives the official bytes, quirks included: its own role tokens
# ``<|system|>`` ``<|user|>`` ``<|assistant|>`` ``<|tool_result|>`` ``<|content|>`` ``<|end|>``, the
# built-in system prompt glued to the user's system text (a second system block when tools come
# without a system message), ``eos_token`` after every assistant turn, tool calls as
# ``<tool_calls>[{"name": ..., "arguments": ..., "id": ...}]</tool_calls>`` (no id on the last turn;
# arguments and tools printed with Jinja's ``string``, so pass arguments as a JSON string), and a
# generation prompt of ``<|assistant|>\n``: the model writes its reasoning and the final-response
# markers itself, so the assistant content carries them (see :func:`prepare_messages`).
APRIEL_15_CHAT_TEMPLATE = (Path(__file__).parent / "templates" / "apriel-1.5.jinja").read_text(encoding="utf-8")
APRIEL_15_SHA256 = "80ed97cbe0c6f2f1d8973154d38699572f4007c68d4e2fccde2be53205512feb"

# --chat-template names (everything else is a path to a .jinja file, or 'tokenizer')
CHAT_TEMPLATES = {"apriel": APRIEL_CHAT_TEMPLATE, "apriel-nemotron": APRIEL_NEMOTRON_CHAT_TEMPLATE,
                  "apriel-1.5": APRIEL_15_CHAT_TEMPLATE}

# The format the released model of a preset speaks, the default --chat-template wherever it has one;
# presets not listed keep the project's own template (or the command's own default).
PRESET_CHAT_TEMPLATES = {"apriel-nemotron-15b": "apriel-nemotron", "apriel-1.5-15b": "apriel-1.5"}


def default_chat_template(chat_template: Optional[str], preset: Optional[str], fallback: Optional[str] = "apriel",
                          who: str = "apriel") -> Optional[str]:
    """``chat_template`` when given, else the format of ``preset``'s released model, else ``fallback``;
    the choice is printed (stderr) so a run's log says which format its data or prompts are in."""
    if chat_template is not None:
        return chat_template
    name = PRESET_CHAT_TEMPLATES.get(preset or "", fallback)
    why = f"the format of model preset {preset}" if preset in PRESET_CHAT_TEMPLATES else "the default"
    print(f"{who}: chat template {name or 'of the tokenizer'} ({why}; --chat-template to change)", file=sys.stderr)
    return name


REASONING_START = "Here are my reasoning steps:\n"
# Templates that render an assistant turn as its content alone although the model writes reasoning
# first: a message's reasoning is folded into its content in the layout the model writes.
REASONING_IN_CONTENT = (APRIEL_15_CHAT_TEMPLATE,)


def prepare_messages(messages: Sequence[dict], template: Optional[str]) -> list[dict]:
    """The messages as ``template`` reads them. For the released Apriel-1.5 template, which has no
    reasoning field, an assistant message's ``reasoning`` (or ``reasoning_content``) is written into
    its content as ``Here are my reasoning steps:\n{reasoning}\n[BEGIN FINAL RESPONSE]\n{content}\n[END
    FINAL RESPONSE]`` (the Apriel layout, RECIPE.md) instead of being dropped; other templates read the
    fields themselves."""
    if template not in REASONING_IN_CONTENT:
        return list(messages)
    out = []
    for m in messages:
        reasoning = m.get("reasoning") or m.get("reasoning_content") if isinstance(m, dict) else None
        if reasoning and m.get("role") == "assistant":
            m = {k: v for k, v in m.items() if k not in ("reasoning", "reasoning_content")}
            m["content"] = (f"{REASONING_START}{reasoning}\n[BEGIN FINAL RESPONSE]\n{m.get('content') or ''}\n"
                            "[END FINAL RESPONSE]")
        out.append(m)
    return out

ROLES = ("system", "user", "assistant", "tool")


class ConversationError(InputError):
    """A conversation record is malformed; the message says which field."""


@dataclass
class Rendered:
    tokens: list[int]
    mask: list[int]  # 1 where the token belongs to an assistant turn (the token is trained on)
    text: str
    content_control_strings: int = 0  # control-token strings in the messages, encoded as text


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
    """A name of CHAT_TEMPLATES; 'tokenizer' -> the tokenizer's own; else a path to a .jinja file
    (with or without {% generation %} blocks, see :func:`assistant_spans`)."""
    if chat_template in CHAT_TEMPLATES:
        return CHAT_TEMPLATES[chat_template]
    if chat_template == "tokenizer":
        if not getattr(tokenizer, "chat_template", None):
            raise ConversationError("the tokenizer has no chat_template; use --chat-template apriel")
        template = tokenizer.chat_template
    else:
        with open(chat_template, encoding="utf-8") as f:
            template = f.read()
    return template  # without {% generation %} blocks the mask comes from incremental renders


def render(tokenizer, messages: Sequence[dict], template: str = APRIEL_CHAT_TEMPLATE,
           tools: Optional[list] = None) -> Rendered:
    """Tokens and assistant mask of one conversation (``tokenizer``: a transformers fast tokenizer);
    control-token strings inside the messages stay text (see :func:`encode_chat`)."""
    return encode_chat(tokenizer, messages, template, tools=tools)


# Passed to every apply_chat_template that encodes prompts (ours, and TRL's through its
# ``chat_template_kwargs``): text in a message that spells a control token is encoded as text.
SANITIZE = {"sanitize_control_tokens": True}


def encode_prompts(tokenizer, prompts: Sequence, template: Optional[str] = None):
    """Left-padded ``input_ids``/``attention_mask`` (torch) of generation prompts: a message list is
    rendered with ``template`` (default: the tokenizer's) and the generation prompt, its text's
    control-token strings kept as text; a string is taken as already rendered and encoded as it is.
    What ``apriel generate``, the evaluation and GRPO's pass-rate filter feed to ``generate``."""
    fmt = template or getattr(tokenizer, "chat_template", None)
    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] if isinstance(p, str) else
           tokenizer.apply_chat_template(prepare_messages(p, fmt), chat_template=template, add_generation_prompt=True,
                                         **SANITIZE)["input_ids"]
           for p in prompts]
    return tokenizer.pad({"input_ids": ids}, padding=True, padding_side="left", return_tensors="pt")


def control_token_pattern(tokenizer, template: str):
    """Regex of the strings the tokenizer would read as control tokens in text: its special tokens
    and the added tokens the template writes (transformers' own choice, ``_get_control_tokens``)."""
    # transformers is imported where a tokenizer is at hand: the chat formats themselves (CHAT_TEMPLATES,
    # default_chat_template) are read by light commands such as grpo-info
    from transformers.utils.chat_template_utils import _get_control_token_patterns

    return _get_control_token_patterns(tuple(tokenizer._get_control_tokens(template)))[0]


def count_control_strings(obj: Any, pattern) -> int:
    """Occurrences of control-token strings in every string of ``obj`` (messages, tools; keys skipped)."""
    if isinstance(obj, str):
        return len(pattern.findall(obj))
    if isinstance(obj, dict):
        return sum(count_control_strings(v, pattern) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(count_control_strings(v, pattern) for v in obj)
    return 0


def encode_chat(tokenizer, messages: Sequence[dict], template: str, tools: Optional[list] = None,
                add_generation_prompt: bool = False, last_turn_only: bool = False) -> Rendered:
    """Tokens, assistant mask and text of a conversation, content kept apart from structure.

    The mask covers the assistant spans of :func:`assistant_spans` (``last_turn_only``: the last one).
    ``Rendered.content_control_strings`` counts the control-token strings found in the messages and
    tools (encoded as text). Without any, the sanitizing is a no-op: the rendered string is tokenized
    as ``apply_chat_template`` does. A template that fails on the conversation (a released template
    reading a field the record lacks, e.g. Apriel-1.5's tool-call ``id``) raises a ConversationError
    saying so.
    """
    try:
        return _encode_chat(tokenizer, prepare_messages(messages, template), template, tools, add_generation_prompt,
                            last_turn_only)
    except TemplateError as e:
        raise ConversationError(f"the chat template cannot render this conversation: {type(e).__name__}: {e}") from None


def _encode_chat(tokenizer, messages: list[dict], template: str, tools: Optional[list], add_generation_prompt: bool,
                 last_turn_only: bool) -> Rendered:
    pattern = control_token_pattern(tokenizer, template)
    n_control = count_control_strings(messages, pattern) + count_control_strings(tools, pattern)
    if n_control == 0:
        text, spans = assistant_spans(tokenizer, messages, template, tools, add_generation_prompt, last_turn_only)
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        return Rendered(tokens=list(enc["input_ids"]), mask=_overlap_mask(enc["offset_mapping"], spans), text=text)
    text = tokenizer.apply_chat_template(messages, chat_template=template, tools=tools, tokenize=False,
                                         add_generation_prompt=add_generation_prompt)
    tokens = list(tokenizer.apply_chat_template(messages, chat_template=template, tools=tools, tokenize=True,
                                                return_dict=True, add_generation_prompt=add_generation_prompt,
                                                **SANITIZE)["input_ids"])
    marked, spans = assistant_spans(tokenizer, messages, template, tools, add_generation_prompt, last_turn_only,
                                    mark=pattern)
    ids, offsets = _marked_offsets(tokenizer, marked)
    if ids != tokens:  # the piece-wise encoding below must be transformers' own, token for token
        raise ConversationError("cannot derive the assistant mask of a conversation whose content spells control "
                                "tokens with this transformers version (its sanitized encoding changed)")
    return Rendered(tokens=tokens, mask=_overlap_mask(offsets, spans), text=text, content_control_strings=n_control)


GENERATION_BLOCK = re.compile(r"\{%-?\s*generation\s*-?%\}")


def assistant_spans(tokenizer, messages: Sequence[dict], template: str, tools: Optional[list] = None,
                    add_generation_prompt: bool = False, last_turn_only: bool = False,
                    mark=None) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant turns (what is trained on).

    A template with ``{% generation %}`` blocks says where they are while rendering. Any other
    template (the released models' ones) is rendered incrementally: assistant turn i is what
    rendering ``messages[:i+1]`` adds to ``messages[:i]`` with the generation prompt, up to its last
    non-blank character (what the template writes after the turn's end token separates turns; the
    model stops before it). Both renders must extend the previous text, else the turn has no
    well-defined span and a ConversationError names it. ``last_turn_only``: only the last assistant
    turn is a span, the earlier ones are context (one sample per turn, for templates that render the
    history differently from the turn being generated). ``mark``: a control-token pattern; the
    inputs are marked as ``sanitize_control_tokens`` marks them and the spans index that string.
    """
    from transformers.utils.chat_template_utils import (  # deferred: see control_token_pattern
        _normalize_chat_messages,
        mark_control_tokens,
        render_jinja_template,
    )

    chat = _normalize_chat_messages(list(messages))
    if mark is not None:
        chat, tools = mark_control_tokens(chat, mark), mark_control_tokens(tools, mark)

    def rendered(msgs, gen_prompt: bool, generation_spans: bool = False):
        # as apply_chat_template: the special-token variables are the template's own, never marked
        out = render_jinja_template(conversations=[msgs], tools=tools, chat_template=template,
                                    return_assistant_tokens_mask=generation_spans, add_generation_prompt=gen_prompt,
                                    **tokenizer.special_tokens_map)
        return out[0][0], (list(out[1][0]) if generation_spans else None)

    turns = [i for i, m in enumerate(chat) if m.get("role") == "assistant"]
    if GENERATION_BLOCK.search(template):
        text, spans = rendered(chat, add_generation_prompt, generation_spans=True)
        if last_turn_only and len(spans) != len(turns):
            raise ConversationError(f"the chat template's {{% generation %}} blocks ({len(spans)}) are not one per "
                                    f"assistant turn ({len(turns)})")
        return text, spans[-1:] if last_turn_only else spans
    text = rendered(chat, add_generation_prompt)[0]
    spans = []
    for i in turns[-1:] if last_turn_only else turns:
        prompt = rendered(chat[:i], True)[0]
        turn = rendered(chat[:i + 1], False)[0]
        if not turn.startswith(prompt):
            raise ConversationError(f"messages[{i}]: the chat template does not render this assistant turn as an "
                                    "extension of the generation prompt before it, so its span is undefined (a turn "
                                    "without the reasoning that the generation prompt starts?)")
        if not text.startswith(turn):
            raise ConversationError(f"messages[{i}]: the chat template renders this assistant turn differently once "
                                    "later messages follow (e.g. history without reasoning); train on conversations "
                                    "that end at this turn (preprocess-sft --split-turns)")
        spans.append((len(prompt), len(turn.rstrip())))
    return text, spans


def _marked_offsets(tokenizer, marked: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Ids and character offsets (into ``marked``) of transformers' ``encode_marked_chat``.

    The same pieces as there: the text between markers is encoded with added tokens matched, a
    marked control token as plain text, every piece after the first behind a newline that is then
    removed (so SentencePiece adds no prefix space). Kept in step with transformers by the equality
    check in :func:`encode_chat`.
    """
    from transformers.utils.chat_template_utils import _get_control_token_patterns  # see control_token_pattern

    markers = _get_control_token_patterns(tuple(tokenizer.added_tokens_encoder))[1]
    nl = tokenizer("\n", add_special_tokens=False)["input_ids"]
    ids: list[int] = []
    offsets: list[tuple[int, int]] = []

    def put(start: int, piece: str, as_text: bool, first: bool) -> None:
        enc = None
        if not first:
            enc = tokenizer("\n" + piece, add_special_tokens=False, split_special_tokens=as_text,
                            return_offsets_mapping=True)
            if enc["input_ids"][:len(nl)] == nl:
                ids.extend(enc["input_ids"][len(nl):])
                offsets.extend((start + a - 1, start + b - 1) for a, b in enc["offset_mapping"][len(nl):])
                return
        enc = tokenizer(piece, add_special_tokens=False, split_special_tokens=as_text, return_offsets_mapping=True)
        ids.extend(enc["input_ids"])
        offsets.extend((start + a, start + b) for a, b in enc["offset_mapping"])

    pos, first = 0, True
    for m in markers.finditer(marked):
        if marked[pos:m.start()] or first:
            put(pos, marked[pos:m.start()], False, first)
        first = False
        if m.group(1):
            put(m.start(1), m.group(1), True, False)
        pos = m.end()
    if marked[pos:] or first:
        put(pos, marked[pos:], False, first)
    return ids, offsets


def _overlap_mask(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]) -> list[int]:
    """1 for every token whose characters overlap a span (transformers' rule for the assistant mask)."""
    mask = [0] * len(offsets)
    k = 0
    for i, (a, b) in enumerate(offsets):
        while k < len(spans) and a >= spans[k][1]:
            k += 1
        if k == len(spans):
            break
        if b > spans[k][0]:
            mask[i] = 1
    return mask
