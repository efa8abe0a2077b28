"""Join several indexed datasets into one with megatron-core's ``IndexedDatasetBuilder.add_index``.

Megatron-LM's ``tools/merge_datasets.py`` flags: ``--input`` (a folder of ``.bin/.idx`` pairs, or
explicit prefixes), ``--output-prefix``. The merged files appear only when complete.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder, _IndexReader

from megatron_apriel.errors import EXIT_ERROR, cli_main


def find_prefixes(inputs: list[str]) -> list[str]:
    prefixes: list[str] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(str(q)[:-4] for q in p.iterdir() if q.name.endswith(".idx"))
            if not found:
                raise FileNotFoundError(f"{item}: no .idx files in this folder")
            prefixes += found
        else:
            prefix = item[:-4] if item.endswith((".idx", ".bin")) else item
            prefixes.append(prefix)
    for prefix in prefixes:
        for ext in (".idx", ".bin"):
            if not os.path.isfile(prefix + ext):
                raise FileNotFoundError(f"{prefix}{ext}: missing (every dataset needs .bin and .idx)")
    return prefixes


def merge(prefixes: list[str], out_prefix: str) -> tuple[int, int]:
    """Returns (documents, tokens) of the merged dataset."""
    dtypes = {}
    for prefix in prefixes:
        dtypes[prefix] = _IndexReader(prefix + ".idx", multimodal=False).dtype
    if len(set(dtypes.values())) > 1:
        detail = ", ".join(f"{p}: {np_dtype.__name__}" for p, np_dtype in dtypes.items())
        raise ValueError(f"datasets have different token dtypes (different tokenizers?): {detail}")
    Path(out_prefix).parent.mkdir(parents=True, exist_ok=True)
    tmp_bin, tmp_idx = out_prefix + ".bin.tmp", out_prefix + ".idx.tmp"
    builder = IndexedDatasetBuilder(tmp_bin, dtype=dtypes[prefixes[0]])
    try:
        for i, prefix in enumerate(prefixes):
            builder.add_index(prefix)
            print(f"[merge] {i + 1}/{len(prefixes)} {prefix}", file=sys.stderr, flush=True)
        builder.finalize(tmp_idx)
        os.replace(tmp_bin, out_prefix + ".bin")
        os.replace(tmp_idx, out_prefix + ".idx")
    except BaseException:
        builder.data_file.close()
        for p in (tmp_bin, tmp_idx):
            if os.path.exists(p):
                os.remove(p)
        raise
    return len(builder.document_indices) - 1, int(sum(builder.sequence_lengths))


# Megatron-LM's tool of this name exits 1 on any error, so this one does too
@cli_main(bad_input=(FileNotFoundError, ValueError), bad_input_exit=EXIT_ERROR)
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="merge_datasets.py", description=__doc__.split("\n")[0])
    p.add_argument("--input", nargs="+", required=True,
                   help="a folder of .bin/.idx pairs, or dataset prefixes (in order)")
    p.add_argument("--output-prefix", required=True, help="writes <prefix>.bin and <prefix>.idx")
    args = p.parse_args(argv)
    prefixes = find_prefixes(args.input)
    docs, tokens = merge(prefixes, args.output_prefix)
    print(f"[merge] {len(prefixes)} datasets -> {args.output_prefix}: {docs:,} documents, {tokens:,} tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
