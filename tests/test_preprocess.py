"""tools/preprocess_data.py and tools/merge_datasets.py, read back through megatron-core's IndexedDataset.

The references are the tokenizer libraries called directly (mistral-common's Tekkenizer,
transformers' AutoTokenizer, sentencepiece), one document at a time.
"""

from __future__ import annotations

import functools
import gzip
import io
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, run_python
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_apriel.data import merge as merge_mod
from megatron_apriel.data import preprocess as pp
from megatron_apriel.data.tokenizers import load_tokenizer, resolve_tekken

TEXTS = [
    "Hello world.",
    "Unicode: déjà vu, 東京, emoji 🙂 and a tab\there.",
    "def f(x):\n    return x ** 2  # code\n\n\n",
    "  leading and trailing spaces  ",
    "special-looking strings stay text: <s> </s> [INST]",
    "A longer document. " * 50,
    "\u00a0non-breaking space and lone surrogate-free text",
    "numbers 1234567890 and 3.14159",
]


def write_jsonl(path: Path, texts, extra_lines=()):
    with open(path, "w", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({"text": t, "id": len(t)}) + "\n")
        for line in extra_lines:
            f.write(line + "\n")
    return path


def read_docs(prefix: str) -> list[list[int]]:
    ds = IndexedDataset(prefix)
    assert len(ds.document_indices) == len(ds) + 1  # one sequence per document
    return [ds[i].tolist() for i in range(len(ds))]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TEXTS * 3, trainer)
    path = tmp_path_factory.mktemp("hf")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(TEXTS * 20), model_writer=buf, vocab_size=400,
                                   model_type="bpe", byte_fallback=True, character_coverage=1.0,
                                   minloglevel=2)
    path = tmp_path_factory.mktemp("sp") / "sp.model"
    path.write_bytes(buf.getvalue())
    return path


@functools.lru_cache
def _library_tokenizer(kind: str, model: str):
    if kind == "TikTokenizer":
        from mistral_common.tokens.tokenizers.tekken import Tekkenizer

        return Tekkenizer.from_file(resolve_tekken(model))
    if kind == "HuggingFaceTokenizer":
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(model)
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=model)


def reference(kind: str, model: str, text: str) -> list[int]:
    tk = _library_tokenizer(kind, model)
    if kind == "TikTokenizer":
        return tk.encode(text, bos=False, eos=False) + [tk.eos_id]
    if kind == "HuggingFaceTokenizer":
        return tk.encode(text, add_special_tokens=False) + [tk.eos_token_id]
    return tk.encode(text) + [tk.eos_id()]


@pytest.mark.parametrize("kind", ["TikTokenizer", "HuggingFaceTokenizer", "SentencePieceTokenizer"])
def test_tokens_match_direct_tokenization(kind, tmp_path, hf_dir, sp_model):
    model = {"TikTokenizer": "mistral-nemo", "HuggingFaceTokenizer": str(hf_dir),
             "SentencePieceTokenizer": str(sp_model)}[kind]
    src = write_jsonl(tmp_path / "in.jsonl", TEXTS)
    prefix = str(tmp_path / "out" / "c")
    rc = pp.main(["--input", str(src), "--output-prefix", prefix, "--tokenizer-type", kind, "--tokenizer-model", model,
                  "--append-eod", "--workers", "2", "--block-bytes", "64", "--quiet"])
    assert rc == 0
    docs = read_docs(prefix + "_text_document")
    assert docs == [reference(kind, model, t) for t in TEXTS]
    ds = IndexedDataset(prefix + "_text_document")
    tok = load_tokenizer(kind, model)
    assert ds.index.dtype == (np.uint16 if tok.vocab_size < 65500 else np.int32)
    stats = json.loads(Path(prefix + ".stats.json").read_text())
    assert stats["documents"] == len(TEXTS) and stats["skipped"] == 0
    assert stats["tokens"] == sum(len(d) for d in docs)



@pytest.mark.parametrize("kind", ["TikTokenizer", "HuggingFaceTokenizer", "SentencePieceTokenizer"])
def test_encode_text_reads_control_token_strings_as_text(kind, hf_dir, sp_model):
    """encode_text (message content) never yields a control-token id, decodes back to the text, and
    leaves encode (pretraining text, read by the libraries' own rules) as it was."""
    model = {"TikTokenizer": "mistral-nemo", "HuggingFaceTokenizer": str(hf_dir),
             "SentencePieceTokenizer": str(sp_model)}[kind]
    tok = load_tokenizer(kind, model)
    assert {"<s>", "</s>"} <= set(tok.control_tokens)
    if kind == "TikTokenizer":
        assert tok.control_tokens[10] == "[IMG]" and len(tok.control_tokens) == 1000
    text = "x " + " ".join(tok.control_tokens[:20]) + " y"
    before = tok.encode(text)
    ids = tok.encode_text(text)
    lib = _library_tokenizer(kind, model)
    control_ids = {lib.convert_tokens_to_ids(t) for t in tok.control_tokens} if kind == "HuggingFaceTokenizer" else \
        set(range(1000)) if kind == "TikTokenizer" else {i for i in range(tok.vocab_size) if lib.is_control(i)}
    assert not control_ids.intersection(ids)
    assert tok.encode(text) == before == reference(kind, model, text)[:-1]
    if kind == "HuggingFaceTokenizer":  # as transformers encodes text with split_special_tokens
        assert ids == lib(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        assert control_ids.intersection(before)  # the HF backend does read them from pretraining text
    else:
        assert tok.decode(ids) == text

def test_malformed_lines_counted_and_strict_fails(tmp_path):
    bad = ["{not json", "", '["a list"]', '{"id": 1}', '{"text": 7}', '{"text": ""}', b"\xff\xfe".decode("latin-1"),
           '{"text": "lone surrogate \\ud800"}']
    src = tmp_path / "in.jsonl"
    with open(src, "w", encoding="utf-8") as f:
        f.write(json.dumps({"text": TEXTS[0]}) + "\n")
        for line in bad:
            f.write(line + "\n")
        f.write(json.dumps({"text": TEXTS[1]}))  # no trailing newline
    prefix = str(tmp_path / "o")
    args = ["--input", str(src), "--output-prefix", prefix, "--tokenizer-type", "TikTokenizer",
            "--tokenizer-model", "mistral-nemo", "--quiet"]
    assert pp.main(args) == 0
    docs = read_docs(prefix + "_text_document")
    tk = load_tokenizer("TikTokenizer", "mistral-nemo")
    assert docs == [tk.encode(TEXTS[0]), tk.encode(TEXTS[1])]  # no --append-eod: no EOD
    stats = json.loads(Path(prefix + ".stats.json").read_text())
    assert stats["records"] == 2 + len(bad)
    assert stats["skipped_by_reason"] == {"bad_json": 2, "blank_line": 1, "not_an_object": 1, "missing_key": 1,
                                          "not_a_string": 1, "empty_text": 1, "invalid_unicode": 1}
    assert stats["skipped_examples"]["missing_key"] == [f"{src}:5"]

    strict = tmp_path / "s"
    proc = run_python(["tools/preprocess_data.py", *args[:3], str(strict), *args[4:], "--strict"], check=False)
    assert proc.returncode != 0
    assert f"{src}:2: bad json" in proc.stderr
    assert not list(tmp_path.glob("s*"))  # nothing half-written


def test_workers_byte_identical_and_compressed_inputs(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    texts = [f"{t} #{i}" for i in range(40) for t in TEXTS]
    plain = write_jsonl(tmp_path / "in.jsonl", texts)
    data = plain.read_bytes()
    (tmp_path / "gz").mkdir()
    with gzip.open(tmp_path / "gz" / "in.jsonl.gz", "wb") as f:
        f.write(data)
    (tmp_path / "zst").mkdir()
    (tmp_path / "zst" / "in.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(data))
    (tmp_path / "pq").mkdir()
    pq.write_table(pa.table({"text": texts, "id": list(range(len(texts)))}), tmp_path / "pq" / "in.parquet")

    def run(inp, name, workers):
        prefix = str(tmp_path / "out" / name)
        assert pp.main(["--input", str(inp), "--output-prefix", prefix, "--tokenizer-type", "TikTokenizer",
                        "--tokenizer-model", "mistral-nemo", "--append-eod", "--workers", str(workers),
                        "--block-bytes", "2000", "--quiet"]) == 0
        p = Path(prefix + "_text_document")
        return p.with_suffix(".bin").read_bytes(), p.with_suffix(".idx").read_bytes()

    one = run(plain, "w1", 1)
    assert run(plain, "w2", 2) == one
    assert run(plain, "w0", 0) == one
    for sub in ("gz", "zst", "pq"):
        assert run(tmp_path / sub, sub, 2) == one, sub  # a directory as --input
    tk = load_tokenizer("TikTokenizer", "mistral-nemo")
    assert read_docs(str(tmp_path / "out" / "w2_text_document")) == [tk.encode(t) + [tk.eod] for t in texts]


def test_several_json_keys_and_merge(tmp_path):
    src = tmp_path / "in.jsonl"
    rows = [{"text": t, "title": t[:5]} for t in TEXTS]
    src.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    tk = load_tokenizer("TikTokenizer", "mistral-nemo")
    for name, part in (("a", rows[:3]), ("b", rows[3:])):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part), encoding="utf-8")
        assert pp.main(["--input", str(tmp_path / f"{name}.jsonl"), "--output-prefix", str(tmp_path / "parts" / name),
                        "--json-keys", "text", "title", "--tokenizer-type", "TikTokenizer",
                        "--tokenizer-model", "mistral-nemo", "--quiet"]) == 0
    assert read_docs(str(tmp_path / "parts" / "a_title_document")) == [tk.encode(r["title"]) for r in rows[:3]]
    out = str(tmp_path / "merged" / "all")
    rc = merge_mod.main(["--input", str(tmp_path / "parts" / "a_text_document"),
                         str(tmp_path / "parts" / "b_text_document"), "--output-prefix", out])
    assert rc == 0
    assert read_docs(out) == [tk.encode(r["text"]) for r in rows]
    proc = run_python(["tools/merge_datasets.py", "--input", str(tmp_path / "nothing"), "--output-prefix", out],
                      check=False)
    assert proc.returncode == 1 and "nothing" in proc.stderr


EDGE_TEXTS = [
    "", " ", "  ", "\n", "\r\n\r\n", "a  \n\n  b", "\t\tx", "x \t y", "end with spaces   ", "   lead",
    "x\n/y", "):\n  /z", "a/\n/\n/b", "foo(bar) + 1234567 - 3.5e-7", "HTTPServer fooBAR bazQux ABC",
    "<s> </s> <unk> [INST] [/INST] <SPECIAL_5> <pad>", "e\u0301 cafe\u0301 \u00e9", "日本語のテキスト 東京",
    "مرحبا بالعالم", "emoji 🙂🙂 and 👩\u200d👩\u200d👧", "\u00a0nbsp\u00a0 \u2028sep\u2029 \u3000ideo",
    "ctl \x1c\x1d\x1e\x1f \x00 \x7f",
    "    def f(self):\n        return {'a': [1, 2]}\n\n\n", "word\u0300\u0301 mark", "ǅungla ǈ title-case",
]


@pytest.mark.parametrize("model", ["mistral-nemo", "pixtral"])
def test_tekken_batch_paths_match_mistral_common(model):
    """The batch paths call tiktoken's encode_ordinary, not Tekkenizer.encode: same ids on
    whitespace runs, newlines before '/', special-looking text, marks, scripts and control chars."""
    tk = _library_tokenizer("TikTokenizer", model)
    ref = [tk.encode(t, bos=False, eos=False) for t in EDGE_TEXTS]
    for threads in (1, 2):
        tok = load_tokenizer("TikTokenizer", model, threads=threads)
        flat, lengths = tok.encode_batch_numpy(EDGE_TEXTS)
        assert lengths.tolist() == [len(r) for r in ref]
        assert flat.tolist() == [i for r in ref for i in r]
        assert tok.encode_batch(EDGE_TEXTS) == ref


@pytest.mark.parametrize("dtype,docs", [(np.uint16, [[5, 6, 7], [65000], [1, 2]]), (np.int32, [[131071] * 4, [0]]),
                                        (np.uint16, [])])
def test_index_is_byte_identical_to_megatron_builder(tmp_path, dtype, docs, monkeypatch):
    """The tool's own index writer (it does not import megatron-core) against IndexedDatasetBuilder,
    with the lengths spread over several finishing chunks."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    monkeypatch.setattr(pp, "_INDEX_CHUNK", 2)
    ref = str(tmp_path / "ref")
    builder = IndexedDatasetBuilder(ref + ".bin", dtype=dtype)
    for d in docs:
        builder.add_document(np.array(d, dtype=dtype), [len(d)])
    builder.finalize(ref + ".idx")
    ours = pp._Output(str(tmp_path / "ours"), dtype)
    for batch in (docs[:1], docs[1:]):  # written as two blocks, like two worker results
        ours.write(np.concatenate([np.array(d, dtype=dtype) for d in batch] or [np.array([], dtype)]).tobytes(),
                   np.array([len(d) for d in batch], dtype=np.int64))
    ours.finish()
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"ours{ext}").read_bytes() == Path(ref + ext).read_bytes(), ext
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ours.bin", "ours.idx", "ref.bin", "ref.idx"]
    if docs:  # megatron-core cannot map an empty .bin, its own builder's included
        assert read_docs(str(tmp_path / "ours")) == docs


def test_dtype_rule_matches_megatron_and_tool_does_not_import_it(tmp_path):
    from megatron.core.datasets.indexed_dataset import DType

    for vocab in (256, 512, 65499, 65500, 65536, 131072, 2**31 - 1):
        assert pp._optimal_dtype(vocab) == DType.optimal_dtype(vocab), vocab
    inp = write_jsonl(tmp_path / "in.jsonl", TEXTS)
    probe = ("import sys; from megatron_apriel.data import preprocess as pp; "
             f"rc = pp.main(['--input', {str(inp)!r}, '--output-prefix', {str(tmp_path / 'out')!r}, "
             "'--tokenizer-type', 'TikTokenizer', '--tokenizer-model', 'mistral-nemo', '--workers', '1', '--quiet']); "
             "print(sorted(m for m in ('torch', 'megatron.core') if m in sys.modules)); sys.exit(rc)")
    out = run_python(["-c", probe]).stdout
    assert out.strip().splitlines()[-1] == "[]"
    assert read_docs(str(tmp_path / "out_text_document"))


# ---------------------------------------------------------------- web-text documents, interruption

_rng = __import__("random").Random(3)
LONG_DOCS = [  # what web corpora hold besides prose: long runs, base64 blobs, minified code, huge documents
    "A short prose line before the long ones.",
    "x" * 2_000_000,
    "data:image/png;base64," + "".join(_rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")
                                       for _ in range(300_000)),
    "var a=function(b,c){return b.x=c||{},b};" * 20_000 + " déjà",
    "| cell |" + " " * 600_000 + "| next |\n" + "-" * 100_000,
    "Déjà vu\u00a0" + " " * 1_200_000 + "東京",  # a blank run tiktoken's regex engine gives up on
    "The end.",
]


def test_long_documents_are_named_and_progress_moves(tmp_path):
    """The compiled path writes every document (ids as mistral-common's, or for the run tiktoken
    cannot split, as the regex reference's), names the long ones with --slow-doc-seconds 0 and logs
    progress in bytes; the tiktoken path counts the document tiktoken fails on as a tokenizer_error
    naming its line, and writes the others identically."""
    from test_tekken_fast import _tiktoken_or_regex

    src = write_jsonl(tmp_path / "web.jsonl", LONG_DOCS)
    args = ["tools/preprocess_data.py", "--input", src, "--tokenizer-type", "TikTokenizer", "--tokenizer-model",
            "mistral-nemo", "--append-eod", "--workers", "2", "--log-seconds", "0", "--slow-doc-seconds", "0"]
    proc = run_python(args + ["--output-prefix", tmp_path / "c"])
    for no, text in enumerate(LONG_DOCS, 1):
        named = f"slow document {src}:{no}: {len(text):,} characters took"
        assert (named in proc.stderr) == (len(text) >= pp.LONG_DOC_CHARS), (no, proc.stderr[-2000:])
    assert "MB read" in proc.stderr
    tk = load_tokenizer("TikTokenizer", "mistral-nemo")
    expected = [[i + tk._offset for i in _tiktoken_or_regex(tk, t)] + [tk.eod] for t in LONG_DOCS]
    assert expected[:5] == [tk.encode(t) + [tk.eod] for t in LONG_DOCS[:5]]  # mistral-common where it can
    docs = read_docs(str(tmp_path / "c_text_document"))
    assert docs == expected
    stats = json.loads((tmp_path / "c.stats.json").read_text())
    assert stats["skipped"] == 0 and len(stats["slow_documents"]) == 5

    proc = run_python(args + ["--output-prefix", tmp_path / "t"], env={"MEGATRON_APRIEL_TEKKEN_FAST": "0"})
    stats = json.loads((tmp_path / "t.stats.json").read_text())
    assert stats["skipped_by_reason"] == {"tokenizer_error": 1}
    assert stats["skipped_examples"]["tokenizer_error"] == [f"{src}:6"]
    assert read_docs(str(tmp_path / "t_text_document")) == docs[:5] + docs[6:]


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT", "SIGKILL"])
def test_interrupted_runs_leave_no_temporary_files(tmp_path, sig):
    """SIGTERM and SIGINT remove the .tmp files and write nothing; a SIGKILLed run's leftovers are
    overwritten by the next run."""
    import os
    import signal
    import subprocess
    import sys
    import time

    line = json.dumps({"text": "A line of ordinary prose to tokenize, again and again. " * 18}) + "\n"
    src = tmp_path / "big.jsonl"
    # 180 MB: about 3 s of work on two quiet cores (the compiled Tekken path does 60 MB a second), so
    # the signal lands mid-run even when the test's polling is slowed by a loaded machine
    src.write_text(line * 180_000, encoding="utf-8")
    prefix = tmp_path / "o"
    tmp_bin = Path(f"{prefix}_text_document.bin.tmp")
    proc = subprocess.Popen([sys.executable, "tools/preprocess_data.py", "--input", str(src), "--output-prefix",
                             str(prefix), "--tokenizer-type", "TikTokenizer", "--tokenizer-model", "mistral-nemo",
                             "--workers", "2", "--block-bytes", "65536"], cwd=REPO, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONPATH": str(REPO)},
                            # SIGINT back at its default: a process started with it ignored (pytest-xdist's
                            # workers, a shell's background job) keeps ignoring it, as Python does
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while not (tmp_bin.exists() and tmp_bin.stat().st_size > 0) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be interrupted"
    proc.send_signal(getattr(signal, sig))
    _, err = proc.communicate(timeout=120)
    outputs = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("o"))
    if sig == "SIGKILL":
        assert proc.returncode == -signal.SIGKILL and "o_text_document.bin.tmp" in outputs
        small = write_jsonl(tmp_path / "small.jsonl", TEXTS)
        assert pp.main(["--input", str(small), "--output-prefix", str(prefix), "--tokenizer-type", "TikTokenizer",
                        "--tokenizer-model", "mistral-nemo", "--quiet"]) == 0
        tk = load_tokenizer("TikTokenizer", "mistral-nemo")
        assert read_docs(f"{prefix}_text_document") == [tk.encode(t) for t in TEXTS]
        outputs = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("o"))
        assert outputs == ["o.stats.json", "o_text_document.bin", "o_text_document.idx"]
        return
    assert proc.returncode == {"SIGTERM": 143, "SIGINT": 130}[sig], err[-2000:]
    assert "interrupted" in err and "temporary files removed" in err
    assert outputs == []
