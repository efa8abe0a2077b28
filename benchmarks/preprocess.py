"""Speed and memory of tools/preprocess_data.py against Megatron-LM's per-document loop.

The corpus is real text this project did not write: the Python standard library's sources, one
JSONL document per module, repeated until the file reaches ``--mb`` megabytes (cached in the temp
folder). Both tools run with the Mistral-Nemo Tekken tokenizer and ``--append-eod``; the naive
baseline is Megatron-LM's ``tools/preprocess_data.py`` loop: ``Pool.imap(encode, lines, 32)``, one
``json.loads`` and one megatron-core ``TikTokenTokenizer`` call per document, and
``builder.add_item(torch.IntTensor(ids))`` in the main process. Peak RSS is the sum over the tool's
process tree, sampled every 50 ms (forked workers share pages, so it over-counts); CPU s is the
user + system time of the tree, which other load on the machine does not inflate. The last row is
the tiktoken core alone over the corpus: the floor for any tool using this tokenizer.

    python benchmarks/preprocess.py [--mb 200] [--workers 1 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def build_corpus(path: Path, megabytes: int) -> Path:
    if path.exists() and path.stat().st_size >= megabytes * 1e6:
        return path
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    sources = sorted(p for p in stdlib.rglob("*.py") if "site-packages" not in p.parts)
    docs = []
    for p in sources:
        try:
            text = p.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if text.strip():
            docs.append(json.dumps({"text": text, "source": str(p.relative_to(stdlib))}) + "\n")
    tmp = path.with_suffix(".tmp")
    written = 0
    with open(tmp, "w", encoding="utf-8") as f:
        while written < megabytes * 1e6:
            for d in docs:
                f.write(d)
                written += len(d.encode("utf-8"))
                if written >= megabytes * 1e6:
                    break
    os.replace(tmp, path)
    return path


_TOK = None


class _MegatronTikToken:
    """megatron-core's TikTokenTokenizer as Megatron-LM builds it for a Tekken file (ranks shifted by
    the 1000 special tokens, ``encode(text, allowed_special="all")``); rebuilt here because
    megatron-core 0.16's loader only reads the older list-shaped Tekken files."""

    def __init__(self):
        import base64

        import tiktoken

        from megatron_apriel.data.tokenizers import resolve_tekken

        data = json.loads(resolve_tekken("mistral-nemo").read_text(encoding="utf-8"))
        n_special, vocab = 1000, 131072
        ranks = {base64.b64decode(x["token_bytes"]): x["rank"] + n_special for x in data["vocab"][: vocab - n_special]}
        specials = {f"<SPECIAL_{i}>": i for i in range(n_special)}
        self.enc = tiktoken.Encoding("tekken", pat_str=data["config"]["pattern"], mergeable_ranks=ranks,
                                     special_tokens=specials)
        self.eod = 2

    def text_to_ids(self, text):
        return self.enc.encode(text, allowed_special="all")


def _encode(line):
    ids = _TOK.text_to_ids(json.loads(line)["text"])
    ids.append(_TOK.eod)
    return ids, len(line)


def naive(argv: list[str]) -> int:
    """Megatron-LM's preprocess_data.py loop (documents, no sentence splitting)."""
    import multiprocessing

    import torch
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    inp, prefix, workers = argv[0], argv[1], int(argv[2])
    tok = _MegatronTikToken()

    global _TOK
    _TOK = tok
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=DType.optimal_dtype(131072))
    with open(inp, encoding="utf-8") as fin, multiprocessing.get_context("fork").Pool(workers) as pool:
        for ids, _ in pool.imap(_encode, fin, 32):
            builder.add_item(torch.IntTensor(ids))
            builder.end_document()
    builder.finalize(prefix + ".idx")
    return 0


def tokenizer_alone(corpus: Path) -> tuple[int, float]:
    """(tokens, CPU seconds) of the tiktoken core alone over the corpus, in this process.

    A floor for any tool that uses this tokenizer: what is left above it is overhead.
    """
    from megatron_apriel.data.tokenizers import load_tokenizer

    tok = load_tokenizer("TikTokenizer", "mistral-nemo")
    tokens, cpu = 0, 0.0
    with open(corpus, "rb") as f:
        for line in f:
            text = json.loads(line)["text"]
            t0 = time.process_time()
            tokens += len(tok._core.encode_ordinary(text)) + 1
            cpu += time.process_time() - t0
    return tokens, cpu


def measure(cmd: list[str]) -> tuple[float, float, float]:
    """(seconds, peak RSS MB summed over the process tree, CPU seconds of the tree)."""
    import resource

    import psutil

    before = resource.getrusage(resource.RUSAGE_CHILDREN)

    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ps = psutil.Process(proc.pid)
    peak = 0
    while proc.poll() is None:
        try:
            rss = ps.memory_info().rss + sum(c.memory_info().rss for c in ps.children(recursive=True))
            peak = max(peak, rss)
        except psutil.Error:
            pass
        time.sleep(0.05)
    seconds = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)  # includes the pool workers, once reaped
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr.read().decode()[-3000:]}")
    return seconds, peak / 2**20, cpu


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--naive-run":
        return naive(sys.argv[2:])
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mb", type=int, default=200, help="corpus size in MB")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "megatron_apriel_bench"))
    args = ap.parse_args()

    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    corpus = build_corpus(cache / f"stdlib_{args.mb}mb.jsonl", args.mb)
    size = corpus.stat().st_size
    with open(corpus, "rb") as f:
        n_docs = sum(1 for _ in f)
    print(f"corpus {corpus}: {size / 1e6:.0f} MB, {n_docs:,} documents ({time.perf_counter() - t0:.1f}s to build/check); "
          f"{os.cpu_count()} CPUs", flush=True)

    rows = []
    for w in args.workers:
        for name in ("naive", "ours"):
            prefix = str(cache / f"out_{name}_{w}")
            if name == "ours":
                cmd = [sys.executable, "tools/preprocess_data.py", "--input", str(corpus), "--output-prefix", prefix,
                       "--tokenizer-type", "TikTokenizer", "--tokenizer-model", "mistral-nemo", "--append-eod",
                       "--workers", str(w), "--quiet"]
                bin_path = prefix + "_text_document.bin"
            else:
                cmd = [sys.executable, __file__, "--naive-run", str(corpus), prefix, str(w)]
                bin_path = prefix + ".bin"
            seconds, rss, cpu = measure(cmd)
            from megatron.core.datasets.indexed_dataset import IndexedDataset

            ds = IndexedDataset(bin_path[:-4])
            tokens = int(ds.sequence_lengths.sum())
            rows.append((name, w, len(ds), tokens, seconds, rss, cpu))
            print(f"  {name} workers={w}: {seconds:.1f}s", flush=True)

    tok_alone, cpu_alone = tokenizer_alone(corpus)
    print(f"\n| tool | workers | documents | tokens | seconds | docs/s | tokens/s | MB/s | CPU s | peak RSS MB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    base = {w: tok / s for name, w, _, tok, s, _, _ in rows if name == "naive"}
    for name, w, docs, tok, s, rss, cpu in rows:
        speed = f" ({tok / s / base[w]:.2f}x naive)" if name == "ours" and w in base else ""
        print(f"| {name} | {w} | {docs:,} | {tok:,} | {s:.1f} | {docs / s:,.0f} | {tok / s:,.0f}{speed} | "
              f"{size / 1e6 / s:.1f} | {cpu:.1f} | {rss:,.0f} |")
    print(f"| tiktoken core alone (CPU time) | 1 | {n_docs:,} | {tok_alone:,} | {cpu_alone:.1f} | "
          f"{n_docs / cpu_alone:,.0f} | {tok_alone / cpu_alone:,.0f} | {size / 1e6 / cpu_alone:.1f} | {cpu_alone:.1f} | - |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
