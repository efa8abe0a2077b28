"""Speed and memory of tools/preprocess_data.py against Megatron-LM's per-document loop.

The corpus is real text this project did not write: the Python standard library's sources, one
JSONL document per module, repeated until the file reaches ``--mb`` megabytes (cached in the temp
folder). Every tool runs with the Mistral-Nemo Tekken tokenizer and ``--append-eod``. The naive
baselines are Megatron-LM's ``tools/preprocess_data.py`` loop: ``Pool.imap(encoder.encode, fin,
32)``, one ``json.loads`` and one tokenizer call per document returning a list of ints, and
``builder.add_document(ids, lengths)`` in the main process; ``naive`` calls megatron-core's
``TikTokenTokenizer.text_to_ids`` (``encode(text, allowed_special="all")``, what the current tool
uses), ``naive-legacy`` Megatron-LM's older ``CustomTikTokenizer.tokenize`` (``encode_ordinary``,
the same ids as ours, so its output must be byte-identical to ours). Peak RSS is the sum over the
tool's process tree, sampled every 50 ms (forked workers share pages, so it over-counts); CPU s is
the user + system time of the tree, which other load on the machine does not inflate, so the CPU
ratio is the one to trust on a shared machine. Ours uses the compiled Tekken path
(``megatron_apriel/data/_tekken_fast.c``) when it is built; ``MEGATRON_APRIEL_TEKKEN_FAST=0`` runs
it on tiktoken alone. The last rows are the tokenizer cores alone over the corpus (CPU time, in
this process): tiktoken's ``encode_ordinary``, the floor of the naive tools, and the compiled path.

``--corpus web`` mixes that with prose (the Python documentation's, from pydoc) and, after every 300
documents, one line of the kinds web crawls hold that make single huge pre-tokenized pieces: long
runs of one character, padded table rows, base64 blobs, minified sources, very long documents.
``--long-pieces`` times one piece of growing length alone, compiled path against tiktoken.

    python benchmarks/preprocess.py [--mb 200] [--corpus stdlib|web] [--workers 1 2]
                                    [--tools naive naive-legacy ours] [--verify]
    python benchmarks/preprocess.py --long-pieces
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _stdlib_sources() -> list[tuple[str, str]]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for p in sorted(p for p in stdlib.rglob("*.py") if "site-packages" not in p.parts):
        try:
            text = p.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if text.strip():
            docs.append((text, str(p.relative_to(stdlib))))
    return docs


def _web_documents(seed: int = 0):
    """Endless documents like a web crawl's: the Python documentation's prose (pydoc's topics) and
    the stdlib's sources, and after every 300 of them one of the
    lines that real crawls hold and that are single huge pieces to the pre-tokenizer: a long run
    of one character, a padded table row, a base64 blob, a minified source, a very long document.
    Blank runs stay under 500,000 characters: from about a million, tiktoken's regex engine (and so
    Megatron-LM's tool, the baseline) fails on them."""
    import base64
    import random
    import re
    from pydoc_data.topics import topics

    rng = random.Random(seed)
    prose = [(text, f"pydoc:{name}") for name, text in sorted(topics.items())]
    sources = _stdlib_sources()
    big_sources = [d for d in sources if len(d[0]) > 20_000]
    everything = "\n\n".join(t for t, _ in prose)

    def long_run():
        return rng.choice("xX0-=.\né中") * rng.randint(50_000, 2_000_000), "long run"

    def table_row():
        return "| name | " + rng.choice(" \t") * rng.randint(20_000, 500_000) + "| value |\n", "padded table"

    def blob():
        data = base64.b64encode(rng.randbytes(rng.randint(30_000, 1_500_000))).decode()
        return f'<img src="data:image/png;base64,{data}">', "base64 blob"

    def minified():
        text, src = rng.choice(big_sources)
        return re.sub(r"\s+", " ", text), f"minified {src}"

    def very_long():
        return everything * rng.randint(4, 12), "very long document"

    kinds = [long_run, table_row, blob, minified, very_long]
    k = 0
    while True:
        for _ in range(300):  # three prose documents (6 kB on average) for one source (20 kB)
            yield rng.choice(prose if rng.random() < 0.75 else sources)
        yield kinds[k % len(kinds)]()
        k += 1


def build_corpus(path: Path, megabytes: int, kind: str = "stdlib") -> Path:
    if path.exists() and path.stat().st_size >= megabytes * 1e6:
        return path
    if kind == "web":
        docs = _web_documents()
    else:
        docs = itertools.cycle(_stdlib_sources())
    tmp = path.with_suffix(".tmp")
    written = 0
    with open(tmp, "w", encoding="utf-8") as f:
        for text, source in docs:
            d = json.dumps({"text": text, "source": source}) + "\n"
            f.write(d)
            written += len(d.encode("utf-8"))
            if written >= megabytes * 1e6:
                break
    os.replace(tmp, path)
    return path


def long_pieces() -> None:
    """The compiled path and tiktoken on one pre-tokenized piece of growing length (CPU seconds)."""
    from megatron_apriel.data.tokenizers import load_tokenizer

    tok = load_tokenizer("TikTokenizer", "mistral-nemo")
    lengths = [12_500, 100_000, 1_000_000, 4_000_000]
    print("\n| piece | path | " + " | ".join(f"{n:,} chars" for n in lengths) + " |")
    print("|---|---|" + "---|" * len(lengths))
    cores = [("tiktoken", tok._core.encode_ordinary)]
    if tok._fast is not None:
        cores.append(("compiled", tok._fast.encode))
    for unit, label in [("x", "`x` repeated"), ("ab", "`ab` repeated"), (" ", "spaces, then `x`")]:
        for name, encode in cores:
            cells = []
            for n in lengths:
                text = unit * (n // len(unit)) + ("x" if unit == " " else "")
                t0 = time.process_time()
                try:
                    encode(text)
                    cells.append(f"{time.process_time() - t0:.3f} s")
                except BaseException as e:  # tiktoken's Rust panic is a BaseException
                    if isinstance(e, (KeyboardInterrupt, SystemExit)):
                        raise
                    cells.append("fails")
            print(f"| {label} | {name} | " + " | ".join(cells) + " |", flush=True)


_TOK = None
_EOD = 2  # "</s>" in both Megatron tokenizers and in Tekken


class _MegatronTikToken:
    """The tiktoken ``Encoding`` Megatron-LM builds for a Tekken file: ranks shifted by 1000
    special-token ids, the file's split pattern (Megatron-LM's ``v2``).

    ``call="core"`` is megatron-core's ``TikTokenTokenizer.text_to_ids`` (what the current
    ``tools/preprocess_data.py`` calls through ``megatron.core.tokenizers``):
    ``encode(text, allowed_special="all")`` with its special tokens ``<unk> <s> </s> <mask> <pad>
    <cls> <sep>`` and ``<SPECIAL_i>`` fillers. ``call="legacy"`` is
    ``megatron.training.tokenizer.CustomTikTokenizer.tokenize``: ``encode_ordinary(text)``.
    Rebuilt here because megatron-core 0.16's loader only reads the older list-shaped Tekken files.
    """

    def __init__(self, call: str):
        import base64

        import tiktoken

        from megatron_apriel.data.tokenizers import resolve_tekken

        data = json.loads(resolve_tekken("mistral-nemo").read_text(encoding="utf-8"))
        n_special, vocab = 1000, 131072
        ranks = {base64.b64decode(x["token_bytes"]): x["rank"] + n_special for x in data["vocab"][: vocab - n_special]}
        names = ["<unk>", "<s>", "</s>", "<mask>", "<pad>", "<cls>", "<sep>"]
        names += [f"<SPECIAL_{i}>" for i in range(len(names), n_special)]
        self.enc = tiktoken.Encoding("tekken", pat_str=data["config"]["pattern"], mergeable_ranks=ranks,
                                     special_tokens={t: i for i, t in enumerate(names)})
        self.tokenize = self._core if call == "core" else self.enc.encode_ordinary
        self.eod = _EOD

    def _core(self, text):
        return self.enc.encode(text, allowed_special="all")


def _encode(line):
    """Megatron-LM's ``Encoder.encode`` for one document key, no sentence splitting."""
    data = json.loads(line)
    ids = _TOK.tokenize(data["text"])
    lens = [len(ids)] if ids else []
    if ids:
        ids.append(_TOK.eod)
        lens[-1] += 1
    return {"text": ids}, {"text": lens}, len(line)


def naive(argv: list[str]) -> int:
    """Megatron-LM's ``tools/preprocess_data.py`` loop: ``Pool.imap(encoder.encode, fin, 32)`` and
    ``builder.add_document(ids, lengths)`` per document in the main process."""
    import multiprocessing

    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    inp, prefix, workers, call = argv[0], argv[1], int(argv[2]), argv[3]

    global _TOK
    _TOK = _MegatronTikToken(call)
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=DType.optimal_dtype(131072))
    with open(inp, encoding="utf-8") as fin, multiprocessing.get_context("fork").Pool(workers) as pool:
        for doc, lens, _ in pool.imap(_encode, fin, 32):
            for key in doc:
                builder.add_document(doc[key], lens[key])
    builder.finalize(prefix + ".idx")
    return 0


def tokenizer_alone(corpus: Path) -> list[tuple[str, int, float]]:
    """(name, tokens, CPU seconds) of each tokenizer core alone over the corpus, in this process.

    A floor for any tool that uses it: what is left above it is overhead.
    """
    from megatron_apriel.data.tokenizers import load_tokenizer

    tok = load_tokenizer("TikTokenizer", "mistral-nemo")
    cores = [("tiktoken encode_ordinary", tok._core.encode_ordinary)]
    if tok._fast is not None:
        cores.append(("compiled _tekken_fast", tok._fast.encode))
    rows = []
    for name, encode in cores:
        tokens, cpu = 0, 0.0
        with open(corpus, "rb") as f:
            for line in f:
                text = json.loads(line)["text"]
                t0 = time.process_time()
                tokens += len(encode(text)) + 1
                cpu += time.process_time() - t0
        rows.append((name, tokens, cpu))
    return rows


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


def verify_against_mistral_common(corpus: Path, prefix: str) -> int:
    """Documents of ``prefix`` that differ from mistral-common's ``Tekkenizer.encode`` + EOD."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    from mistral_common.tokens.tokenizers.tekken import Tekkenizer

    from megatron_apriel.data.tokenizers import resolve_tekken

    tk = Tekkenizer.from_file(resolve_tekken("mistral-nemo"))
    ds = IndexedDataset(prefix)
    bad = 0
    with open(corpus, "rb") as f:
        for i, line in enumerate(f):
            ref = tk.encode(json.loads(line)["text"], bos=False, eos=False) + [tk.eos_id]
            bad += ds[i].tolist() != ref
    return bad


TOOLS = ("naive", "naive-legacy", "ours")


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--naive-run":
        return naive(sys.argv[2:])
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mb", type=int, default=200, help="corpus size in MB")
    ap.add_argument("--corpus", choices=["stdlib", "web"], default="stdlib",
                    help="stdlib: the standard library's sources; web: prose and sources mixed with long runs, "
                         "padded tables, base64 blobs, minified code and very long documents")
    ap.add_argument("--long-pieces", action="store_true",
                    help="only time one pre-tokenized piece of growing length, compiled path against tiktoken")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--tools", nargs="+", default=list(TOOLS), choices=TOOLS)
    ap.add_argument("--verify", action="store_true",
                    help="also re-tokenize every document with mistral-common and compare with ours")
    ap.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "megatron_apriel_bench"))
    args = ap.parse_args()
    if args.long_pieces:
        long_pieces()
        return 0

    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    corpus = build_corpus(cache / f"{args.corpus}_{args.mb}mb.jsonl", args.mb, args.corpus)
    size = corpus.stat().st_size
    with open(corpus, "rb") as f:
        n_docs = sum(1 for _ in f)
    print(f"corpus {corpus}: {size / 1e6:.0f} MB, {n_docs:,} documents "
          f"({time.perf_counter() - t0:.1f}s to build/check); "
          f"{os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.1f}", flush=True)

    from megatron.core.datasets.indexed_dataset import IndexedDataset

    rows, bins = [], {}
    for w in args.workers:
        for name in args.tools:
            prefix = str(cache / f"out_{args.corpus}_{name}_{w}")
            if name == "ours":
                cmd = [sys.executable, "tools/preprocess_data.py", "--input", str(corpus), "--output-prefix", prefix,
                       "--tokenizer-type", "TikTokenizer", "--tokenizer-model", "mistral-nemo", "--append-eod",
                       "--workers", str(w), "--quiet"]
                stats_json = Path(prefix + ".stats.json")
                prefix += "_text_document"
            else:
                call = "core" if name == "naive" else "legacy"
                cmd = [sys.executable, __file__, "--naive-run", str(corpus), prefix, str(w), call]
            seconds, rss, cpu = measure(cmd)
            ds = IndexedDataset(prefix)
            tokens = int(ds.sequence_lengths.sum())
            rows.append((name, w, len(ds), tokens, seconds, rss, cpu))
            bins[name, w] = prefix
            path = f" [{json.loads(stats_json.read_text()).get('tekken_path')} Tekken path]" if name == "ours" else ""
            print(f"  {name}{path} workers={w}: {seconds:.1f}s, {tokens / seconds:,.0f} tokens/s, CPU {cpu:.1f}s "
                  f"({tokens / cpu:,.0f} tokens per CPU s), peak RSS {rss:,.0f} MB, load average "
                  f"{os.getloadavg()[0]:.1f}", flush=True)

    alone = tokenizer_alone(corpus)
    print("\n| tool | workers | documents | tokens | seconds | docs/s | tokens/s | MB/s | CPU s | peak RSS MB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    base = {(name, w): (tok / s, tok / cpu) for name, w, _, tok, s, _, cpu in rows if name != "ours"}
    for name, w, docs, tok, s, rss, cpu in rows:
        speed = ""
        if name == "ours":
            speed = "".join(f" ({tok / s / base[b, w][0]:.2f}x {b}; CPU {tok / cpu / base[b, w][1]:.2f}x)"
                            for b in ("naive", "naive-legacy") if (b, w) in base)
        print(f"| {name} | {w} | {docs:,} | {tok:,} | {s:.1f} | {docs / s:,.0f} | {tok / s:,.0f}{speed} | "
              f"{size / 1e6 / s:.1f} | {cpu:.1f} | {rss:,.0f} |")
    for core, tok_alone, cpu_alone in alone:
        print(f"| {core} alone (CPU time) | 1 | {n_docs:,} | {tok_alone:,} | {cpu_alone:.1f} | "
              f"{n_docs / cpu_alone:,.0f} | {tok_alone / cpu_alone:,.0f} | {size / 1e6 / cpu_alone:.1f} | "
              f"{cpu_alone:.1f} | - |")

    # exactness: every run of ours byte-identical (any --workers) and equal to a direct
    # per-document encode_ordinary (the legacy baseline); --verify adds mistral-common's encode
    def content(prefix):
        return Path(prefix + ".bin").read_bytes(), Path(prefix + ".idx").read_bytes()

    ours = [bins[k] for k in bins if k[0] == "ours"]
    refs = [bins[k] for k in bins if k[0] == "naive-legacy"]
    if ours:
        first = content(ours[0])
        same = all(content(p) == first for p in ours[1:] + refs)
        print(f"\nours byte-identical across workers{' and to naive-legacy' if refs else ''}: {same}")
        if args.verify:
            differing = verify_against_mistral_common(corpus, ours[0])
            print(f"documents differing from mistral-common Tekkenizer.encode: {differing}")
        if not same:
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
