"""One tokenizer interface over HF ``tokenizers``, sentencepiece and Mistral's Tekken (mistral-common).

The libraries do the tokenizing; this module only gives them the common shape the data tools need
(``encode`` without BOS/EOS, a batch path that uses each library's native threads, ``eod``/``bos``
ids, and a numpy path that gathers a batch's ids into one int32 buffer, so a worker hands back one
array instead of a Python list per document). The ``--tokenizer-type`` names and flags are
Megatron-LM's.

Tekken goes through ``mistral_common.tokens.tokenizers.tekken.Tekkenizer`` so ids are exactly
mistral-common's; the batch paths call the same tiktoken core that ``Tekkenizer.encode`` calls (its
``encode_ordinary`` entry when the file defines no in-text special tokens, see ``TekkenTokenizer``)
and add the same special-token offset. With the file's own split pattern the batch paths use the
compiled ``_tekken_fast`` extension instead when it is built (same ids: it implements that pattern on
ASCII and hands every non-ASCII region to the same tiktoken core; see its source).
"""

from __future__ import annotations

import argparse
import array
import importlib
import json
import os
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np

from megatron_apriel.errors import InputError

# MEGATRON_APRIEL_TEKKEN_FAST=0 turns the compiled Tekken path off (tiktoken alone, same ids)
FAST_ENV = "MEGATRON_APRIEL_TEKKEN_FAST"
_warned_no_extension = False


def _tekken_fast_module():
    try:
        return importlib.import_module("megatron_apriel.data._tekken_fast")
    except ImportError:  # built without a C compiler (setup.py marks the extension optional)
        return None

# array.array.fromlist is the cheapest list[int] -> C buffer copy (about 20 ns a token, against
# 25-35 for np.array/np.fromiter per list); the typecode whose items are 4 bytes
_INT32 = next(t for t in "ihl" if array.array(t).itemsize == 4)


def _concat_lists(lists: Sequence[Sequence[int]], offset: int = 0) -> tuple[np.ndarray, np.ndarray]:
    buf = array.array(_INT32)
    lengths = np.empty(len(lists), dtype=np.int64)
    for i, ids in enumerate(lists):
        buf.fromlist(ids) if isinstance(ids, list) else buf.extend(ids)
        lengths[i] = len(ids)
    flat = np.frombuffer(buf, dtype=np.int32)
    return (flat + np.int32(offset)) if offset else flat, lengths


TOKENIZER_TYPES = ("HuggingFaceTokenizer", "SentencePieceTokenizer", "TikTokenizer")
TOKENIZER_ALIASES = {"Tekken": "TikTokenizer", "TekkenTokenizer": "TikTokenizer", "HFTokenizer": "HuggingFaceTokenizer"}
TEKKEN_ALIASES = {"mistral-nemo": "tekken_240718.json", "pixtral": "tekken_240911.json"}


class Tokenizer:
    """Base: ``encode_batch`` and ``encode_batch_numpy`` fall back to per-text ``encode``."""

    name: str
    vocab_size: int
    eod: int
    bos: int | None
    threads: int = 1

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def encode_text(self, text: str) -> list[int]:
        """``encode`` with control-token strings (``</s>``, ``[IMG]``) read as ordinary text: what
        message content needs, so a record cannot write a turn boundary or an image token. The
        libraries whose ``encode`` never parses special tokens from text use ``encode`` itself."""
        return self.encode(text)

    @property
    def control_tokens(self) -> list[str]:
        """The strings of the special tokens (those a record's text is counted for spelling)."""
        raise NotImplementedError

    def decode(self, ids: Sequence[int]) -> str:
        raise NotImplementedError

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def encode_batch_numpy(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """All texts' ids concatenated (int32) and the per-text lengths (int64)."""
        return _concat_lists(self.encode_batch(texts))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, vocab_size={self.vocab_size}, eod={self.eod}, bos={self.bos})"


class HuggingFaceTokenizer(Tokenizer):
    """A ``tokenizer.json`` (or a directory holding one) via transformers' AutoTokenizer."""

    def __init__(self, model: str, threads: int = 1, **_):
        # each tokenizer type imports its own library here: a preprocessing worker loads only the one it runs
        from transformers import AutoTokenizer

        path = Path(model)
        if path.is_file() and path.name.endswith(".json"):
            from transformers import PreTrainedTokenizerFast

            self.hf = PreTrainedTokenizerFast(tokenizer_file=str(path))
        else:
            self.hf = AutoTokenizer.from_pretrained(model)
        self.backend = self.hf.backend_tokenizer
        self.name = str(model)
        self.threads = threads
        self.vocab_size = len(self.hf)
        eod = self.hf.eos_token_id
        if eod is None:
            raise ValueError(f"tokenizer {model} defines no eos token: it is needed as end-of-document id")
        self.eod = int(eod)
        self.bos = None if self.hf.bos_token_id is None else int(self.hf.bos_token_id)

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_text(self, text: str) -> list[int]:
        # the backend's switch is per object: set for this call only, so ``encode`` keeps its meaning
        previous = self.backend.encode_special_tokens
        self.backend.encode_special_tokens = True
        try:
            return self.backend.encode(text, add_special_tokens=False).ids
        finally:
            self.backend.encode_special_tokens = previous

    @property
    def control_tokens(self) -> list[str]:
        return [t.content for t in self.hf.added_tokens_decoder.values() if t.special]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        # encode_batch_fast skips offsets; it parallelises with rayon (RAYON_NUM_THREADS).
        return [e.ids for e in self.backend.encode_batch_fast(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=False)


class SentencePieceTokenizer(Tokenizer):
    def __init__(self, model: str, threads: int = 1, **_):
        import sentencepiece  # deferred: see HuggingFaceTokenizer

        self.sp = sentencepiece.SentencePieceProcessor(model_file=str(model))
        self.name = str(model)
        self.threads = threads
        self.vocab_size = int(self.sp.get_piece_size())
        self.eod = int(self.sp.eos_id())
        if self.eod < 0:
            raise ValueError(f"sentencepiece model {model} has no eos piece: it is needed as end-of-document id")
        self.bos = int(self.sp.bos_id()) if self.sp.bos_id() >= 0 else None

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)  # control pieces (<s>, </s>) are never read from text

    @property
    def control_tokens(self) -> list[str]:
        return [self.sp.id_to_piece(i) for i in range(self.vocab_size) if self.sp.is_control(i)]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self.sp.encode(list(texts), num_threads=self.threads)

    def decode(self, ids: Sequence[int]) -> str:
        return self.sp.decode(list(ids))


def resolve_tekken(model: str) -> Path:
    """``mistral-nemo`` / ``pixtral`` -> the Tekken JSON shipped in mistral_common/data/; else a path."""
    if model in TEKKEN_ALIASES:
        import mistral_common  # deferred: see HuggingFaceTokenizer

        return Path(mistral_common.__file__).parent / "data" / TEKKEN_ALIASES[model]
    path = Path(model)
    if not path.is_file():
        raise FileNotFoundError(f"Tekken tokenizer {model!r}: not a file and not one of {sorted(TEKKEN_ALIASES)}")
    return path


class TekkenTokenizer(Tokenizer):
    """Mistral's Tekken JSON (Megatron-LM's ``TikTokenizer``) through mistral-common.

    ``pattern`` (``v1``/``v2`` as Megatron-LM names them, or a regex) and ``vocab_size`` override
    the file's config, as Megatron-LM's ``--tiktoken-pattern`` / ``--vocab-size`` do; by default
    the file's own pattern and ``default_vocab_size`` are used.

    ``fast`` (default: on unless ``MEGATRON_APRIEL_TEKKEN_FAST=0``) lets the batch paths use the
    compiled extension when it is built and the pattern is the one it implements; ``tekken_path``
    says which one runs: ``"compiled"`` or ``"tiktoken"`` (``tekken_path_reason`` says why).
    """

    def __init__(self, model: str, threads: int = 1, vocab_size: int | None = None,
                 pattern: str | None = None, fast: bool | None = None, **_):
        from mistral_common.tokens.tokenizers.tekken import Tekkenizer  # deferred: see HuggingFaceTokenizer

        path = resolve_tekken(model)
        if pattern is not None or vocab_size is not None:
            data = json.loads(path.read_text(encoding="utf-8"))
            if pattern is not None:
                # megatron-core's named patterns only; preprocessing does not import megatron-core otherwise
                from megatron.core.tokenizers.text.libraries import tiktoken_tokenizer as mt

                named = {"v1": mt._PATTERN_TIKTOKEN_V1, "v2": mt._PATTERN_TIKTOKEN_V2}
                data["config"]["pattern"] = named.get(pattern, pattern)
            if vocab_size is not None:
                data["config"]["default_vocab_size"] = int(vocab_size)
            with tempfile.TemporaryDirectory() as tmp:
                patched = Path(tmp) / path.name
                patched.write_text(json.dumps(data), encoding="utf-8")
                self.tk = Tekkenizer.from_file(patched)
        else:
            self.tk = Tekkenizer.from_file(path)
        self.name = str(model)
        self.threads = threads
        self.vocab_size = int(self.tk.n_words)
        self.eod = int(self.tk.eos_id)
        self.bos = int(self.tk.bos_id)
        self._offset = int(self.tk.num_special_tokens)
        self._core = self.tk._model._core_bpe  # the tiktoken core Tekkenizer.encode uses
        # Tekkenizer.encode calls tiktoken's ``encode(text, allowed_special=set())``. With no special
        # tokens in the tiktoken Encoding (Tekken keeps them outside, as the id offset) that is the
        # same split and the same BPE as ``encode_ordinary``, which skips the special-token search
        # (measured 1.3-1.5x faster on source code; benchmarks/preprocess.py checks equality).
        self._ordinary = not self.tk._model.special_tokens_set
        self._fast = None
        self.tekken_path, self.tekken_path_reason = "tiktoken", self._setup_fast(fast)
        if self._fast is not None:
            self.tekken_path = "compiled"

    def _setup_fast(self, fast: bool | None) -> str:
        global _warned_no_extension
        if fast is None:
            fast = os.environ.get(FAST_ENV, "1").strip().lower() not in ("0", "false", "no", "off")
        if not fast:
            return f"disabled ({FAST_ENV}=0 or fast=False)"
        if not self._ordinary:
            return "the tiktoken encoding defines in-text special tokens"
        module = _tekken_fast_module()
        if module is None:
            if not _warned_no_extension:
                _warned_no_extension = True
                print("warning: megatron_apriel.data._tekken_fast is not built (no C compiler at install?): "
                      "Tekken tokenizing uses tiktoken alone, same ids, about 2-3x slower", file=sys.stderr)
            return "extension not built"
        if self.tk._model._pat_str != module.PATTERN:
            return "split pattern differs from the Tekken pattern the extension implements"
        self._fast = module.Encoder(self.tk._model._mergeable_ranks, self._core.encode_ordinary)
        return "extension built, Tekken pattern"

    def encode(self, text: str) -> list[int]:
        return self.tk.encode(text, bos=False, eos=False)  # special tokens live outside the text vocabulary

    @property
    def control_tokens(self) -> list[str]:
        return [self.tk.id_to_piece(i) for i in range(self._offset)]

    def _encode_raw(self, text: str) -> list[int]:
        """Ids before the special-token offset."""
        if self._fast is not None:
            return self._fast.encode(text)
        if self._ordinary:
            return self._core.encode_ordinary(text)
        return self._core.encode(text, set())

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        off = self._offset
        return [[t + off for t in ids] for ids in self._encode_all(texts)]

    def _encode_all(self, texts: Sequence[str]) -> list[list[int]]:
        if self.threads > 1 and len(texts) > 1:
            # tiktoken's core releases the GIL, so threads really run in parallel.
            with ThreadPoolExecutor(self.threads) as ex:
                return list(ex.map(self._encode_raw, texts))
        return [self._encode_raw(t) for t in texts]

    def encode_batch_numpy(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        if self._fast is None:
            return _concat_lists(self._encode_all(texts), self._offset)
        # one C call per batch (per thread): ids land in one int32 buffer, offset already added
        if self.threads > 1 and len(texts) > 1:
            step = -(-len(texts) // self.threads)
            chunks = [texts[i:i + step] for i in range(0, len(texts), step)]
            with ThreadPoolExecutor(self.threads) as ex:  # the extension releases the GIL on ASCII text
                parts = list(ex.map(lambda c: self._fast.encode_batch(c, self._offset), chunks))
        else:
            parts = [self._fast.encode_batch(texts, self._offset)]
        flat = np.concatenate([np.frombuffer(ids, dtype=np.int32) for ids, _ in parts])
        lengths = np.concatenate([np.frombuffer(lens, dtype=np.int64) for _, lens in parts])
        return flat, lengths

    def decode(self, ids: Sequence[int]) -> str:
        return self.tk.decode(list(ids))


_CLASSES = {"HuggingFaceTokenizer": HuggingFaceTokenizer, "SentencePieceTokenizer": SentencePieceTokenizer,
            "TikTokenizer": TekkenTokenizer}


_EXPECTED = {"HuggingFaceTokenizer": "expected a tokenizer.json or an HF tokenizer folder",
             "SentencePieceTokenizer": "expected a SentencePiece .model file",
             "TikTokenizer": "expected a Mistral Tekken JSON file, 'mistral-nemo' or 'pixtral'"}


def load_tokenizer(tokenizer_type: str, tokenizer_model: str, **kw) -> Tokenizer:
    """Build a tokenizer; ``kw``: ``threads``, and for TikTokenizer ``vocab_size``, ``pattern``."""
    kind = TOKENIZER_ALIASES.get(tokenizer_type, tokenizer_type)
    if kind not in _CLASSES:
        raise ValueError(f"unknown --tokenizer-type {tokenizer_type!r}; expected one of {', '.join(TOKENIZER_TYPES)}")
    if tokenizer_model is None:
        raise ValueError("--tokenizer-model is required")
    if kind != "TikTokenizer" and not os.path.exists(tokenizer_model):
        raise FileNotFoundError(f"--tokenizer-model {tokenizer_model}: no such file or directory")
    if kind != "TikTokenizer":
        kw.pop("vocab_size", None)
        kw.pop("pattern", None)
    try:
        return _CLASSES[kind](tokenizer_model, **kw)
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as e:
        # a file or folder of another kind: the libraries' own errors (sentencepiece's RuntimeError,
        # mistral-common's KeyError, transformers' five-line conversion advice) name neither flag nor kind
        first = (str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)).strip().splitlines()
        raise InputError(f"--tokenizer-model {tokenizer_model}: not a {kind} model ({_EXPECTED[kind]}"
                         + (f"; {first[0][:160]}" if first else "") + ")") from None


def add_tokenizer_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    g = parser.add_argument_group("tokenizer")
    g.add_argument("--tokenizer-type", required=True, choices=list(TOKENIZER_TYPES) + list(TOKENIZER_ALIASES),
                   help="HuggingFaceTokenizer (tokenizer.json or HF directory), SentencePieceTokenizer "
                        "(.model), TikTokenizer (Mistral Tekken JSON via mistral-common)")
    g.add_argument("--tokenizer-model", required=True,
                   help="path; for TikTokenizer also 'mistral-nemo' or 'pixtral' (files shipped with mistral-common)")
    g.add_argument("--vocab-size", type=int, default=None,
                   help="TikTokenizer: vocabulary size (default: the file's default_vocab_size, 131072 for Nemo)")
    g.add_argument("--tiktoken-pattern", default=None,
                   help="TikTokenizer: v1, v2 or a regex (default: the pattern stored in the Tekken file)")
    return parser


def tokenizer_from_args(args: argparse.Namespace, **kw) -> Tokenizer:
    return load_tokenizer(args.tokenizer_type, args.tokenizer_model, vocab_size=getattr(args, "vocab_size", None),
                          pattern=getattr(args, "tiktoken_pattern", None), **kw)
