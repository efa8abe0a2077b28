"""Time and peak memory of building the blend indices of a CPT stage at the paper's scale.

The Apriel-Nemotron CPT spec (examples/apriel_nemotron_15b/cpt_blend.yaml: 68B tokens at seq
16384, 60/25/15) is pointed at synthetic indexed datasets whose .idx files have the document
counts and length distributions of a realistic corpus (about 81M documents, 125B tokens); the .bin
files are sparse (their bytes are never read while indices are built). Each build runs in a fresh
process, cold (empty cache) then warm (cache hit), and reports its own wall time and peak RSS.

    python benchmarks/blend_index.py --root /tmp/blend_bench        # paper scale
    python benchmarks/blend_index.py --tiny data/tiny                # small real data for examples/tiny

The .idx files are written with numpy in megatron-core's layout (its header and dtype codes)
because its IndexedDatasetBuilder keeps every length in a Python list (tens of GB at 81M
documents); a small file is checked byte-for-byte against IndexedDatasetBuilder first.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import struct
import subprocess
import sys
import time

import numpy

HERE = os.path.dirname(os.path.abspath(__file__))
SPEC = os.path.join(HERE, "..", "examples", "apriel_nemotron_15b", "cpt_blend.yaml")

# prefix name (as in the spec) -> (tokens, mean document length): a corpus a CPT run could use
CORPUS = {
    "data/cpt/reasoning_math_text_document": (20e9, 7000),
    "data/cpt/reasoning_code_text_document": (15e9, 6000),
    "data/cpt/reasoning_science_text_document": (10e9, 5000),
    "data/cpt/cot_math_text_document": (12e9, 1500),
    "data/cpt/cot_general_text_document": (8e9, 1200),
    "data/replay/web_text_document": (40e9, 900),
    "data/replay/code_text_document": (12e9, 2500),
    "data/replay/books_text_document": (8e9, 60000),
}


def write_idx(idx_path: str, lengths: numpy.ndarray, dtype=numpy.int32) -> None:
    from megatron.core.datasets.indexed_dataset import _INDEX_HEADER, DType

    lengths = lengths.astype(numpy.int32)
    pointers = numpy.zeros(len(lengths), dtype=numpy.int64)
    numpy.cumsum(lengths[:-1].astype(numpy.int64) * numpy.dtype(dtype).itemsize, out=pointers[1:])
    doc_index = numpy.arange(len(lengths) + 1, dtype=numpy.int64)  # one sequence per document
    tmp = idx_path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(_INDEX_HEADER)
        f.write(struct.pack("<Q", 1))
        f.write(struct.pack("<B", DType.code_from_dtype(dtype)))
        f.write(struct.pack("<Q", len(lengths)))
        f.write(struct.pack("<Q", len(doc_index)))
        f.write(lengths.tobytes(order="C"))
        f.write(pointers.tobytes(order="C"))
        f.write(doc_index.tobytes(order="C"))
    os.replace(tmp, idx_path)


def check_writer(folder: str) -> None:
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    os.makedirs(folder, exist_ok=True)
    lengths = numpy.random.default_rng(0).integers(1, 50, 100)
    ref = os.path.join(folder, "ref")
    b = IndexedDatasetBuilder(ref + ".bin", dtype=numpy.int32)
    for n in lengths:
        b.add_item(torch.zeros(int(n), dtype=torch.int32))
        b.end_document()
    b.finalize(ref + ".idx")
    write_idx(os.path.join(folder, "ours.idx"), lengths)
    with open(ref + ".idx", "rb") as a, open(os.path.join(folder, "ours.idx"), "rb") as c:
        assert a.read() == c.read(), "the numpy .idx writer differs from megatron-core's"


def generate(root: str) -> list[tuple[str, int, int]]:
    rng = numpy.random.default_rng(0)
    rows = []
    for name, (tokens, mean) in CORPUS.items():
        prefix = os.path.join(root, name)
        os.makedirs(os.path.dirname(prefix), exist_ok=True)
        n = int(tokens // mean)
        # log-normal lengths (sigma 1) scaled to the mean: long tails like real documents
        lengths = numpy.maximum(1, rng.lognormal(0.0, 1.0, n) * (mean / numpy.exp(0.5))).astype(numpy.int64)
        lengths = numpy.minimum(lengths, 2**31 - 1)
        total = int(lengths.sum())
        if not os.path.exists(prefix + ".idx"):
            write_idx(prefix + ".idx", lengths)
            with open(prefix + ".bin", "wb") as f:
                f.truncate(total * 4)  # sparse: the index build never reads tokens
        rows.append((name, n, total))
        print(f"  {name}: {n:,} documents, {total:,} tokens", flush=True)
    return rows


def build_phase(root: str, cache: str, gbs: int) -> None:
    """Child process: build the stage's indices, print wall time and own peak RSS as JSON."""
    import dataclasses

    # megatron-core's import (torch.compile'd fusions) takes seconds and is not index work
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder  # noqa: F401

    from megatron_apriel.data.blends import build_datasets, train_samples_for
    from megatron_apriel.data.mix_report import load_spec

    spec, _ = load_spec(SPEC)
    spec = dataclasses.replace(
        spec,
        sources=[dataclasses.replace(s, prefixes=[os.path.join(root, p) for p in s.prefixes]) for s in spec.sources],
        cache_dir=cache,
    )
    t0 = time.perf_counter()
    train, _ = build_datasets(spec, gbs, valid_samples=0)
    wall = time.perf_counter() - t0
    n = train_samples_for(spec, gbs)
    idx = numpy.asarray(train.dataset_index[:n])
    counts = numpy.bincount(idx, minlength=len(train.datasets)) / n
    _ = train[n - 1]["tokens"]  # the last sample of the stage is reachable
    print(json.dumps({
        "wall_s": wall, "samples": n, "blend_len": len(train),
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "shares": counts.tolist(),
    }))


def tiny(folder: str) -> None:
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    os.makedirs(folder, exist_ok=True)
    rng = numpy.random.default_rng(0)
    for name, docs in [("reasoning_0", 300), ("reasoning_1", 200), ("cot_0", 300), ("replay_0", 400)]:
        prefix = os.path.join(folder, f"{name}_text_document")
        b = IndexedDatasetBuilder(prefix + ".bin", dtype=numpy.int32)
        for _ in range(docs):
            b.add_item(torch.from_numpy(rng.integers(1, 500, int(rng.integers(8, 200)))))
            b.end_document()
        b.finalize(prefix + ".idx")
        print(f"wrote {prefix}.bin/.idx ({docs} documents)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default="/tmp/blend_bench", help="where the synthetic corpus and cache go")
    ap.add_argument("--global-batch-size", type=int, default=512)
    ap.add_argument("--keep", action="store_true", help="keep the synthetic corpus and cache")
    ap.add_argument("--tiny", default=None, help="only write small real data for examples/tiny here")
    ap.add_argument("--build-phase", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.tiny:
        tiny(args.tiny)
        return 0
    cache = os.path.join(args.root, "cache")
    if args.build_phase:
        build_phase(args.root, cache, args.global_batch_size)
        return 0

    check_writer(os.path.join(args.root, "writer_check"))
    print("synthetic corpus (sparse .bin):", flush=True)
    t0 = time.perf_counter()
    rows = generate(args.root)
    t_gen = time.perf_counter() - t0
    shutil.rmtree(cache, ignore_errors=True)
    results = {}
    for phase in ("cold", "warm"):
        cmd = [sys.executable, os.path.abspath(__file__), "--build-phase", "--root", args.root,
               "--global-batch-size", str(args.global_batch_size)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True,
                             env=dict(os.environ, OMP_NUM_THREADS="1"))
        results[phase] = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{phase} build: {results[phase]['wall_s']:.1f} s", flush=True)
    cache_bytes = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(cache) for f in fs)
    idx_bytes = sum(os.path.getsize(os.path.join(args.root, n) + ".idx") for n in CORPUS)

    docs = sum(r[1] for r in rows)
    tokens = sum(r[2] for r in rows)
    r = results["cold"]
    print()
    print("| corpus | stage | build | wall (s) | peak RSS (GiB) | index cache (GiB) |")
    print("|---|---|---|---|---|---|")
    for phase in ("cold", "warm"):
        print(f"| {docs / 1e6:.1f}M docs, {tokens / 1e9:.0f}B tokens ({idx_bytes / 2**30:.1f} GiB .idx) "
              f"| {r['samples']:,} samples x 16384 (68B tokens) | {phase} | {results[phase]['wall_s']:.1f} "
              f"| {results[phase]['peak_rss_gb']:.2f} | {cache_bytes / 2**30:.2f} |")
    print(f"\nsynthetic corpus written in {t_gen:.1f} s; realised prefix shares {['%.4f' % s for s in r['shares']]}")
    if not args.keep:
        shutil.rmtree(args.root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
