"""Format reward: reasoning first, then exactly one ``[BEGIN FINAL RESPONSE]...[END FINAL RESPONSE]``.

Both released formats are accepted. Apriel-Nemotron's generation prompt ends with ``Here are my
reasoning steps:\n``, so a completion starts inside the reasoning; Apriel-1.5's generation prompt is
``<|assistant|>\n`` and the model writes that line itself (pass it as ``reasoning_prefix`` to require
it), and its turn ends with ``<|end|>\n</s>``.
"""

from __future__ import annotations

from .base import BEGIN, END, Reward, completion_text, is_turn_end


def format_reward(completion, required_tags=(), reasoning_prefix: str = "", min_reasoning_chars: int = 1,
                  **_) -> Reward:
    text = completion_text(completion)
    if reasoning_prefix:
        if not text.lstrip().startswith(reasoning_prefix):
            return Reward(0.0, f"does not start with {reasoning_prefix!r}")
        text = text.lstrip()[len(reasoning_prefix):]
    n_begin, n_end = text.count(BEGIN), text.count(END)
    if n_begin != 1 or n_end != 1:
        return Reward(0.0, f"expected one {BEGIN} and one {END}, found {n_begin} and {n_end}")
    b, e = text.index(BEGIN), text.index(END)
    if e < b:
        return Reward(0.0, f"{END} comes before {BEGIN}")
    reasoning, response, tail = text[:b].strip(), text[b + len(BEGIN):e].strip(), text[e + len(END):].strip()
    if len(reasoning) < min_reasoning_chars:
        return Reward(0.0, "no reasoning before the final response")
    if not response:
        return Reward(0.0, "empty final response")
    if not is_turn_end(tail):
        return Reward(0.0, f"text after {END}: {tail[:40]!r}")
    for tag in required_tags or ():
        name = tag.strip("<>/")
        opening, closing = f"<{name}>", f"</{name}>"
        if response.count(opening) != 1 or response.count(closing) != 1 or \
                response.index(closing) < response.index(opening):
            return Reward(0.0, f"final response lacks one well-formed {opening}...{closing}")
    return Reward(1.0, "well-formed")
