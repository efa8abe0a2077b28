"""The compiled Tekken path (megatron_apriel/data/_tekken_fast.c) against tiktoken.

The reference is tiktoken's ``encode_ordinary`` on the Tekken core mistral-common builds
(``TekkenTokenizer._core``) and mistral-common's ``Tekkenizer.encode``; every comparison is exact.
"""

from __future__ import annotations

import json
import random
import shutil
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import tiktoken
from conftest import INSTALL_HINT, run_python

try:
    from megatron_apriel.data import _tekken_fast as fast_mod
except ImportError:
    # not importorskip: where a C compiler exists (CI installs gcc) `pip install -e .` builds the
    # extension, so a missing build is a failure; without one, skip with the install line.
    if shutil.which("cc") or shutil.which("gcc"):
        raise
    pytest.skip(f"no C compiler, so the compiled Tekken path is not built: {INSTALL_HINT}, then pip install -e .",
                allow_module_level=True)
from megatron_apriel.data.tokenizers import load_tokenizer

ASCII_EDGE = (list(" \t\r\n\x0b\x0c\x1c\x1d\x1e\x1f\x00\x7f/_'\"!.,:;-+=()[]{}#*\\") + list("AbCdEfGxyzQW")
              + list("0129"))
NON_ASCII = ["é", "ß", "İ", "中", "ǅ", "ʰ", "\u0301", "\u00a0", "\u0085", "\u2028", "\u3000", "😀", "Ω", "٣"]
WORDS = ["the", "The", "HTTPServer", "x", "  ", "\n", "\r\n", "\t", " /", "//", "+=", "42", "é", "naïve", "中文",
         "\u00a0", "\u3000", "ǅungla", "ʰa", "e\u0301", "😀!", "x/\n", "   \n  ", "\x1c", "''", "A1b2"]


@pytest.fixture(scope="module")
def tok():
    t = load_tokenizer("TikTokenizer", "mistral-nemo", fast=True)
    assert t.tekken_path == "compiled", t.tekken_path_reason
    return t


def fuzz_texts(seed: int, n: int) -> list[str]:
    rng = random.Random(seed)
    texts = ["", " ", "\n", "\t \t", "a ", "A\n", " " * 50, "x" + " " * 37, "\n" * 9 + "  ", "é", " é ", "\r\n\r\n"]
    for k in range(n):
        kind = k % 4
        if kind == 0:  # ASCII characters only, dense in class changes
            s = "".join(rng.choice(ASCII_EDGE) for _ in range(rng.randint(1, 60)))
        elif kind == 1:  # the same with non-ASCII characters mixed in
            s = "".join(rng.choice(ASCII_EDGE + NON_ASCII) for _ in range(rng.randint(1, 60)))
        elif kind == 2:  # words and separators: long ASCII stretches around non-ASCII islands
            s = "".join(rng.choice(WORDS) + rng.choice(["", " ", " ", "\n", "\t", "  "])
                        for _ in range(rng.randint(1, 40)))
        else:  # long whitespace runs, possibly ending the text
            parts = [rng.choice(WORDS), rng.choice(" \t\n\x0b\x0c\r") * rng.randint(1, 30), rng.choice(WORDS + [""])]
            s = "".join(parts) + rng.choice(["", " ", "   ", "\n "])
        texts.append(s)
    return texts


def stdlib_texts() -> list[str]:
    lib = Path(sysconfig.get_paths()["stdlib"])
    names = ["argparse.py", "json/decoder.py", "textwrap.py", "difflib.py", "unicodedata.py", "locale.py",
             "shlex.py", "re/_casefix.py", "test/test_unicode.py"]
    return [(lib / n).read_text(encoding="utf-8") for n in names if (lib / n).exists()]


def test_fuzz_equals_tiktoken(tok):
    texts = fuzz_texts(0, 6000)
    assert any(not t.isascii() for t in texts) and any(t.isascii() for t in texts)
    for t in texts:
        assert tok._fast.encode(t) == tok._core.encode_ordinary(t), repr(t)


def test_stdlib_sources_equal_tiktoken(tok):
    texts = stdlib_texts()
    assert len(texts) >= 6 and any(not t.isascii() for t in texts)  # shlex.py and re/_casefix.py are not ASCII
    for t in texts:
        assert tok._fast.encode(t) == tok._core.encode_ordinary(t)


def test_non_ascii_regions_alone_go_to_tiktoken(tok):
    """Only the regions between safe boundaries that hold non-ASCII reach tiktoken; the rest is compiled."""
    seen: list[str] = []

    def fallback(s):
        seen.append(s)
        return tok._core.encode_ordinary(s)

    enc = fast_mod.Encoder(tok.tk._model._mergeable_ranks, fallback)
    text = "def f(x):\n    return 'déjà vu' + x  # 東京\nprint(f('a'))\n" * 3
    assert enc.encode(text) == tok._core.encode_ordinary(text)
    assert seen and all(not s.isascii() for s in seen)
    assert sum(map(len, seen)) < len(text) / 3
    seen.clear()
    ascii_text = "plain ASCII only\n\tand more  \n"
    assert enc.encode(ascii_text) == tok._core.encode_ordinary(ascii_text) and seen == []


def test_bpe_merges_on_a_small_vocabulary():
    """With 256 bytes and a few merges most pieces are not whole tokens, so the merge order decides
    the ids (ties between equal-rank pairs included: 'aaaa', 'abab')."""
    pattern = fast_mod.PATTERN
    ranks = {bytes([b]): b for b in range(256)}
    for w in [b"aa", b"ab", b"ba", b"aaa", b"bab", b"  ", b" a", b"ab ", b"\n\n", b"xy", b"yx", b"xyx", b"in", b"the"]:
        ranks.setdefault(w, len(ranks))
    ref = tiktoken.Encoding("small", pat_str=pattern, mergeable_ranks=ranks, special_tokens={})
    enc = fast_mod.Encoder(ranks, ref.encode_ordinary)
    rng = random.Random(1)
    alphabet = list("abxy ") + ["\n", "the", "in", "ab", "aa", "é"]
    for _ in range(3000):
        s = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        assert enc.encode(s) == ref.encode_ordinary(s), repr(s)


def test_bpe_heap_merge_on_long_pieces_of_a_small_vocabulary():
    """Pieces of 100 bytes or more take the heap merge; with few merges in the vocabulary, long runs
    of the same and alternating bytes give many equal-rank ties, which must resolve leftmost first."""
    ranks = {bytes([b]): b for b in range(256)}
    for w in [b"aa", b"ab", b"ba", b"aaa", b"bab", b"aaaa", b"abab", b"baba", b"  ", b"    ", b"xy", b"yx", b"xyx"]:
        ranks.setdefault(w, len(ranks))
    ref = tiktoken.Encoding("small", pat_str=fast_mod.PATTERN, mergeable_ranks=ranks, special_tokens={})
    enc = fast_mod.Encoder(ranks, ref.encode_ordinary)
    rng = random.Random(2)
    texts = [c * n for c in ("a", "ab", "aab", "xy", " ") for n in (99, 100, 101, 257, 1000)]
    texts += ["".join(rng.choice("abxy") for _ in range(rng.randint(90, 600))) for _ in range(300)]
    for s in texts:
        assert enc.encode(s) == ref.encode_ordinary(s), repr(s)


def test_encoder_rejects_a_vocabulary_without_all_bytes():
    with pytest.raises(ValueError, match="single byte 0x00"):
        fast_mod.Encoder({b"a": 0}, lambda s: [])


def test_batch_numpy_equals_per_document_encode(tok):
    texts = fuzz_texts(2, 300)[:300] + stdlib_texts()[:2]
    flat, lengths = tok.encode_batch_numpy(texts)
    assert flat.dtype == np.int32 and lengths.dtype == np.int64 and lengths.shape == (len(texts),)
    ref = [tok.encode(t) for t in texts]  # mistral-common's Tekkenizer.encode, special-token offset included
    assert lengths.tolist() == [len(r) for r in ref]
    assert flat.tolist() == [i for r in ref for i in r]
    assert tok.encode_batch(texts) == ref
    threaded = load_tokenizer("TikTokenizer", "mistral-nemo", threads=2)
    f2, l2 = threaded.encode_batch_numpy(texts)
    assert np.array_equal(f2, flat) and np.array_equal(l2, lengths)
    empty = tok.encode_batch_numpy([])
    assert empty[0].size == 0 and empty[1].size == 0


def test_fallback_path_gives_the_same_ids(tok, monkeypatch):
    texts = fuzz_texts(3, 200) + stdlib_texts()[:1]
    off = load_tokenizer("TikTokenizer", "mistral-nemo", fast=False)
    assert off.tekken_path == "tiktoken" and off._fast is None
    monkeypatch.setenv("MEGATRON_APRIEL_TEKKEN_FAST", "0")
    env_off = load_tokenizer("TikTokenizer", "mistral-nemo")
    assert env_off.tekken_path == "tiktoken"
    a, b, c = (t.encode_batch_numpy(texts) for t in (tok, off, env_off))
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert np.array_equal(a[0], c[0]) and np.array_equal(a[1], c[1])


def test_other_patterns_use_tiktoken():
    v1 = load_tokenizer("TikTokenizer", "mistral-nemo", pattern="v1")
    assert v1.tekken_path == "tiktoken" and "pattern" in v1.tekken_path_reason
    v2 = load_tokenizer("TikTokenizer", "mistral-nemo", pattern="v2")  # Megatron-LM's v2 is the file's pattern
    assert v2.tekken_path == "compiled"
    text = "Hello  World\n\n  x=1;//y\u00a0z"
    assert v1._encode_raw(text) == v1._core.encode_ordinary(text)


def test_preprocess_records_the_path_and_output_is_identical(tmp_path):
    src = tmp_path / "in.jsonl"
    texts = fuzz_texts(4, 400)[12:] + stdlib_texts()[:3]
    with open(src, "w", encoding="utf-8") as f:
        for t in texts:
            if t.strip():
                f.write(json.dumps({"text": t}) + "\n")
    outs = {}
    for name, env in [("compiled", {}), ("tiktoken", {"MEGATRON_APRIEL_TEKKEN_FAST": "0"})]:
        prefix = str(tmp_path / name)
        run_python(["tools/preprocess_data.py", "--input", src, "--output-prefix", prefix, "--tokenizer-type",
                    "TikTokenizer", "--tokenizer-model", "mistral-nemo", "--append-eod", "--workers", "2",
                    "--quiet"], env={"OMP_NUM_THREADS": "1", **env})
        stats = json.loads(Path(prefix + ".stats.json").read_text())
        assert stats["tekken_path"] == name
        outs[name] = [Path(prefix + "_text_document" + ext).read_bytes() for ext in (".bin", ".idx")]
    assert outs["compiled"] == outs["tiktoken"]


def test_without_the_extension_tiktoken_runs_and_says_so_once(tok, monkeypatch, capsys):
    import sys

    from megatron_apriel.data import tokenizers

    monkeypatch.setitem(sys.modules, "megatron_apriel.data._tekken_fast", None)  # as if never built
    monkeypatch.setattr(tokenizers, "_warned_no_extension", False)
    a = load_tokenizer("TikTokenizer", "mistral-nemo")
    b = load_tokenizer("TikTokenizer", "mistral-nemo")
    assert a.tekken_path == b.tekken_path == "tiktoken" and a.tekken_path_reason == "extension not built"
    assert capsys.readouterr().err.count("_tekken_fast is not built") == 1
    texts = fuzz_texts(5, 100)
    assert np.array_equal(a.encode_batch_numpy(texts)[0], tok.encode_batch_numpy(texts)[0])


# ---------------------------------------------------------------- long pieces

_rng = random.Random(7)
_B64 = "".join(_rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/") for _ in range(4096))
# one run per class of the Tekken pattern, and the mixed lines web corpora hold: each is repeated to
# LONG_CHARS characters, so each is one pre-tokenized piece (or a run of them) that long
LONG_RUNS = {
    "lower": "x", "upper": "X", "upper-lower": "Ab", "lower-upper": "aB", "digits": "7", "digit-string": "0123456789",
    "spaces": " ", "tabs": "\t", "newlines": "\n", "crlf": "\r\n", "space-newline": " \n", "punctuation": "=",
    "punctuation-mix": "};", "slash": "/", "non-ascii-letters": "é", "cjk": "中", "nbsp": "\u00a0",
    "ideographic-space": "\u3000", "emoji": "😀", "base64": _B64, "minified": "function(a,b){return a.x=b||{},a}",
}
LONG_CHARS = 400_000
# the compiled path's CPU time for one long text (about 0.1 s here); the merge quadratic in the piece
# length that the heap merge replaced took 30 s on 400,000 'x'
LONG_SECONDS = 2.0


def _tiktoken_or_regex(tok, text: str) -> list[int]:
    """tiktoken's ``encode_ordinary``; where its regex engine gives up (a run of about a million blanks
    exceeds fancy-regex's backtracking limit: a Rust panic), the same pattern split by the ``regex``
    module and each piece through tiktoken's own BPE (``encode_single_piece``)."""
    try:
        return tok._core.encode_ordinary(text)
    except BaseException as e:  # pyo3's PanicException derives from BaseException
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
    import regex

    pieces = regex.findall(tok.tk._model._pat_str, text)
    assert "".join(pieces) == text
    return [i for p in pieces for i in tok._core.encode_single_piece(p.encode("utf-8"))]


def test_the_regex_reference_equals_tiktoken(tok):
    texts = [unit * (100_000 // len(unit)) for unit in LONG_RUNS.values()]
    texts += ["é" + t + "x" for t in texts[:: 3]] + stdlib_texts()[:2]
    import regex

    pat = regex.compile(tok.tk._model._pat_str)
    for t in texts:
        ref = [i for p in pat.findall(t) for i in tok._core.encode_single_piece(p.encode("utf-8"))]
        assert ref == tok._core.encode_ordinary(t)


@pytest.mark.parametrize("name", list(LONG_RUNS))
def test_long_runs_equal_tiktoken_in_linear_time(tok, name):
    """400,000 characters of one class, alone (the run ends the text), between ASCII words and
    between non-ASCII words (the compiled path then cuts the text into regions for tiktoken)."""
    import time

    unit = LONG_RUNS[name]
    run = unit * (LONG_CHARS // len(unit))
    for text in (run, "Hello " + run + " world.", "Déjà " + run + " 東京"):
        t0 = time.thread_time()
        ids = tok._fast.encode(text)
        took = time.thread_time() - t0
        assert ids == _tiktoken_or_regex(tok, text), (name, text[:8])
        assert took < LONG_SECONDS, f"{name}: {took:.1f}s CPU for {len(text):,} characters"


@pytest.mark.parametrize("text", ["\u00a0" + " " * 2_500_000 + "x", "Déjà " + "\u00a0" * 2_500_000 + " 東京"],
                         ids=["spaces", "nbsp"])
def test_blank_runs_past_tiktoken_s_limit(tok, text):
    """Runs of blanks long enough that tiktoken's regex engine gives up on them (in text that is not
    all ASCII, the compiled path must not hand them to tiktoken)."""
    import time

    t0 = time.thread_time()
    ids = tok._fast.encode(text)
    took = time.thread_time() - t0
    assert ids == _tiktoken_or_regex(tok, text)
    assert took < LONG_SECONDS * 6, f"{took:.1f}s CPU for {len(text):,} characters"


def test_long_documents_through_mistral_common(tok):
    """Three million characters mixing the classes, as the batch path sees them, against
    mistral-common's ``Tekkenizer.encode`` (special-token offset included)."""
    doc = "".join(unit * (3_000_000 // len(LONG_RUNS) // len(unit)) + "\n" for unit in LONG_RUNS.values())
    flat, lengths = tok.encode_batch_numpy([doc[:200_000], doc])
    ref_short = tok.encode(doc[:200_000])
    try:
        ref = tok.encode(doc)
    except BaseException as e:
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        ref = [i + tok._offset for i in _tiktoken_or_regex(tok, doc)]
    assert lengths.tolist() == [len(ref_short), len(ref)]
    assert flat.tolist() == ref_short + ref
