"""Image-text samples: JSONL + image files -> megatron-core indexed datasets, and the Dataset the
training loop reads for the Pixtral / LLaVA model.

``apriel preprocess-multimodal`` (``tools/preprocess_multimodal.py``) writes, for ``--output-prefix P``:

* ``P_tokens_document.bin/.idx``     one document per sample: token ids, every image placeholder
  expanded exactly as HF ``PixtralProcessor`` writes it (per patch row ``[IMG]`` x width/patch then
  ``[IMG_BREAK]``, the last row ending in ``[IMG_END]``);
* ``P_loss_mask_document.bin/.idx``  one uint8 per token: 1 = trained on (the response and its end
  token; every text token for ``text`` records), never on image tokens or the prompt;
* ``P_images_document.bin/.idx``     uint8, one document per distinct image: its PNG bytes after
  ``PixtralImageProcessor``'s resize (longest edge <= ``image_size``, sides multiples of the patch);
* ``P_image_refs_document.bin/.idx`` int32, one document per sample: the sample's rows of
  ``P_images`` in placeholder order (empty for text-only samples);
* ``P_multimodal.json``              the processor settings (patch, image size, mean/std, token
  ids), the counts of kept and skipped records with reasons (with up to 1000 ``file:line``
  examples), of stored images per normalisation, and of the records whose text spells
  control tokens (kept: prompt, response and text are encoded with control-token strings read as
  ordinary text, ``Tokenizer.encode_text``, so ``</s>`` or ``[IMG]`` in a caption stays a caption).

Image files are read by :func:`megatron_apriel.data.images.load_image`: a bad image (missing,
unreadable, truncated, over ``--max-image-pixels`` from its header, a decompression bomb, an
unsupported pixel mode, so thin that a side would shrink to 0 pixels) skips its record under that reason; odd but valid ones are normalised
(EXIF orientation, first frame, RGB conversion, large JPEGs decoded at reduced DCT scale), so one
hostile file never stops a run and memory is bounded by the pixel budget.

Why the images are stored resized: the number of image tokens is fixed when the sample is written,
so the pixels must be the ones it was counted for whatever image backend runs at training time.
Resizing an already patch-aligned image is the identity in ``PixtralImageProcessor``, so the reader
only rescales and normalises. PNG keeps it lossless at a fraction of raw size. Why references
instead of one block per sample: synthetic tasks reuse a source image in many samples, and a file
named by several records is stored once. All files are written under temporary names and renamed
when complete, the JSON last.

Input records (one JSON object a line; image paths relative to the JSONL file or absolute):
``{"images": ["a.png"], "prompt": "<image>\\nHow many circles?", "response": "3"}`` (loss on the
response) or ``{"images": [...], "text": "<image> A caption."}`` (loss on every text token, the
captioning / interleaved form). The number of placeholders must equal the number of images; a
record without any placeholder gets its images at the start of the prompt (LLaVA convention).

:class:`MultimodalDataset` returns SFTDataset-like items plus the sample's images and
:meth:`MultimodalDataset.collate` builds the micro-batch: ``tokens``, ``labels``, ``loss_mask``,
``position_ids`` [b, s]; ``pixel_values`` float32 [N, 3, H, W] (images in placeholder order, row 0
first, zero-padded to the batch's largest H, W, as ``PixtralImageProcessor`` pads) and
``image_sizes`` int64 [N, 2].
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Iterator, Optional, Sequence

import numpy as np
import torch

from megatron_apriel.data.images import DEFAULT_MAX_PIXELS, CountedError, count_notes
from megatron_apriel.data.packing import cu_seqlens_from_lengths, plan_bins

logger = logging.getLogger(__name__)

TOKENS_KEY = "tokens"
MASK_KEY = "loss_mask"
IMAGES_KEY = "images"
REFS_KEY = "image_refs"
KEYS = (TOKENS_KEY, MASK_KEY, IMAGES_KEY, REFS_KEY)
PLACEHOLDER = "<image>"


def dataset_path(prefix: str, key: str) -> str:
    return f"{prefix}_{key}_document"


def meta_path(prefix: str) -> str:
    return f"{prefix}_multimodal.json"


@dataclass
class ImageLayout:
    """How images become pixels and tokens (Pixtral-12B's values by default)."""

    patch_size: int = 16
    image_size: int = 1024  # longest edge after resize
    image_token_id: int = 10
    image_break_token_id: int = 12
    image_end_token_id: int = 13
    image_mean: list[float] = field(default_factory=lambda: [0.48145466, 0.4578275, 0.40821073])
    image_std: list[float] = field(default_factory=lambda: [0.26862954, 0.26130258, 0.27577711])

    @property
    def token_ids(self) -> set[int]:
        return {self.image_token_id, self.image_break_token_id, self.image_end_token_id}

    def image_tokens(self, height: int, width: int) -> np.ndarray:
        """The tokens of one resized image (PixtralProcessor.replace_image_token, as ids)."""
        rows, cols = height // self.patch_size, width // self.patch_size
        grid = np.full((rows, cols + 1), self.image_token_id, dtype=np.int64)
        grid[:, -1] = self.image_break_token_id
        out = grid.reshape(-1)
        out[-1] = self.image_end_token_id
        return out

    def processor(self):
        """transformers' PixtralImageProcessor with these settings (PIL backend when torchvision is absent)."""
        try:
            from transformers.models.pixtral.image_processing_pil_pixtral import PixtralImageProcessorPil as cls
        except ImportError:  # older transformers: the slow processor is the PIL one
            from transformers import PixtralImageProcessor as cls
        return cls(size={"longest_edge": self.image_size}, patch_size=self.patch_size,
                   image_mean=list(self.image_mean), image_std=list(self.image_std))


class RecordError(CountedError):
    """A record that cannot be written; ``reason`` is the counter it goes to."""


# --------------------------------------------------------------------------------------------------
# Preprocessing


def build_parser() -> argparse.ArgumentParser:
    from megatron_apriel.data.tokenizers import add_tokenizer_args

    p = argparse.ArgumentParser(
        prog="apriel preprocess-multimodal",
        description="Image-text JSONL + image files -> tokens, loss masks and images (megatron-core indexed datasets).",
    )
    p.add_argument("--input", nargs="+", required=True, help="JSONL files (image paths relative to each file)")
    p.add_argument("--output-prefix", required=True)
    add_tokenizer_args(p)
    p.add_argument("--image-placeholder", default=PLACEHOLDER, help="placeholder of an image in text/prompt")
    p.add_argument("--patch-size", type=int, default=16)
    p.add_argument("--image-size", type=int, default=1024, help="longest edge after resize (Pixtral: 1024)")
    p.add_argument("--image-token-id", type=int, default=10)
    p.add_argument("--image-break-token-id", type=int, default=12)
    p.add_argument("--image-end-token-id", type=int, default=13)
    p.add_argument("--seq-length", type=int, default=None,
                   help="training length: longer samples are skipped (an image cannot be cut)")
    p.add_argument("--no-bos", action="store_true", help="do not start samples with the tokenizer's BOS")
    p.add_argument("--strict", action="store_true", help="stop at the first bad record instead of skipping it")
    p.add_argument("--max-image-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                   help="most pixels decoded per image, checked from the file header: larger images are skipped as "
                   "image_too_large (JPEGs are first decoded at 1/2..1/8 scale when that fits)")
    p.add_argument("--workers", type=int, default=1, help="processes that decode, resize and encode images and "
                   "tokenize (output identical for any number)")
    p.add_argument("--log-interval", type=int, default=10000)
    return p


class _Encoder:
    """Turns JSONL lines into (tokens, loss mask, images); one per worker process.

    Images are resized and PNG-encoded here, so the work parallelises; the writer only assigns each
    distinct file its row. A small cache skips re-encoding a file named by consecutive records.
    """

    def __init__(self, args):
        from megatron_apriel.data.tokenizers import tokenizer_from_args

        self.tokenizer = tokenizer_from_args(args)
        self.layout = ImageLayout(patch_size=args.patch_size, image_size=args.image_size,
                                  image_token_id=args.image_token_id, image_break_token_id=args.image_break_token_id,
                                  image_end_token_id=args.image_end_token_id)
        self.proc = self.layout.processor()
        self.placeholder = args.image_placeholder
        self.bos = not args.no_bos
        self.seq_length = args.seq_length
        self.max_pixels = args.max_image_pixels
        self.cache: dict[str, tuple] = {}
        tokens = sorted(self.tokenizer.control_tokens, key=len, reverse=True)
        self.control = re.compile("|".join(map(re.escape, tokens)) or "(?!)")

    def image(self, path: str) -> tuple:
        """(realpath, PNG bytes, normalisations, height, width) of the resized image."""
        from PIL import Image

        from megatron_apriel.data.images import ImageError, load_image

        key = os.path.realpath(path)
        if key in self.cache:
            return self.cache[key]
        try:
            loaded = load_image(path, max_pixels=self.max_pixels, target_side=self.layout.image_size)
        except ImageError as e:
            raise RecordError(e.reason, f"image {path}: {e}") from None
        w, h = loaded.image.size
        ratio = max(w, h) / self.layout.image_size  # PixtralImageProcessor's resize, which fails on a 0 side
        if ratio > 1 and min(w, h) < ratio:
            raise RecordError("image_too_thin", f"image {path}: {w}x{h} has a side of 0 pixels at --image-size "
                              f"{self.layout.image_size}")
        out = self.proc(loaded.image, do_rescale=False, do_normalize=False, do_pad=False)
        pixels = np.asarray(out["pixel_values"][0], dtype=np.uint8).transpose(1, 2, 0)  # CHW -> HWC
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="PNG")
        if len(self.cache) >= 64:
            self.cache.clear()
        self.cache[key] = (key, buf.getvalue(), loaded.notes, pixels.shape[0], pixels.shape[1])
        return self.cache[key]

    def line(self, line: str, base_dir: str) -> tuple:
        try:
            record = json.loads(line)
        except ValueError as e:
            raise RecordError("bad_json", f"bad JSON ({e})") from None
        tokens, mask, images = encode_record(record, base_dir, self.tokenizer, self.layout, self.image,
                                             self.placeholder, bos=self.bos)
        n_control = sum(len(self.control.findall(record[k])) for k in ("text", "prompt", "response") if k in record)
        if self.seq_length is not None and len(tokens) > self.seq_length + 1:
            raise RecordError("overlong", f"{len(tokens)} tokens > --seq-length {self.seq_length} + 1")
        if not mask[1:].any():
            raise RecordError("no_loss_tokens", "no token to train on")
        return tokens, mask, images, n_control


def encode_record(record, base_dir: str, tokenizer, layout: ImageLayout, load_image,
                  placeholder: str = PLACEHOLDER, bos: bool = True) -> tuple[np.ndarray, np.ndarray, list]:
    """(tokens, loss mask, images) of one record; ``load_image(path)`` returns ``(..., height, width)``
    of the resized image and its result is passed through in ``images``. RecordError names what is wrong."""
    if not isinstance(record, dict):
        raise RecordError("not_an_object", "record is not a JSON object")
    paths = record.get("images", [])
    if not isinstance(paths, list) or not all(isinstance(p, str) and p for p in paths):
        raise RecordError("bad_images_field", "'images' must be a list of file paths")
    if "text" in record:
        prompt, response = record["text"], None
        if not isinstance(prompt, str):
            raise RecordError("not_a_string", "'text' is not a string")
    elif "prompt" in record and "response" in record:
        prompt, response = record["prompt"], record["response"]
        if not isinstance(prompt, str) or not isinstance(response, str):
            raise RecordError("not_a_string", "'prompt' and 'response' must be strings")
        if placeholder in response:
            raise RecordError("placeholder_in_response", f"{placeholder!r} in 'response': images belong to the prompt")
    else:
        raise RecordError("missing_key", "needs 'text', or 'prompt' and 'response'")
    pieces = prompt.split(placeholder)
    if len(pieces) == 1 and paths:
        pieces = [""] * len(paths) + pieces
    if len(pieces) - 1 != len(paths):
        raise RecordError("placeholder_mismatch", f"{len(pieces) - 1} {placeholder!r} placeholders for {len(paths)} images")
    images = [load_image(p if os.path.isabs(p) else os.path.join(base_dir, p)) for p in paths]
    text_loss = 1 if response is None else 0
    toks: list[np.ndarray] = []
    mask: list[np.ndarray] = []

    def put(ids, m):
        ids = np.asarray(ids, dtype=np.int64)
        toks.append(ids)
        mask.append(np.full(len(ids), m, dtype=np.uint8))

    if bos and tokenizer.bos is not None:
        put([tokenizer.bos], 0)
    for i, piece in enumerate(pieces):
        ids = tokenizer.encode_text(piece) if piece else []
        if layout.token_ids.intersection(ids):
            raise RecordError("image_token_in_text", "text encodes to an image token id (a literal special token?)")
        put(ids, text_loss)
        if i < len(images):
            put(layout.image_tokens(*images[i][-2:]), 0)
    if response is not None:
        ids = tokenizer.encode_text(response)
        if layout.token_ids.intersection(ids):
            raise RecordError("image_token_in_text", "response encodes to an image token id")
        put(ids, 1)
    put([tokenizer.eod], 1)
    return np.concatenate(toks), np.concatenate(mask), images


_WORKER: Optional[_Encoder] = None


def _init_worker(args) -> None:
    global _WORKER
    _WORKER = _Encoder(args)


def _encode_chunk(chunk: list[tuple[str, str, int, str]]) -> list[tuple]:
    """[(where, result or RecordError)] for (path, base dir, line number, line) items."""
    out = []
    for path, base, lineno, line in chunk:
        try:
            out.append((f"{path}:{lineno}", _WORKER.line(line, base)))
        except RecordError as e:
            out.append((f"{path}:{lineno}", e))
    return out


def _chunks(paths: list[str], size: int, counter: dict) -> Iterator[list]:
    from tqdm import tqdm

    chunk = []
    for path in paths:
        base = os.path.dirname(os.path.abspath(path))
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(tqdm(f, desc=os.path.basename(path), unit=" rec", mininterval=2.0,
                                               disable=None), start=1):
                if not line.strip():
                    continue
                counter["read"] += 1
                chunk.append((path, base, lineno, line))
                if len(chunk) >= size:
                    yield chunk
                    chunk = []
    if chunk:
        yield chunk


def _results(chunks: Iterator[list], args) -> Iterator[list]:
    """Encoded chunks in input order, at most ``2 * workers + 2`` in flight."""
    if args.workers <= 1:
        _init_worker(args)
        for c in chunks:
            yield _encode_chunk(c)
        return
    import collections
    import multiprocessing as mp

    with mp.get_context("fork").Pool(args.workers, initializer=_init_worker, initargs=(args,)) as pool:
        pending: collections.deque = collections.deque()
        for c in chunks:
            pending.append(pool.apply_async(_encode_chunk, (c,)))
            if len(pending) >= 2 * args.workers + 2:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def preprocess(args) -> dict:
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    from megatron_apriel.config import atomic_write_text
    from megatron_apriel.data.tokenizers import tokenizer_from_args

    if args.image_size % args.patch_size:
        raise SystemExit(f"preprocess-multimodal: --image-size {args.image_size} is not a multiple of --patch-size {args.patch_size}")
    if args.max_image_pixels < 1:
        raise SystemExit(f"preprocess-multimodal: --max-image-pixels {args.max_image_pixels}: must be positive")
    tokenizer = tokenizer_from_args(args)  # flag errors here, before any worker starts
    layout = ImageLayout(patch_size=args.patch_size, image_size=args.image_size, image_token_id=args.image_token_id,
                         image_break_token_id=args.image_break_token_id, image_end_token_id=args.image_end_token_id)
    os.makedirs(os.path.dirname(os.path.abspath(args.output_prefix)), exist_ok=True)
    final = {k: dataset_path(args.output_prefix, k) for k in KEYS}
    tmp = {k: v + f".tmp{os.getpid()}" for k, v in final.items()}
    tok_dtype = DType.optimal_dtype(max(tokenizer.vocab_size, max(layout.token_ids) + 1))
    builders = {
        TOKENS_KEY: IndexedDatasetBuilder(tmp[TOKENS_KEY] + ".bin", dtype=tok_dtype),
        MASK_KEY: IndexedDatasetBuilder(tmp[MASK_KEY] + ".bin", dtype=np.uint8),
        IMAGES_KEY: IndexedDatasetBuilder(tmp[IMAGES_KEY] + ".bin", dtype=np.uint8),
        REFS_KEY: IndexedDatasetBuilder(tmp[REFS_KEY] + ".bin", dtype=np.int32),
    }
    rows: dict[str, int] = {}  # realpath of an image file -> its row in the images dataset
    counts = {"read": 0, "kept": 0, "with_control_token_text": 0, "control_token_strings": 0}
    skipped: dict[str, int] = {}
    normalised: dict[str, int] = {}  # stored images per normalisation (megatron_apriel.data.images)
    examples: list[str] = []
    n_tokens = n_loss = n_image_tokens = n_image_refs = png_bytes = done = 0
    start = time.time()
    results = _results(_chunks(args.input, 16, counts), args)
    try:
        for chunk in results:
            for where, res in chunk:
                if isinstance(res, RecordError):
                    if args.strict:
                        raise SystemExit(f"preprocess-multimodal: {where}: {res}")
                    skipped[res.reason] = skipped.get(res.reason, 0) + 1
                    if len(examples) < 1000:
                        examples.append(f"{where}: {res}")
                    continue
                tokens, mask, images, n_control = res
                counts["with_control_token_text"] += n_control > 0
                counts["control_token_strings"] += n_control
                refs = []
                for key, png, notes, _, _ in images:
                    if key not in rows:
                        rows[key] = len(rows)
                        count_notes(normalised, notes)
                        data = np.frombuffer(png, dtype=np.uint8)
                        builders[IMAGES_KEY].add_document(data, [len(data)])
                        png_bytes += len(data)
                    refs.append(rows[key])
                builders[TOKENS_KEY].add_document(tokens, [len(tokens)])
                builders[MASK_KEY].add_document(mask, [len(mask)])
                builders[REFS_KEY].add_document(np.asarray(refs, dtype=np.int32), [len(refs)])
                counts["kept"] += 1
                n_tokens += len(tokens)
                n_loss += int(mask.sum())
                n_image_tokens += int(np.isin(tokens, list(layout.token_ids)).sum())
                n_image_refs += len(refs)
            done += len(chunk)
            if args.log_interval and done // args.log_interval != (done - len(chunk)) // args.log_interval:
                rate = done / max(time.time() - start, 1e-9)
                print(f"[preprocess-multimodal] {done} records, {rate:.0f}/s, {len(rows)} images", file=sys.stderr)
        for key in KEYS:
            builders[key].finalize(tmp[key] + ".idx")
        for key in KEYS:
            for ext in (".bin", ".idx"):
                os.replace(tmp[key] + ext, final[key] + ext)
    except BaseException:
        results.close()  # stop the worker pool now, not at interpreter exit
        for key in KEYS:
            for ext in (".bin", ".idx"):
                if os.path.exists(tmp[key] + ext):
                    os.remove(tmp[key] + ext)
        raise
    report = {
        **counts,
        "skipped": sum(skipped.values()),
        "skipped_by_reason": dict(sorted(skipped.items())),
        "skipped_records": examples,
        "images": len(rows),
        "images_normalised": dict(sorted(normalised.items())),
        "max_image_pixels": args.max_image_pixels,
        "image_refs": n_image_refs,
        "image_png_bytes": png_bytes,
        "tokens": n_tokens,
        "image_tokens": n_image_tokens,
        "loss_tokens": n_loss,
        "seq_length": args.seq_length,
        "tokenizer": {"type": args.tokenizer_type, "model": args.tokenizer_model},
        "layout": asdict(layout),
        "outputs": list(final.values()),
        "seconds": round(time.time() - start, 2),
    }
    atomic_write_text(meta_path(args.output_prefix), json.dumps(report, indent=2) + "\n")
    return report


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    for path in args.input:
        if not os.path.isfile(path):
            print(f"preprocess-multimodal: {path}: no such file", file=sys.stderr)
            return 2
    try:
        report = preprocess(args)
    except (ValueError, FileNotFoundError) as e:  # tokenizer flags
        print(f"preprocess-multimodal: {e}", file=sys.stderr)
        return 2
    except SystemExit as e:
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
            return 2
        raise
    reasons = ", ".join(f"{v} {k}" for k, v in report["skipped_by_reason"].items()) or "none"
    normalised = ", ".join(f"{v} {k}" for k, v in report["images_normalised"].items()) or "none"
    print(f"preprocess-multimodal: read {report['read']}, kept {report['kept']}, skipped {report['skipped']} "
          f"({reasons}); {report['images']} images (normalised: {normalised}), {report['tokens']} tokens of which {report['image_tokens']} "
          f"image and {report['loss_tokens']} trained on; {report['seconds']} s -> {args.output_prefix}_*_document.bin/.idx")
    if report["with_control_token_text"]:
        print(f"preprocess-multimodal: {report['with_control_token_text']} records spell control tokens in their text "
              f"({report['control_token_strings']} strings), encoded as ordinary text")
    return 0


# --------------------------------------------------------------------------------------------------
# Training-time dataset


def _indexed(prefix: str, key: str):
    """The indexed dataset, or None when it holds no bytes (megatron-core cannot mmap an empty .bin)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    path = dataset_path(prefix, key)
    if not os.path.isfile(path + ".bin") or not os.path.isfile(path + ".idx"):
        raise FileNotFoundError(f"{path}.bin/.idx: missing (run apriel preprocess-multimodal)")
    if os.path.getsize(path + ".bin") == 0:
        return None
    return IndexedDataset(path)


class MultimodalDataset(torch.utils.data.Dataset):
    """Image-text samples from ``preprocess-multimodal`` output, one or several per row of ``seq_length``.

    Items: ``tokens``, ``labels``, ``loss_mask`` (1 where ``labels[i]`` is a trained-on token),
    ``position_ids`` (restarting per sample), ``pixel_values`` (a list of normalised float32
    [3, h, w] tensors in placeholder order) and ``image_sizes`` (int64 [n, 2]); with ``pack=True``
    also ``cu_seqlens`` as in SFTDataset. Use :meth:`collate` as the DataLoader's collate_fn.
    Samples longer than ``seq_length + 1`` tokens are left out (an image cannot be cut) and counted
    in ``dropped_overlong``; preprocess with ``--seq-length`` to drop them earlier.
    """

    def __init__(self, prefix: str, seq_length: int, epochs: int = 1, seed: int = 0, pack: bool = False,
                 window: int = 20000, pad_token_id: int = 0, max_docs: Optional[int] = None):
        meta = meta_path(prefix)
        if not os.path.isfile(meta):
            raise FileNotFoundError(f"{meta}: missing (run apriel preprocess-multimodal; it is written last)")
        with open(meta, encoding="utf-8") as f:
            self.layout = ImageLayout(**json.load(f)["layout"])
        self.tokens = _indexed(prefix, TOKENS_KEY)
        self.masks = _indexed(prefix, MASK_KEY)
        self.images = _indexed(prefix, IMAGES_KEY)
        self.refs = _indexed(prefix, REFS_KEY)
        if self.tokens is None:
            raise ValueError(f"{prefix}: no samples")
        n = len(self.tokens)
        if len(self.masks) != n or (self.refs is not None and len(self.refs) != n):
            raise ValueError(f"{prefix}: tokens, loss masks and image references have different sample counts")
        self.prefix = prefix
        self.seq_length = seq_length
        self.pad_token_id = pad_token_id
        self.pack = pack
        self._processor = None
        slots = self.tokens.sequence_lengths.astype(np.int64) - 1
        keep = np.flatnonzero(slots <= seq_length)
        self.dropped_overlong = n - len(keep)
        if self.dropped_overlong:
            logger.warning("%s: %d of %d samples are longer than seq_length %d + 1 and left out",
                           prefix, self.dropped_overlong, n, seq_length)
        self.slots = slots
        self.bins: list[list[int]] = []
        for epoch in range(epochs):
            if pack:
                self.bins += [[int(keep[i]) for i in b] for b in plan_bins(slots[keep], seq_length, seed=seed + epoch, window=window)]
            else:
                self.bins += [[int(keep[i])] for i in np.random.default_rng(seed + epoch).permutation(len(keep))]
        needed = max((len(b) for b in self.bins), default=1)
        self.max_docs = needed if max_docs is None else max_docs
        if needed > self.max_docs:
            raise ValueError(f"a packed sample holds {needed} documents > max_docs {self.max_docs}")

    def __len__(self) -> int:
        return len(self.bins)

    def image_rows(self, doc: int) -> list[int]:
        if self.refs is None:
            return []
        return [int(r) for r in self.refs[doc]]

    def load_image(self, row: int) -> np.ndarray:
        """The stored (resized) image as uint8 HWC."""
        from PIL import Image

        with Image.open(io.BytesIO(self.images[row].tobytes())) as im:
            return np.asarray(im.convert("RGB"))

    def _normalise(self, images: list[np.ndarray]) -> list[torch.Tensor]:
        if not images:
            return []
        if self._processor is None:
            self._processor = self.layout.processor()
        out = self._processor(images, do_resize=False, do_pad=False, input_data_format="channels_last")
        return [torch.from_numpy(np.asarray(x, dtype=np.float32)) for x in out["pixel_values"]]

    def __getitem__(self, idx: int) -> dict:
        s = self.seq_length
        tokens = np.full(s, self.pad_token_id, dtype=np.int64)
        labels = np.full(s, self.pad_token_id, dtype=np.int64)
        loss_mask = np.zeros(s, dtype=np.float32)
        position_ids = np.zeros(s, dtype=np.int64)
        lengths, images = [], []
        pos = 0
        for doc in self.bins[idx]:
            n = int(self.slots[doc])
            toks = np.asarray(self.tokens[doc], dtype=np.int64)
            mask = np.asarray(self.masks[doc], dtype=np.float32)
            tokens[pos : pos + n] = toks[:-1]
            labels[pos : pos + n] = toks[1:]
            loss_mask[pos : pos + n] = mask[1:]
            position_ids[pos : pos + n] = np.arange(n)
            images += [self.load_image(r) for r in self.image_rows(doc)]
            lengths.append(n)
            pos += n
        position_ids[pos:] = np.arange(s - pos)
        item = {
            "tokens": torch.from_numpy(tokens),
            "labels": torch.from_numpy(labels),
            "loss_mask": torch.from_numpy(loss_mask),
            "position_ids": torch.from_numpy(position_ids),
            "pixel_values": self._normalise(images),
            "image_sizes": torch.tensor([im.shape[:2] for im in images], dtype=torch.int64).reshape(-1, 2),
        }
        if self.pack:
            item["cu_seqlens"] = torch.from_numpy(cu_seqlens_from_lengths(lengths, s, self.max_docs))
        return item

    @staticmethod
    def collate(items: Sequence[dict]) -> dict:
        """Stack the [s] tensors to [b, s]; the images of all rows, in order, padded to one [N, 3, H, W]."""
        batch = {k: torch.stack([it[k] for it in items]) for k in items[0] if k not in ("pixel_values", "image_sizes")}
        images = [im for it in items for im in it.get("pixel_values", [])]
        sizes = [it["image_sizes"] for it in items if "image_sizes" in it]
        batch["image_sizes"] = torch.cat(sizes) if sizes else torch.zeros(0, 2, dtype=torch.int64)
        if not images:
            batch["pixel_values"] = torch.zeros(0, 3, 0, 0, dtype=torch.float32)
            return batch
        h = max(im.shape[1] for im in images)
        w = max(im.shape[2] for im in images)
        pixels = torch.zeros(len(images), 3, h, w, dtype=torch.float32)
        for i, im in enumerate(images):
            pixels[i, :, : im.shape[1], : im.shape[2]] = im
        batch["pixel_values"] = pixels
        return batch


# --------------------------------------------------------------------------------------------------
# Text + image-text blend (CPT stage 1: 50% text / 30% multimodal / 20% replay)


def _prefix_tokens(prefix: str, key: str) -> tuple[bool, int]:
    """(is multimodal, tokens) of one blend prefix: a preprocess-multimodal prefix or an indexed dataset."""
    from megatron_apriel.config import ConfigError

    if os.path.isfile(meta_path(prefix)):
        try:
            ds = _indexed(prefix, TOKENS_KEY)
        except (FileNotFoundError, ValueError) as e:  # _multimodal.json present, its tokens dataset not
            raise ConfigError(f"{key}: {e}") from None
        return True, 0 if ds is None else int(ds.sequence_lengths.sum(dtype=np.int64))
    from megatron_apriel.data.blends import _prefix_stats

    if not os.path.isfile(prefix + ".bin"):
        raise ConfigError(f"{key}: {prefix}: neither {meta_path(prefix)} (preprocess-multimodal) nor {prefix}.bin/.idx")
    return False, _prefix_stats(prefix, key)[0]


class ImageTextBlend(torch.utils.data.Dataset):
    """A blend spec whose prefixes are text indexed datasets or ``preprocess-multimodal`` outputs.

    ``data.kind: dataset`` with ``factory: megatron_apriel.data.multimodal:ImageTextBlend`` and
    ``factory_args: {blend: <spec YAML or mapping>, global_batch_size: N}``. The spec is the one of
    :mod:`megatron_apriel.data.blends` (sources, weights, stages, budget, seed, split); a prefix is
    multimodal when ``<prefix>_multimodal.json`` exists. Weights flatten to one per prefix exactly as
    in ``blends.blend_weights`` (source share x token share inside the source). Why two levels:
    megatron-core's ``BlendedDataset`` blends ``GPTDataset`` children only, so all text prefixes form
    one megatron-core BlendedDataset (its own shuffling, epochs, split and cache) and that and each
    :class:`MultimodalDataset` are interleaved with megatron-core's ``build_blending_indices``, the
    greedy minimum-error order BlendedDataset itself uses, so every source stays within a sample or
    two of its share at any point. Items follow the multimodal batch contract (text rows carry no
    images) and are packed (``cu_seqlens``) when ``pack`` is set; multimodal prefixes are read in full
    (the spec's ``split`` applies to the text prefixes) and repeated in new shuffles as needed.
    """

    def __init__(self, blend, seq_length: int, global_batch_size: Optional[int] = None, num_samples: Optional[int] = None,
                 eod_token: int = 2, pack: bool = True, pad_token_id: int = 0):
        import dataclasses

        from megatron.core.datasets import helpers

        from megatron_apriel.config import ConfigError, from_dict, load_yaml
        from megatron_apriel.data.blends import BlendSpec, SourceSpec, build_datasets, resolve_stage, train_samples_for

        raw = load_yaml(blend) if isinstance(blend, (str, os.PathLike)) else dict(blend)
        raw.setdefault("seq_length", seq_length)
        spec = resolve_stage(from_dict(BlendSpec, raw, "data.factory_args.blend"))
        if spec.seq_length != seq_length:
            raise ConfigError(f"data.factory_args.blend.seq_length {spec.seq_length} != train.seq_length {seq_length}")
        if num_samples is None:
            if global_batch_size is None:
                raise ConfigError("data.factory_args: give global_batch_size (or num_samples) to size the blend")
            num_samples = train_samples_for(spec, global_batch_size)
        # flatten the two-level weights, remembering which prefixes are multimodal
        flat = []  # (source, prefix, is_mm, weight)
        src_w = []
        per_source = []
        for i, s in enumerate(spec.sources):
            stats = [_prefix_tokens(p, f"data.factory_args.blend.sources[{i}].prefixes[{j}]") for j, p in enumerate(s.prefixes)]
            if sum(t for _, t in stats) == 0:
                raise ConfigError(f"data.factory_args.blend.sources[{i}]: source {s.name!r} has no tokens")
            per_source.append(stats)
            src_w.append(s.weight if s.weight is not None else sum(t for _, t in stats))
        for s, stats, sw in zip(spec.sources, per_source, src_w):
            inner = s.prefix_weights if s.prefix_weights is not None else [t for _, t in stats]
            for p, (is_mm, t), w in zip(s.prefixes, stats, inner):
                if w > 0 and t > 0:
                    flat.append((s.name, p, is_mm, sw / sum(src_w) * w / sum(inner)))
        self.prefixes = [(f[0], f[1]) for f in flat]  # (source, prefix) in spec order, drawn ones only
        self.prefix_weights = [f[3] for f in flat]  # share of the whole blend
        text = [f for f in flat if not f[2]]
        mm = [f for f in flat if f[2]]
        # row in self.prefixes of each text child dataset / of each child
        self._text_rows = np.asarray([k for k, f in enumerate(flat) if not f[2]], dtype=np.int64)
        self._child_rows = ([-1] if text else []) + [k for k, f in enumerate(flat) if f[2]]
        child_w = ([sum(f[3] for f in text)] if text else []) + [f[3] for f in mm]
        self.child_sources = ([[f[0] for f in text]] if text else []) + [[f[0]] for f in mm]
        self.child_names = (["text"] if text else []) + [f[1] for f in mm]
        weights = np.asarray(child_w, dtype=np.float64) / sum(child_w)
        self.dataset_index = np.zeros(num_samples, dtype=np.int16)
        self.dataset_sample_index = np.zeros(num_samples, dtype=np.int64)
        helpers.build_blending_indices(self.dataset_index, self.dataset_sample_index, weights, len(weights), num_samples, False)
        counts = np.bincount(self.dataset_index, minlength=len(weights))
        self.children: list = []
        if text:
            by_source: dict = {}
            for name, p, _, w in text:
                by_source.setdefault(name, []).append((p, w))
            text_spec = dataclasses.replace(spec, sources=[
                SourceSpec(name, [p for p, _ in items], weight=sum(w for _, w in items), prefix_weights=[w for _, w in items])
                for name, items in by_source.items()], stages=[], stage=None, tokens=None, steps=None)
            train, _ = build_datasets(text_spec, global_batch_size or 1, train_samples=int(counts[0]), eod_token=eod_token)
            self.children.append(train)
        for k, (_, p, _, _) in enumerate(mm):
            need = int(counts[len(self.children)])
            key = self._prefix_key(spec, p)
            try:
                ds = MultimodalDataset(p, seq_length, epochs=1, seed=spec.seed, pack=pack, pad_token_id=pad_token_id)
                epochs = max(1, -(-need // max(len(ds), 1)))
                if epochs > spec.repeat_warning:
                    logger.warning("%s is read %d times in this blend (repeat_warning %s)", p, epochs, spec.repeat_warning)
                if epochs > 1:
                    ds = MultimodalDataset(p, seq_length, epochs=epochs, seed=spec.seed, pack=pack, pad_token_id=pad_token_id)
            except (FileNotFoundError, ValueError) as e:  # a missing or inconsistent part of the prefix
                raise ConfigError(f"{key}: {e}") from None
            self.children.append(ds)
        self.has_text = bool(text)
        self.pack = pack
        self.seq_length = seq_length
        self.max_docs = max([c.max_docs for c in self.children if isinstance(c, MultimodalDataset)] + [1])
        for c in self.children:
            if isinstance(c, MultimodalDataset):
                c.max_docs = self.max_docs  # one cu_seqlens length for every row of a batch
        self.spec = spec

    @staticmethod
    def _prefix_key(spec, prefix: str) -> str:
        for i, s in enumerate(spec.sources):
            if prefix in s.prefixes:
                return f"data.factory_args.blend.sources[{i}].prefixes[{s.prefixes.index(prefix)}]"
        return prefix

    def __len__(self) -> int:
        return len(self.dataset_index)

    def prefix_counts(self, n: Optional[int] = None) -> np.ndarray:
        """Samples drawn from each of ``self.prefixes`` among the first ``n`` samples (default: all).

        A multimodal prefix is a child of its own; the text prefixes' draws are read from the text
        child's megatron-core blending index at the text samples' positions.
        """
        n = len(self) if not n else min(n, len(self))
        idx = self.dataset_index[:n]
        out = np.zeros(len(self.prefixes), dtype=np.int64)
        for c, count in enumerate(np.bincount(idx, minlength=len(self.children))):
            if self.has_text and c == 0:
                text = self.children[0]
                sample_ids = self.dataset_sample_index[:n][idx == 0]
                # one text prefix: megatron-core returns its GPTDataset itself, without blending indices
                drawn = text.dataset_index[sample_ids] if hasattr(text, "dataset_index") else np.zeros(len(sample_ids), int)
                out[self._text_rows] += np.bincount(drawn, minlength=len(self._text_rows))
            else:
                out[self._child_rows[c]] += int(count)
        return out

    def source_shares(self, n: Optional[int] = None) -> dict:
        """Share of each source among the first ``n`` samples (text children split by their prefix draws)."""
        out: dict = {}
        for (source, _), count in zip(self.prefixes, self.prefix_counts(n)):
            out[source] = out.get(source, 0) + int(count)
        total = sum(out.values())
        return {k: v / total for k, v in out.items()}

    def __getitem__(self, idx: int) -> dict:
        c, j = int(self.dataset_index[idx]), int(self.dataset_sample_index[idx])
        item = self.children[c][j]
        if isinstance(self.children[c], MultimodalDataset):
            return item
        s = self.seq_length
        out = {k: item[k] for k in ("tokens", "labels", "loss_mask", "position_ids")}
        out["pixel_values"] = []
        out["image_sizes"] = torch.zeros(0, 2, dtype=torch.int64)
        if self.pack:
            out["cu_seqlens"] = torch.from_numpy(cu_seqlens_from_lengths([s], s, self.max_docs))
        return out

    collate = staticmethod(MultimodalDataset.collate)


if __name__ == "__main__":
    sys.exit(main())
