"""Corpora (JSONL, .jsonl.gz, .jsonl.zst, parquet) -> megatron-core indexed datasets.

A drop-in for Megatron-LM's ``tools/preprocess_data.py`` (same flags, same output names and the
same ``IndexedDatasetBuilder`` format), written here rather than imported because Megatron-LM's
tool is not part of the megatron-core package, and because its design caps its speed: one
tokenizer call and one pickled Python list per document, and an unbounded ``Pool.imap`` that
reads ahead of the workers. Here the main process only moves raw bytes: it reads the input in
blocks of whole lines, workers parse and tokenize a block at a time (the tokenizer's batch/numpy
path) and return one token buffer already in the output dtype, and the main process appends the
buffers to the ``.bin`` in input order, writing the index itself (``_Output``: megatron-core's
exact bytes, without importing megatron-core). At most ``2 * workers + 2`` blocks are in flight, so
memory does not grow with the input. Blocks are cut independently of ``--workers``, so the output
is byte-identical for any worker count.

Every record is either written or counted as skipped with a reason (a document the tokenizer fails
on included: ``tokenizer_error``); ``--strict`` turns the first skip into an error naming file and
line. Outputs are written under temporary names and renamed only when complete; Ctrl-C and SIGTERM
remove them, and a killed run's leftovers are overwritten by the next run with the same prefix.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import io
import itertools
import json
import multiprocessing as mp
import os
import shutil
import signal
import struct
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import zstandard
from tqdm import tqdm

from megatron_apriel.config import atomic_write_text
from megatron_apriel.data.tokenizers import Tokenizer, add_tokenizer_args, tokenizer_from_args
from megatron_apriel.errors import EXIT_BAD_INPUT, EXIT_ERROR, InputError, Terminated, cli_main, raise_terminated
from megatron_apriel.outputs import (
    ArgumentParser,
    check_output_prefix,
    disk_error,
    nonnegative_float,
    nonnegative_int,
    positive_int,
    signals_deferred,
)

try:  # orjson parses about 3x faster; the stdlib parser is the fallback and the reference
    import orjson

    def _loads(line: bytes):
        try:
            return orjson.loads(line)
        except orjson.JSONDecodeError:
            return json.loads(line)  # e.g. lone surrogates, which only the stdlib accepts
except ImportError:  # pragma: no cover
    _loads = json.loads

SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz", ".jsonl.zst", ".json.zst", ".parquet")
BLOCK_BYTES = 1 << 20  # 1 MiB of lines per task: large enough to amortise IPC, small enough to stream
REASONS = ("bad_json", "not_an_object", "missing_key", "not_a_string", "invalid_unicode", "empty_text", "blank_line",
           "tokenizer_error")
# documents at least this long are tokenized (and timed) one at a time, so one that takes
# --slow-doc-seconds or more is named in the log; shorter ones cannot take long (tokenizing is linear)
LONG_DOC_CHARS = 1 << 16


class PreprocessError(InputError):
    """A fatal input problem of a preprocessing tool (text, SFT, multimodal); the message names the
    file and line, or the flag. The SFT and multimodal CLIs exit 2 on it, ``preprocess`` 1 (as
    Megatron-LM's ``preprocess_data.py``)."""


def check_inputs(paths: list[str], exists=os.path.isfile) -> None:
    """The SFT and multimodal writers' inputs exist (checked before anything is read or written)."""
    for path in paths:
        if not exists(path):
            raise PreprocessError(f"{path}: no such file")


def print_control_text(prog: str, report: dict, what: str) -> None:
    """The SFT and multimodal writers' line on records whose text spells control tokens (kept)."""
    if report["with_control_token_text"]:
        print(f"{prog}: {report['with_control_token_text']} {what} spell control tokens in their text "
              f"({report['control_token_strings']} strings), encoded as ordinary text")


# ---------------------------------------------------------------- input


def expand_inputs(spec: str) -> list[Path]:
    """A file, a glob, or a directory (its supported files, recursively), sorted for a stable order."""
    paths: list[Path] = []
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        p = Path(part)
        if p.is_dir():
            paths += sorted(q for q in p.rglob("*") if q.is_file() and q.name.endswith(SUFFIXES))
        elif p.is_file():
            paths.append(p)
        else:
            matches = sorted(Path(m) for m in glob.glob(part, recursive=True) if Path(m).is_file())
            if not matches:
                raise PreprocessError(f"--input {part}: no such file, directory or matching glob")
            paths += matches
    if not paths:
        raise PreprocessError(f"--input {spec}: no input files ({', '.join(SUFFIXES)})")
    for p in paths:
        if not p.name.endswith(SUFFIXES):
            raise PreprocessError(f"{p}: unsupported input type (expected one of {', '.join(SUFFIXES)})")
    return paths


class _Counting(io.RawIOBase):
    """Counts compressed bytes read, so progress and ETA work on .gz/.zst too."""

    def __init__(self, f):
        self.f, self.pos = f, 0

    def readable(self):
        return True

    def readinto(self, b):
        n = self.f.readinto(b)
        self.pos += n or 0
        return n


class _ZstdFrames(io.RawIOBase):
    """The decompressed bytes of a .zst file of one or more frames. zstandard's ``stream_reader``
    ends quietly where a truncated file ends; this reader raises EOFError if the last frame is
    incomplete, as gzip does for a truncated .gz."""

    def __init__(self, f):
        self.f, self.buf = f, bytearray()  # bytearray: deleting from its front is O(1) in CPython
        self.dobj, self.started = zstandard.ZstdDecompressor().decompressobj(), False

    def readable(self):
        return True

    def read(self, n: int = -1) -> bytes:
        while n < 0 or len(self.buf) < n:
            chunk = self.f.read(1 << 20)
            if not chunk:
                if self.started and not self.dobj.eof:
                    raise EOFError("compressed file ended before the end-of-stream marker was reached")
                break
            while chunk:
                self.buf += self.dobj.decompress(chunk)
                self.started = True
                chunk = self.dobj.unused_data if self.dobj.eof else b""
                if chunk:  # the next frame
                    self.dobj, self.started = zstandard.ZstdDecompressor().decompressobj(), False
        n = len(self.buf) if n < 0 else min(n, len(self.buf))
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    def close(self):
        self.f.close()
        super().close()


def _open_binary(path: Path, counter: list):
    raw = open(path, "rb")
    counting = _Counting(raw)
    counter.append(counting)
    if path.name.endswith(".gz"):
        return gzip.GzipFile(fileobj=io.BufferedReader(counting, 1 << 20))
    if path.name.endswith(".zst"):
        return _ZstdFrames(io.BufferedReader(counting, 1 << 20))
    return io.BufferedReader(counting, 1 << 20)


@dataclass
class Block:
    file_index: int
    first_line: int  # 1-based line (JSONL) or row (parquet) of the first record
    lines: bytes | None = None  # JSONL: whole lines joined by b"\n"
    columns: dict | None = None  # parquet: key -> list of values


def read_blocks(paths: list[Path], keys: list[str], progress, block_bytes: int = BLOCK_BYTES) -> Iterator[Block]:
    for fi, path in enumerate(paths):
        if path.name.endswith(".parquet"):
            yield from _parquet_blocks(fi, path, keys, progress)
            continue
        counters: list = []
        line_no = 1
        rest: list[bytes] = []  # the chunks of an unfinished line: joined once, so a long line costs linear time
        with _open_binary(path, counters) as f:
            done = 0
            while True:
                chunk = _read_named(f, block_bytes, path)
                progress(counters[0].pos - done)
                done = counters[0].pos
                if not chunk:
                    break
                cut = chunk.rfind(b"\n")
                if cut < 0:
                    rest.append(chunk)
                    continue
                lines = b"".join(rest + [chunk[:cut]])
                rest = [chunk[cut + 1:]]
                yield Block(fi, line_no, lines=lines)
                line_no += lines.count(b"\n") + 1
        if any(rest):
            yield Block(fi, line_no, lines=b"".join(rest))


def _read_named(f, n: int, path: Path) -> bytes:
    """``f.read(n)``; a truncated or corrupt .gz/.zst (a partial download or copy) names the file."""
    try:
        return f.read(n)
    except (EOFError, OSError, zstandard.ZstdError) as e:  # gzip.BadGzipFile is an OSError
        raise PreprocessError(f"{path}: truncated or corrupt compressed file ({e})") from None


def _parquet_blocks(fi: int, path: Path, keys: list[str], progress) -> Iterator[Block]:
    import pyarrow.parquet as pq  # deferred: only parquet inputs need it, and it is slow to import

    pf = pq.ParquetFile(path)
    names = set(pf.schema_arrow.names)
    present = [k for k in keys if k in names]
    row = 1
    size = path.stat().st_size
    n_rows = max(pf.metadata.num_rows, 1)
    for batch in pf.iter_batches(batch_size=4096, columns=present or None):
        cols = {k: batch.column(k).to_pylist() for k in present}
        n = batch.num_rows
        yield Block(fi, row, columns={k: cols.get(k, [_MISSING] * n) for k in keys})
        progress(size * n / n_rows)
        row += n


class _Missing:
    def __reduce__(self):
        return (_get_missing, ())


def _get_missing():
    return _MISSING


_MISSING = _Missing()


# ---------------------------------------------------------------- workers

_TOKENIZER: Tokenizer | None = None
_CFG: dict = {}


def _records(block: Block, keys: list[str]):
    """Yields (line_no, texts | None, reason)."""
    if block.columns is not None:
        n = len(next(iter(block.columns.values())))
        for i in range(n):
            texts, reason = [], None
            for k in keys:
                v = block.columns[k][i]
                if v is _MISSING or v is None:
                    reason = "missing_key"
                    break
                if not isinstance(v, str):
                    reason = "not_a_string"
                    break
                texts.append(v)
            yield block.first_line + i, (None if reason else texts), reason
        return
    for i, line in enumerate(block.lines.split(b"\n")):
        no = block.first_line + i
        if not line.strip():
            yield no, None, "blank_line"
            continue
        try:
            obj = _loads(line)
        except ValueError:  # JSONDecodeError and UnicodeDecodeError
            yield no, None, "bad_json"
            continue
        if not isinstance(obj, dict):
            yield no, None, "not_an_object"
            continue
        texts, reason = [], None
        for k in keys:
            if k not in obj:
                reason = "missing_key"
                break
            v = obj[k]
            if not isinstance(v, str):
                reason = "not_a_string"
                break
            if not v.isascii():
                try:  # lone surrogates (a JSON "\ud800" escape) parse but cannot be tokenized
                    v.encode("utf-8")
                except UnicodeEncodeError:
                    reason = "invalid_unicode"
                    break
            texts.append(v)
        yield no, (None if reason else texts), reason


def _encode_span(tok: Tokenizer, texts: list[str], parts: list, failed: list[int], base: int = 0) -> None:
    """Tokenize ``texts`` as one batch; if the tokenizer fails on it, one document at a time, and a
    document it fails on becomes empty and its index (``base`` + position) lands in ``failed``."""
    try:
        parts.append(tok.encode_batch_numpy(texts))
        return
    except (KeyboardInterrupt, SystemExit, MemoryError):
        raise
    except BaseException:  # noqa: B036 - tiktoken's Rust panics arrive as pyo3's PanicException(BaseException)
        if len(texts) == 1:
            failed.append(base)
            parts.append((np.zeros(0, dtype=np.int32), np.zeros(1, dtype=np.int64)))
            return
    for i, t in enumerate(texts):
        _encode_span(tok, [t], parts, failed, base + i)


def _encode_texts(tok: Tokenizer, texts: list[str], lines: list[int], slow_seconds: float, slow: list):
    """``encode_batch_numpy`` over ``texts``, with documents of ``LONG_DOC_CHARS`` or more alone: each
    is timed, and one taking ``slow_seconds`` or more is added to ``slow`` as (line, chars, seconds).
    Returns (ids, lengths, indices of documents the tokenizer failed on)."""
    parts: list = []
    failed: list[int] = []
    i, n = 0, len(texts)
    while i < n:
        j = i
        while j < n and len(texts[j]) < LONG_DOC_CHARS:
            j += 1
        if j > i:
            _encode_span(tok, texts[i:j], parts, failed, i)
        if j < n:
            t0 = time.perf_counter()
            _encode_span(tok, texts[j:j + 1], parts, failed, j)
            took = time.perf_counter() - t0
            if took >= slow_seconds:
                slow.append((lines[j], len(texts[j]), took))
            j += 1
        i = j
    if not parts:
        return np.zeros(0, dtype=np.int32), np.zeros(0, dtype=np.int64), failed
    if len(parts) == 1:
        return parts[0][0], parts[0][1], failed
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]), failed


def encode_block(block: Block) -> tuple:
    """Parse and tokenize one block; returns per-key (token bytes, int32 lengths), skips, the input
    bytes and the slow documents as (line, chars, seconds)."""
    tok, keys, eod, dtype = _TOKENIZER, _CFG["keys"], _CFG["append_eod"], _CFG["dtype"]
    nbytes = len(block.lines) + 1 if block.lines is not None else 0
    per_key_texts: list[list[str]] = [[] for _ in keys]
    skips: list[tuple[int, str]] = []
    kept_lines: list[int] = []
    for no, texts, reason in _records(block, keys):
        if texts is None:
            skips.append((no, reason))
            continue
        if any(not t for t in texts):
            skips.append((no, "empty_text"))
            continue
        kept_lines.append(no)
        for j, t in enumerate(texts):
            per_key_texts[j].append(t)
    slow: list[tuple[int, int, float]] = []
    failed = np.zeros(len(kept_lines), dtype=bool)
    outs = []
    for texts in per_key_texts:
        flat, lengths, bad = _encode_texts(tok, texts, kept_lines, _CFG.get("slow_seconds", float("inf")), slow)
        failed[bad] = True
        outs.append((flat, lengths))
    # a record whose text tokenizes to nothing, or that the tokenizer fails on, is skipped in every
    # key, so keys stay aligned
    empty = np.zeros(len(kept_lines), dtype=bool)
    for _, lengths in outs:
        empty |= lengths == 0
    drop = empty | failed
    results = []
    for flat, lengths in outs:
        if drop.any():
            keep = np.repeat(~drop, lengths)
            flat, lengths = flat[keep], lengths[~drop]
        if eod:
            ends = np.cumsum(lengths)
            flat = np.insert(flat, ends, tok.eod)
            lengths = lengths + 1
        results.append((flat.astype(dtype).tobytes(), lengths.astype(np.int32)))
    if drop.any():
        skips += [(kept_lines[i], "tokenizer_error" if failed[i] else "empty_text") for i in np.flatnonzero(drop)]
        skips.sort()
    return block.file_index, results, skips, nbytes, slow


def _set_worker_state(tokenizer, cfg):
    global _TOKENIZER, _CFG
    _TOKENIZER, _CFG = tokenizer, cfg


def _init_worker(tokenizer, cfg):
    _set_worker_state(tokenizer, cfg)
    # the main process alone handles Ctrl-C and SIGTERM (a scheduler signals the whole process group):
    # a worker killed mid-way could hold a pipe lock of the pool, which then never shuts down
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


# ---------------------------------------------------------------- output


# megatron-core's IndexedDataset index layout (megatron/core/datasets/indexed_dataset.py): header,
# version 1, dtype code, sequence and document counts, int32 lengths, int64 byte pointers, int64
# document indices
_INDEX_HEADER = b"MMIDIDX\x00\x00"
_DTYPE_CODES = {np.dtype(np.uint8): 1, np.dtype(np.int8): 2, np.dtype(np.int16): 3, np.dtype(np.int32): 4,
                np.dtype(np.int64): 5, np.dtype(np.float64): 6, np.dtype(np.float32): 7, np.dtype(np.uint16): 8}
_INDEX_CHUNK = 1 << 20  # index entries per write while finishing


class _Output:
    """One ``<prefix>_<key>_document`` dataset under temporary names, in the exact bytes of
    megatron-core's ``IndexedDatasetBuilder`` (one sequence per document).

    Written here rather than through the builder for two reasons. Importing it imports the whole
    ``megatron.core`` package (torch, the optimizer, FSDP, the TE fallbacks): about 10 CPU-seconds
    on every run, which on the compiled Tekken path is as long as tokenizing 200 MB, and nothing of
    it is needed to write two files. And the builder holds every document's length and index in
    memory until ``finalize``; here the lengths stream to a side file and the index is assembled
    from it in chunks, so memory does not grow with the number of documents.
    ``tests/test_preprocess.py`` checks the ``.idx`` byte for byte against ``IndexedDatasetBuilder``
    and every test reads outputs back through megatron-core's ``IndexedDataset``.
    """

    def __init__(self, prefix: str, dtype):
        self.prefix = prefix
        self.dtype = np.dtype(dtype)
        self.tmp_bin, self.tmp_idx, self.tmp_len = prefix + ".bin.tmp", prefix + ".idx.tmp", prefix + ".len.tmp"
        self.bin = open(self.tmp_bin, "wb")
        self.lens = open(self.tmp_len, "wb")
        self.n_docs = 0

    def write(self, data: bytes, lengths: np.ndarray) -> None:
        self.bin.write(data)
        self.lens.write(np.asarray(lengths, dtype=np.int32).tobytes())
        self.n_docs += len(lengths)

    def finish(self) -> None:
        self.bin.close()
        self.lens.close()
        n = self.n_docs
        with open(self.tmp_len, "rb") as lens, open(self.tmp_idx, "wb") as idx:
            idx.write(_INDEX_HEADER + struct.pack("<Q", 1) + struct.pack("<B", _DTYPE_CODES[self.dtype]))
            idx.write(struct.pack("<Q", n) + struct.pack("<Q", n + 1))
            shutil.copyfileobj(lens, idx, 16 << 20)
            lens.seek(0)
            pointer = 0  # byte offset of each document in the .bin: the exclusive prefix sum of lengths
            while chunk := lens.read(4 * _INDEX_CHUNK):
                nbytes = np.frombuffer(chunk, dtype=np.int32).astype(np.int64) * self.dtype.itemsize
                ends = np.cumsum(nbytes) + pointer
                idx.write((ends - nbytes).tobytes())
                pointer = int(ends[-1])
            for lo in range(0, n + 1, _INDEX_CHUNK):  # document indices 0..n: one sequence per document
                idx.write(np.arange(lo, min(lo + _INDEX_CHUNK, n + 1), dtype=np.int64).tobytes())
        os.remove(self.tmp_len)
        os.replace(self.tmp_bin, self.prefix + ".bin")
        os.replace(self.tmp_idx, self.prefix + ".idx")

    def abort(self) -> None:
        for f in (self.bin, self.lens):
            f.close()
        for p in (self.tmp_bin, self.tmp_idx, self.tmp_len):
            if os.path.exists(p):
                os.remove(p)


@dataclass
class Stats:
    documents: int = 0
    tokens: dict = field(default_factory=dict)
    records: int = 0
    input_bytes: int = 0
    skipped: collections.Counter = field(default_factory=collections.Counter)
    skipped_examples: dict = field(default_factory=dict)
    slow_documents: list = field(default_factory=list)
    seconds: float = 0.0


def _pool_blocks(blocks: Iterator[Block], workers: int, tokenizer, cfg, waiting=None,
                 wait_seconds: float = 30.0) -> Iterator[tuple]:
    """Results in input order, with at most ``2 * workers + 2`` blocks in flight. While the oldest
    block is not done, ``waiting(block, seconds)`` is called every ``wait_seconds``."""
    if workers <= 0:
        _set_worker_state(tokenizer, cfg)
        for b in blocks:
            yield encode_block(b)
        return
    cap = 2 * workers + 2
    blocks = iter(blocks)
    ctx = mp.get_context("fork")

    def result(block, job):
        t0 = time.perf_counter()
        while not job.ready():
            job.wait(max(wait_seconds, 1.0))  # at most one line a second, even with --log-seconds 0
            if waiting is not None and not job.ready():
                waiting(block, time.perf_counter() - t0)
        return job.get()

    def submit(b):
        with _signals_deferred():
            return b, pool.apply_async(encode_block, (b,))

    pool = None
    try:
        with _signals_deferred():  # the forked workers start with the signals blocked, then ignore them
            pool = ctx.Pool(workers, initializer=_init_worker, initargs=(tokenizer, cfg))
        pending: collections.deque = collections.deque(submit(b) for b in itertools.islice(blocks, cap))
        for b in blocks:
            while len(pending) >= cap:
                yield result(*pending.popleft())
            pending.append(submit(b))
        while pending:
            yield result(*pending.popleft())
    finally:
        # close and join, not terminate, also on an error or an interrupt: Pool.terminate deadlocks
        # when a worker is sending a result once the result thread has stopped reading (the worker
        # holds the result pipe's lock, terminate waits for it). The blocks in flight (at most
        # 2 * workers + 2) finish first; a second interrupt kills the workers at once.
        if pool is not None:
            pool.close()
            try:
                pool.join()
            except BaseException:
                for proc in pool._pool:
                    proc.kill()
                raise


def _longest_line(block: Block) -> tuple[int, int]:
    """(line number, bytes) of a JSONL block's longest line."""
    lengths = [len(x) for x in block.lines.split(b"\n")] if block.lines is not None else [0]
    i = max(range(len(lengths)), key=lengths.__getitem__)
    return block.first_line + i, lengths[i]


# SIGINT and SIGTERM held back until the block ends: an interrupt inside Pool() or apply_async can
# leave a task registered but never sent, and joining the pool then waits for it forever.
_signals_deferred = signals_deferred


# SIGTERM, turned into an exception so the outputs' temporary files are removed on the way out
_Terminated, _raise_terminated = Terminated, raise_terminated


def output_prefix(prefix: str, key: str, level: str = "document") -> str:
    return f"{prefix}_{key}_{level}"


def _optimal_dtype(vocab_size: int):
    """megatron-core's ``DType.optimal_dtype`` rule (tests/test_preprocess.py checks it against
    megatron-core's for the vocabulary sizes around the boundary)."""
    return np.uint16 if vocab_size is not None and vocab_size < 65500 else np.int32


def preprocess(inputs: str, out_prefix: str, tokenizer: Tokenizer, json_keys=("text",), append_eod=False,
               workers=1, strict=False, log_interval=100_000, quiet=False, block_bytes=BLOCK_BYTES,
               log_seconds: float = 30.0, slow_doc_seconds: float = 10.0) -> Stats:
    """Without a terminal, a progress line every ``log_interval`` documents or ``log_seconds`` seconds,
    whichever comes first (bytes read, so a run of huge documents shows progress too); a line naming
    the block being waited on when it takes longer than ``log_seconds``; and a line naming each
    document (file:line, length) that took ``slow_doc_seconds`` or more to tokenize."""
    paths = expand_inputs(inputs)
    keys = list(json_keys)
    dtype = _optimal_dtype(tokenizer.vocab_size)
    total_bytes = sum(p.stat().st_size for p in paths)
    Path(out_prefix).parent.mkdir(parents=True, exist_ok=True)
    outs: list[_Output] = []
    stats = Stats(tokens={k: 0 for k in keys})
    t0 = time.perf_counter()
    bar = None
    if not quiet and sys.stderr.isatty():
        bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="preprocess", file=sys.stderr)
    read = [0.0]

    def progress(n):
        read[0] += n
        if bar is not None:
            bar.update(n)

    def say(line: str) -> None:
        if quiet:
            return
        if bar is not None:
            bar.write(line, file=sys.stderr)
        else:
            print(line, file=sys.stderr, flush=True)

    def waiting(block: Block, seconds: float) -> None:
        no, nbytes = _longest_line(block)
        say(f"[preprocess] still tokenizing {paths[block.file_index]}:{block.first_line}- after {seconds:,.0f}s "
            f"(its longest record: line {no}, {nbytes:,} bytes); {read[0] / 1e6:,.1f} MB read")

    next_log, last_log = log_interval, t0
    cfg = {"keys": keys, "append_eod": append_eod, "dtype": dtype, "slow_seconds": slow_doc_seconds}
    # SIGTERM (a scheduler's cancel, `kill`) ends the run like Ctrl-C: through the except below, which
    # removes the temporary files. Workers ignore both (_init_worker); the pool is closed and joined.
    in_main_thread = threading.current_thread() is threading.main_thread()  # signal.signal's requirement
    previous_sigterm = signal.signal(signal.SIGTERM, _raise_terminated) if in_main_thread else None
    # closed explicitly in ``finally``: an error (``--strict``, a bad file) must terminate the worker
    # pool now, not leave it to interpreter shutdown, where a live Pool can hang the exit
    results_iter = _pool_blocks(read_blocks(paths, keys, progress, block_bytes), workers, tokenizer, cfg,
                                waiting, log_seconds)
    try:
        for k in keys:
            outs.append(_Output(output_prefix(out_prefix, k), dtype))
        for fi, results, skips, nbytes, slow in results_iter:
            for no, chars, took in slow:
                stats.slow_documents.append(f"{paths[fi]}:{no}")
                say(f"[preprocess] slow document {paths[fi]}:{no}: {chars:,} characters took {took:,.1f}s")
            if skips:
                if strict:
                    no, reason = skips[0]
                    raise PreprocessError(f"{paths[fi]}:{no}: {reason.replace('_', ' ')} (--strict)")
                for no, reason in skips:
                    stats.skipped[reason] += 1
                    ex = stats.skipped_examples.setdefault(reason, [])
                    if len(ex) < 10:
                        ex.append(f"{paths[fi]}:{no}")
            n = 0
            for out, key, (data, lengths) in zip(outs, keys, results):
                out.write(data, lengths)
                stats.tokens[key] += int(lengths.sum())
                n = len(lengths)
            stats.documents += n
            stats.records += n + len(skips)
            stats.input_bytes += nbytes
            now = time.perf_counter()
            dt = now - t0
            if bar is not None:
                tok = sum(stats.tokens.values())
                bar.set_postfix_str(f"{stats.documents / dt:,.0f} docs/s, {tok / dt:,.0f} tok/s", refresh=False)
            elif not quiet and (stats.documents >= next_log or now - last_log >= log_seconds):
                next_log = (stats.documents // log_interval + 1) * log_interval
                last_log = now
                frac = read[0] / max(total_bytes, 1)
                eta = dt * (1 - frac) / frac if frac > 0 else float("nan")
                print(f"[preprocess] {stats.documents:,} docs, {stats.documents / dt:,.0f} docs/s, "
                      f"{sum(stats.tokens.values()) / dt:,.0f} tokens/s, {read[0] / 1e6:,.1f} MB read, "
                      f"{read[0] / dt / 1e6:.1f} MB/s, {100 * frac:.1f}%, ETA {eta:,.0f}s", file=sys.stderr, flush=True)
        # An interrupt is held back while the outputs are put in place, so one never lands between
        # the renames of a .bin and its .idx (or between two keys' outputs); it acts right after.
        with _signals_deferred():
            for out in outs:
                out.finish()
    except BaseException as e:
        for out in outs:
            out.abort()
        err = disk_error(e, out_prefix) if isinstance(e, Exception) else None
        if err is not None:  # a write's ENOSPC names no file: name the output
            raise err from None
        raise
    finally:
        results_iter.close()
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous_sigterm)
        if bar is not None:
            bar.close()
    stats.seconds = time.perf_counter() - t0
    return stats


def stats_dict(stats: Stats, args_like: dict) -> dict:
    tokens = sum(stats.tokens.values())
    return {
        **args_like,
        "records": stats.records,
        "documents": stats.documents,
        "tokens": tokens,
        "tokens_per_key": stats.tokens,
        "skipped": sum(stats.skipped.values()),
        "skipped_by_reason": dict(sorted(stats.skipped.items())),
        "skipped_examples": stats.skipped_examples,
        "slow_documents": stats.slow_documents,
        "input_bytes": stats.input_bytes,
        "seconds": round(stats.seconds, 3),
        "documents_per_second": round(stats.documents / max(stats.seconds, 1e-9), 1),
        "tokens_per_second": round(tokens / max(stats.seconds, 1e-9), 1),
    }


def build_parser(prog: str = "preprocess_data.py") -> argparse.ArgumentParser:
    p = ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    g = p.add_argument_group("input data")
    g.add_argument("--input", required=True, help="a file, a glob or a directory (comma-separated for several): "
                                                  ".jsonl, .jsonl.gz, .jsonl.zst, .parquet")
    g.add_argument("--json-keys", nargs="+", default=["text"], help="keys (columns) to tokenize, one dataset each")
    g.add_argument("--split-sentences", action="store_true", help="not supported (documents only)")
    add_tokenizer_args(p)
    g = p.add_argument_group("output data")
    g.add_argument("--output-prefix", required=True,
                   help="writes <prefix>_<key>_document.bin/.idx and <prefix>.stats.json")
    g.add_argument("--append-eod", action="store_true", help="append the end-of-document token to every document")
    g.add_argument("--dataset-impl", default="mmap", choices=["mmap"], help="accepted for compatibility")
    g = p.add_argument_group("runtime")
    g.add_argument("--workers", type=nonnegative_int, default=1, help="tokenizer processes (0: in the main process)")
    g.add_argument("--log-interval", type=positive_int, default=100_000, help="documents between log lines (no TTY)")
    g.add_argument("--log-seconds", type=nonnegative_float, default=30.0,
                   help="seconds between log lines (no TTY), and before naming a block still being tokenized")
    g.add_argument("--slow-doc-seconds", type=nonnegative_float, default=10.0,
                   help="name in the log every document (file:line, length) that takes this long to tokenize")
    g.add_argument("--strict", action="store_true", help="any skipped record is an error naming file and line")
    g.add_argument("--quiet", action="store_true", help="no progress output")
    g.add_argument("--block-bytes", type=positive_int, default=BLOCK_BYTES, help="bytes of whole lines per worker task")
    return p


def check_outputs(prefix: str, keys: list[str]) -> None:
    """The output prefix takes every file this run writes; a killed run's temporary files go."""
    names = [output_prefix(prefix, k) + ext for k in keys for ext in (".bin", ".idx")] + [prefix + ".stats.json"]
    check_output_prefix(prefix, "--output-prefix", names,
                        stale=tuple(glob.escape(output_prefix(prefix, k)) + ".*.tmp" for k in keys))


def _main(argv: list[str] | None, prog: str) -> int:
    args = build_parser(prog).parse_args(argv)
    if args.split_sentences:
        print("error: --split-sentences is not supported; documents are tokenized whole", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        expand_inputs(args.input)
        check_outputs(args.output_prefix, args.json_keys)
        tokenizer = tokenizer_from_args(args)
        stats = preprocess(args.input, args.output_prefix, tokenizer, args.json_keys, args.append_eod,
                           args.workers, args.strict, args.log_interval, args.quiet, args.block_bytes,
                           args.log_seconds, args.slow_doc_seconds)
    except (KeyboardInterrupt, _Terminated) as e:
        which = "SIGTERM" if isinstance(e, _Terminated) else "SIGINT"
        print(f"[preprocess] interrupted by {which}: nothing written, temporary files removed", file=sys.stderr)
        return 143 if isinstance(e, _Terminated) else 130
    summary = stats_dict(stats, {"input": args.input, "output_prefix": args.output_prefix,
                                 "tokenizer": tokenizer.name, "workers": args.workers,
                                 **({"tekken_path": tokenizer.tekken_path}
                                    if hasattr(tokenizer, "tekken_path") else {})})

    atomic_write_text(Path(args.output_prefix + ".stats.json"), json.dumps(summary, indent=2) + "\n")
    skipped = ", ".join(f"{k} {v}" for k, v in summary["skipped_by_reason"].items()) or "none"
    outputs = ", ".join(output_prefix(args.output_prefix, k) for k in args.json_keys)
    print(f"[preprocess] {summary['documents']:,} documents, {summary['tokens']:,} tokens, "
          f"skipped {summary['skipped']:,} ({skipped}) in {summary['seconds']:.1f}s: "
          f"{summary['documents_per_second']:,.0f} docs/s, {summary['tokens_per_second']:,.0f} tokens/s -> {outputs}")
    return 0


@cli_main(bad_input=(FileNotFoundError, ValueError))
def main(argv: list[str] | None = None) -> int:
    """``apriel preprocess``: bad input exits 2, as every ``apriel`` verb."""
    return _main(argv, "apriel preprocess")


# Megatron-LM's tool of this name exits 1 on bad input, so tools/preprocess_data.py does too
# (--split-sentences: 2)
@cli_main(bad_input=(FileNotFoundError, ValueError), bad_input_exit=EXIT_ERROR)
def tool_main(argv: list[str] | None = None) -> int:
    return _main(argv, "preprocess_data.py")


if __name__ == "__main__":
    sys.exit(tool_main())
