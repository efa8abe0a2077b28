"""SFT data: chat JSONL -> tokens + assistant loss masks as megatron-core indexed datasets (read in
training by :class:`megatron_apriel.data.sft.SFTDataset`).

``apriel preprocess-sft`` (``tools/preprocess_sft.py``) renders every conversation with a chat
template (the Apriel one by default, see :mod:`megatron_apriel.data.chat_template`), takes the
assistant-token mask from the template's ``{% generation %}`` blocks (or, for a template without them,
from incremental renders of the conversation), and writes two aligned
``IndexedDataset`` s with megatron-core's ``IndexedDatasetBuilder``:

* ``<prefix>_tokens_document.bin/.idx``   token ids (uint16 or int32 by vocabulary size);
* ``<prefix>_loss_mask_document.bin/.idx`` one uint8 per token: 1 = assistant token (trained on);
* ``<prefix>_report.json``                counts of kept, truncated and skipped conversations, and of
  the conversations whose text spells control tokens (kept, that text encoded as ordinary text).

With ``--split-turns`` every assistant turn becomes its own sample (the conversation up to it, only
that turn trained on), so ``kept`` counts samples. Malformed records are counted and skipped (each
named in the report) unless ``--strict`` is given, as in ``preprocess_data.py`` and ``preprocess-multimodal``.

Input records: ``{"messages": [{"role": "system|user|assistant|tool", "content": "...",
"reasoning": "..."(optional)}], "tools": [...] (optional), "id": ... (optional)}``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Optional

import numpy as np
from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder
from tqdm import tqdm
from transformers import AutoTokenizer

from megatron_apriel.config import atomic_write_text
from megatron_apriel.data.chat_template import (
    ConversationError,
    default_chat_template,
    encode_chat,
    render,
    resolve_template,
    validate_messages,
)
from megatron_apriel.data.chat_tokenizer import check_role_tokens
from megatron_apriel.data.preprocess import PreprocessError, check_inputs, print_control_text
from megatron_apriel.data.sft import MASK_KEY, TOKENS_KEY, dataset_paths
from megatron_apriel.errors import cli_main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="apriel preprocess-sft",
        description="Chat JSONL -> tokens + assistant loss masks (megatron-core indexed datasets).",
    )
    p.add_argument("--input", nargs="+", required=True, help="JSONL files with a 'messages' list per line")
    p.add_argument("--output-prefix", required=True)
    p.add_argument("--tokenizer-model", required=True, help="HF tokenizer directory (fast tokenizer)")
    p.add_argument("--chat-template", default=None,
                   help="'apriel', 'apriel-nemotron', 'apriel-1.5', 'tokenizer' (the tokenizer's own) or a .jinja file "
                        "(default: the format of --preset, else 'apriel'); assistant turns come from its "
                        "{%% generation %%} blocks, or without them from incremental renders")
    p.add_argument("--preset", default=None,
                   help="model preset the data is for: picks its released model's chat format by default "
                        "(apriel-nemotron-15b -> apriel-nemotron, apriel-1.5-15b -> apriel-1.5)")
    p.add_argument("--seq-length", type=int, default=None,
                   help="training length; longer conversations are dropped or truncated (--overlong)")
    p.add_argument("--overlong", choices=("drop", "truncate"), default="drop")
    p.add_argument("--split-turns", action="store_true",
                   help="one sample per assistant turn, ending at it and trained on it only (for templates that "
                        "render past turns differently, e.g. apriel-nemotron drops their reasoning)")
    p.add_argument("--strict", action="store_true",
                   help="stop at the first malformed record (default: count it, name it in the report, go on)")
    p.add_argument("--skip-bad", action="store_true", help="the default; kept for older command lines")
    p.add_argument("--subset-fraction", type=float, default=None,
                   help="keep this fraction of the records, stratified by --stratify-key (Apriel-1.5's 25%% run)")
    p.add_argument("--stratify-key", default="source",
                   help="record field whose values are the strata of --subset-fraction (missing = one stratum)")
    p.add_argument("--seed", type=int, default=0, help="seed of the stratified subset")
    p.add_argument("--log-interval", type=int, default=10000)
    return p


def _load_tokenizer(path: str):
    tok = AutoTokenizer.from_pretrained(path)
    if not getattr(tok, "is_fast", False):
        raise PreprocessError(f"{path}: a fast (tokenizers-backed) tokenizer is needed for token offsets")
    return tok


def stratified_subset(paths: list[str], key: str, fraction: float, seed: int) -> set[tuple[int, int]]:
    """(file index, line number) of exactly round(fraction * n) records of every stratum."""
    if not 0.0 < fraction <= 1.0:
        raise PreprocessError(f"--subset-fraction must be in (0, 1], got {fraction}")
    strata: dict[str, list[tuple[int, int]]] = {}
    for fi, path in enumerate(paths):
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    value = json.loads(line).get(key)
                except (ValueError, AttributeError):
                    value = None  # malformed records are reported by the main pass
                strata.setdefault(json.dumps(value), []).append((fi, lineno))
    rng = np.random.default_rng(seed)
    keep: set[tuple[int, int]] = set()
    for name in sorted(strata):
        items = strata[name]
        k = int(round(fraction * len(items)))
        keep.update(items[i] for i in rng.choice(len(items), size=k, replace=False))
    return keep


def _add_sample(tokens: list[int], mask: list[int], max_tokens: Optional[int], overlong: str, builders: dict,
                counts: dict, n_tokens: int, n_loss: int) -> tuple[int, int]:
    """Write one sample (or count why not); returns the updated token and loss-token totals."""
    if max_tokens is not None and len(tokens) > max_tokens:
        if overlong == "drop":
            counts["dropped_overlong"] += 1
            return n_tokens, n_loss
        tokens, mask = tokens[:max_tokens], mask[:max_tokens]
        counts["truncated"] += 1
    if not any(mask[1:]):  # position 0 is never a label
        counts["dropped_no_loss_tokens"] += 1
        return n_tokens, n_loss
    builders[TOKENS_KEY].add_document(np.asarray(tokens), [len(tokens)])
    builders[MASK_KEY].add_document(np.asarray(mask, dtype=np.uint8), [len(mask)])
    counts["kept"] += 1
    return n_tokens + len(tokens), n_loss + int(sum(mask))


def preprocess(args) -> dict:
    tokenizer = _load_tokenizer(args.tokenizer_model)
    args.chat_template = default_chat_template(args.chat_template, args.preset, who="preprocess-sft")
    template = resolve_template(tokenizer, args.chat_template)
    check_role_tokens(tokenizer, template, args.tokenizer_model)  # else turns would be encoded as text
    max_tokens = None if args.seq_length is None else args.seq_length + 1  # n tokens -> n-1 slots
    tok_dtype = DType.optimal_dtype(len(tokenizer))
    out_dir = os.path.dirname(os.path.abspath(args.output_prefix))
    os.makedirs(out_dir, exist_ok=True)
    final = {k: dataset_paths(args.output_prefix, k) for k in (TOKENS_KEY, MASK_KEY)}
    tmp = {k: v + f".tmp{os.getpid()}" for k, v in final.items()}
    builders = {
        TOKENS_KEY: IndexedDatasetBuilder(tmp[TOKENS_KEY] + ".bin", dtype=tok_dtype),
        MASK_KEY: IndexedDatasetBuilder(tmp[MASK_KEY] + ".bin", dtype=np.uint8),
    }
    subset = None
    if args.subset_fraction is not None:
        subset = stratified_subset(args.input, args.stratify_key, args.subset_fraction, args.seed)
    counts = {"not_in_subset": 0, "read": 0, "kept": 0, "truncated": 0, "dropped_overlong": 0,
              "dropped_no_loss_tokens": 0, "skipped_bad": 0, "with_control_token_text": 0, "control_token_strings": 0}
    skipped: list[str] = []
    n_tokens = n_loss = 0
    start = time.time()
    try:
        for fi, path in enumerate(args.input):
            with open(path, encoding="utf-8") as f:
                for lineno, line in enumerate(tqdm(f, desc=os.path.basename(path), unit=" conv",
                                                   mininterval=2.0, disable=None), start=1):
                    if not line.strip():
                        continue
                    counts["read"] += 1
                    if subset is not None and (fi, lineno) not in subset:
                        counts["not_in_subset"] += 1
                        continue
                    try:
                        record = json.loads(line)
                        if not isinstance(record, dict):
                            raise ConversationError("record is not a JSON object")
                        messages = validate_messages(record.get("messages"))
                        if args.split_turns:  # one sample per assistant turn, ending at it and trained on it
                            ends = [i + 1 for i, m in enumerate(messages) if m["role"] == "assistant"]
                            samples = [encode_chat(tokenizer, messages[:n], template, tools=record.get("tools"),
                                                   last_turn_only=True) for n in ends]
                        else:
                            samples = [render(tokenizer, messages, template, tools=record.get("tools"))]
                    except (ValueError, KeyError, TypeError) as e:  # JSONDecodeError is a ValueError
                        where = f"{path}:{lineno}"
                        if args.strict:
                            raise PreprocessError(f"{where}: {e}") from None
                        counts["skipped_bad"] += 1
                        skipped.append(f"{where}: {e}")
                        continue
                    n_control = samples[-1].content_control_strings  # the last sample holds every turn
                    if n_control:  # kept: that text is encoded as text (see chat_template)
                        counts["with_control_token_text"] += 1
                        counts["control_token_strings"] += n_control
                    for r in samples:
                        n_tokens, n_loss = _add_sample(r.tokens, r.mask, max_tokens, args.overlong, builders, counts,
                                                       n_tokens, n_loss)
                    if args.log_interval and counts["read"] % args.log_interval == 0:
                        rate = counts["read"] / max(time.time() - start, 1e-9)
                        print(f"[preprocess-sft] {counts['read']} conversations, {rate:.0f}/s", file=sys.stderr)
        for key in (TOKENS_KEY, MASK_KEY):
            builders[key].finalize(tmp[key] + ".idx")
    except BaseException:
        for key in tmp:
            for ext in (".bin", ".idx"):
                if os.path.exists(tmp[key] + ext):
                    os.remove(tmp[key] + ext)
        raise
    for key in (TOKENS_KEY, MASK_KEY):
        for ext in (".bin", ".idx"):
            os.replace(tmp[key] + ext, final[key] + ext)
    report = {
        **counts,
        "tokens": n_tokens,
        "loss_tokens": n_loss,
        "loss_token_fraction": n_loss / max(n_tokens, 1),
        "chat_template": args.chat_template,
        "seq_length": args.seq_length,
        "overlong": args.overlong,
        "split_turns": args.split_turns,
        "subset_fraction": args.subset_fraction,
        "stratify_key": args.stratify_key if args.subset_fraction is not None else None,
        "skipped_records": skipped[:1000],
        "outputs": list(final.values()),
        "seconds": round(time.time() - start, 2),
    }
    atomic_write_text(f"{args.output_prefix}_report.json", json.dumps(report, indent=2) + "\n")
    return report


@cli_main()
def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    check_inputs(args.input, exists=os.path.exists)
    report = preprocess(args)
    print(
        f"preprocess-sft: read {report['read']}, kept {report['kept']} ({report['truncated']} truncated), "
        f"dropped {report['dropped_overlong']} overlong + {report['dropped_no_loss_tokens']} without "
        f"assistant tokens, skipped {report['skipped_bad']} malformed; {report['tokens']} tokens, "
        + (f"{report['not_in_subset']} left out of the stratified subset; " if args.subset_fraction else "")
        + f"{100 * report['loss_token_fraction']:.1f}% trained on -> {args.output_prefix}_*_document.bin/.idx"
    )
    print_control_text("preprocess-sft", report, "conversations")
    return 0


if __name__ == "__main__":
    sys.exit(main())
