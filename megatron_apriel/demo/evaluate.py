"""Held-out answer accuracy and format-reward rate of an HF checkpoint.

Generation is transformers' ``generate`` (greedy, batched, left padding); scoring is the GRPO
rewards of ``megatron_apriel.rl.rewards``, so "correct" here means what it means to GRPO. An answer
counts as correct only inside the Apriel final-response block (``[BEGIN FINAL RESPONSE]...``):
``math_reward`` alone would also accept the last number of a completion without the block.
"""

from __future__ import annotations

import json
from pathlib import Path


def load_test(path: Path, n: int | None = None) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return rows[:n] if n else rows


def evaluate(hf_dir: Path, test: list[dict], max_new_tokens: int = 72, batch_size: int = 32) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from megatron_apriel.data.chat_template import APRIEL_CHAT_TEMPLATE, encode_prompts
    from megatron_apriel.rl.rewards import final_response, format_reward, math_reward

    hf_logging.disable_progress_bar()  # one weight-loading bar per evaluated checkpoint is noise here
    tok = AutoTokenizer.from_pretrained(hf_dir)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    completions = []
    for i in range(0, len(test), batch_size):
        rows = test[i:i + batch_size]
        # questions that spell a control token stay text (see megatron_apriel.data.chat_template)
        enc = encode_prompts(tok, [[{"role": "user", "content": r["question"]}] for r in rows], APRIEL_CHAT_TEMPLATE)
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id,
                                 eos_token_id=tok.eos_token_id)
        completions += tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    correct = formatted = 0
    samples = []
    for r, c in zip(test, completions):
        fmt = format_reward(c).score
        ok = final_response(c) is not None and math_reward(c, answer=r["answer"]).score == 1.0
        formatted += fmt == 1.0
        correct += ok
        if len(samples) < 3:
            samples.append({"question": r["question"], "answer": r["answer"], "completion": c, "correct": ok})
    n = max(len(test), 1)
    return {"accuracy": correct / n, "format_rate": formatted / n, "n": len(test), "samples": samples}
