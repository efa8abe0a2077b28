"""``apriel generate``: a quick look at an HF checkpoint (e.g. a converted one) with transformers.

Greedy by default; ``--temperature``/``--top-p`` sample. ``--chat`` renders each prompt as a user
turn through the tokenizer's chat template (``--chat-template apriel`` to use the Apriel one); text
in the prompt or system message that spells a control token is encoded as text.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Optional

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from megatron_apriel.data.chat_template import CHAT_TEMPLATES, default_chat_template, encode_prompts
from megatron_apriel.errors import InputError, cli_main
from megatron_apriel.hub import resolve_model


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="apriel generate", description=__doc__.split("\n")[0])
    ap.add_argument("--hf", required=True, help="HF model folder, or Hub repo id org/name[@revision]")
    ap.add_argument("--prompt", action="append", required=True, help="repeat for several prompts")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--chat", action="store_true", help="wrap each prompt as a user message")
    ap.add_argument("--chat-template", default=None,
                    help="'apriel', 'apriel-nemotron', 'apriel-1.5' or a .jinja file (default: the format of --preset, "
                         "else the tokenizer's)")
    ap.add_argument("--preset", default=None,
                    help="model preset of the checkpoint: its released model's chat format is the default template")
    ap.add_argument("--system", default=None, help="system message with --chat")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    return ap


@cli_main()
def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    args.hf = resolve_model(args.hf, "--hf")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    dtype = {"auto": "auto", "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    try:
        tok = AutoTokenizer.from_pretrained(args.hf)
        model = AutoModelForCausalLM.from_pretrained(args.hf, dtype=dtype).to(device).eval()
    except (OSError, ValueError) as e:  # not a model folder: transformers' own errors, named with the folder
        raise InputError(f"{args.hf}: {e}") from e
    if tok.pad_token is None:  # encode_prompts pads (left) a batch of prompts; one prompt needs no real pad
        tok.pad_token = tok.eos_token
    template = None
    if args.chat:
        args.chat_template = default_chat_template(args.chat_template, args.preset, fallback=None,
                                                   who="apriel generate")
    if args.chat_template in CHAT_TEMPLATES:
        template = CHAT_TEMPLATES[args.chat_template]
    elif args.chat_template:
        template = open(args.chat_template, encoding="utf-8").read()
    torch.manual_seed(args.seed)
    sample = args.temperature > 0
    kw = dict(max_new_tokens=args.max_new_tokens, do_sample=sample,
              pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    if sample:
        kw.update(temperature=args.temperature, top_p=args.top_p)
    for prompt in args.prompt:
        if args.chat:
            messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
                {"role": "user", "content": prompt}]
            ids = encode_prompts(tok, [messages], template)["input_ids"]  # text spelling <|end|> stays text
        else:
            ids = tok(prompt, return_tensors="pt").input_ids
        ids = ids.to(device)
        start = time.time()
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), **kw)
        new = out[0, ids.shape[1]:]
        secs = time.time() - start
        print(f"### prompt: {prompt}")
        print(tok.decode(new, skip_special_tokens=False))
        print(f"### {len(new)} tokens, {len(new) / max(secs, 1e-9):.1f} tokens/s ({'sampled' if sample else 'greedy'})",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
