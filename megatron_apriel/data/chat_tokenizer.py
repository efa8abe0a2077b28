"""``apriel chat-tokenizer``: an HF tokenizer whose chat format's role tokens are single special tokens.

The Apriel formats open and close turns with ``<|system|>``, ``<|user|>``, ``<|assistant|>``,
``<|tool_result|>`` and ``<|end|>``. Mistral-Nemo's and Pixtral's Tekken vocabularies (and their HF
conversions) hold no such tokens, but reserve special-token slots (``<SPECIAL_20>`` ... up to id
999) for exactly this: the role tokens take the first free reserved slots, so every id, the
embedding matrix and the vocabulary size stay as they are. A token the tokenizer already has as a
special token keeps its id. Without this the template's role tokens would be encoded as several
text pieces, indistinguishable from a message that spells them.

    apriel chat-tokenizer --tokenizer Mistral-Nemo-Base-2407 --chat-template apriel-nemotron --out tok/

writes the tokenizer with the role tokens and the template (``chat_template.jinja``), what
``preprocess-sft --tokenizer-model`` and ``mcore-to-hf --tokenizer`` then take; ``mcore-to-hf
--chat-template NAME`` applies the same assignment to the tokenizer it exports.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from pathlib import Path
from typing import Optional, Sequence

from transformers import AutoTokenizer

from megatron_apriel.data.chat_template import CHAT_TEMPLATES, FORMAT_TOKENS
from megatron_apriel.errors import InputError, cli_main
from megatron_apriel.hub import resolve_model

RESERVED = re.compile(r"<SPECIAL_\d+>")


class ChatTokenizerError(InputError):
    """The tokenizer cannot hold the format's role tokens; the message says why."""


def role_tokens(template: str) -> list[str]:
    """The role tokens a template writes (in FORMAT_TOKENS order)."""
    return [t for t in FORMAT_TOKENS if t in template]


def assign_role_tokens(tok_dir: Path, tokens: Sequence[str]) -> dict[str, int]:
    """Give each of ``tokens`` that ``tok_dir``'s ``tokenizer.json`` lacks a free reserved special slot
    (in place, ``tokenizer_config.json`` kept in step); returns the ids of all ``tokens``."""
    tok_dir = Path(tok_dir)
    path = tok_dir / "tokenizer.json"
    if not path.is_file():
        raise ChatTokenizerError(f"{tok_dir}: no tokenizer.json (a fast HF tokenizer is needed)")
    data = json.loads(path.read_text(encoding="utf-8"))
    added = {t["content"]: t for t in data.get("added_tokens", [])}
    for t in tokens:
        if t in added and not added[t].get("special"):
            raise ChatTokenizerError(f"{path}: {t} is an added token but not a special one")
    missing = [t for t in tokens if t not in added]
    free = sorted((t for t in added.values() if t.get("special") and RESERVED.fullmatch(t["content"])),
                  key=lambda t: t["id"])
    if len(free) < len(missing):
        raise ChatTokenizerError(f"{path}: {len(missing)} role tokens ({', '.join(missing)}) but {len(free)} free "
                                 "reserved special-token slots (<SPECIAL_n>)")
    vocab = data.get("model", {}).get("vocab")
    renamed = {}
    for slot, token in zip(free, missing):
        if isinstance(vocab, dict) and slot["content"] in vocab:  # BPE/WordLevel vocabularies list them too
            vocab[token] = vocab.pop(slot["content"])
        renamed[str(slot["id"])] = token
        slot["content"] = token
    cfg_path = tok_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8")) if cfg_path.is_file() else None
    if cfg is not None:
        for tid, token in renamed.items():
            if tid in cfg.get("added_tokens_decoder", {}):
                cfg["added_tokens_decoder"][tid]["content"] = token
        cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    ids = {t["content"]: t["id"] for t in data["added_tokens"]}
    return {t: ids[t] for t in tokens}


def check_role_tokens(tokenizer, template: str, where: str) -> None:
    """Every role token the template writes must be one special token of ``tokenizer``."""
    specials = {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}
    lacking = [t for t in role_tokens(template) if t not in specials]
    if lacking:
        raise ChatTokenizerError(f"{where}: the tokenizer has no special token for {', '.join(lacking)}: the chat "
                                 "template's turns would be encoded as text; give them reserved slots with "
                                 "`apriel chat-tokenizer --tokenizer DIR --chat-template NAME --out DIR`")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="apriel chat-tokenizer", description=__doc__.split("\n")[0])
    p.add_argument("--tokenizer", required=True,
                   help="HF tokenizer folder (fast tokenizer, tokenizer.json) or Hub repo id")
    p.add_argument("--chat-template", required=True, choices=sorted(CHAT_TEMPLATES))
    p.add_argument("--out", required=True)
    return p


@cli_main(bad_input=(OSError, ValueError))  # OSError: not a tokenizer folder
def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    args.tokenizer = resolve_model(args.tokenizer, "--tokenizer")

    out = Path(args.out)
    tmp = out.with_name(out.name + ".tmp")
    template = CHAT_TEMPLATES[args.chat_template]
    try:
        AutoTokenizer.from_pretrained(args.tokenizer).save_pretrained(tmp)
        ids = assign_role_tokens(tmp, role_tokens(template))
        (tmp / "chat_template.jinja").write_text(template, encoding="utf-8")
        tok = AutoTokenizer.from_pretrained(tmp)
        check_role_tokens(tok, template, str(out))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # nothing half-written
        raise
    if out.exists():
        shutil.rmtree(out)
    tmp.replace(out)
    print(f"apriel chat-tokenizer: {args.chat_template} role tokens "
          + ", ".join(f"{t}={i}" for t, i in ids.items()) + f" (vocabulary size {len(tok)}) -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
