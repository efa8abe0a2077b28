"""Image-text samples: JSONL + image files -> megatron-core indexed datasets (the training-time reader
is :mod:`megatron_apriel.data.multimodal`).

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
unsupported pixel mode, so thin that a side would shrink to 0 pixels) skips its record under that
reason; odd but valid ones are normalised (EXIF orientation, first frame, RGB conversion, large
JPEGs decoded at reduced DCT scale), so one hostile file never stops a run and memory is bounded by
the pixel budget.

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
"""

from __future__ import annotations

import argparse
import collections
import io
import json
import multiprocessing as mp
import os
import re
import sys
import time
from dataclasses import asdict
from typing import Iterator, Optional

import numpy as np
from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder
from PIL import Image
from tqdm import tqdm

from megatron_apriel.config import atomic_write_text
from megatron_apriel.data.images import DEFAULT_MAX_PIXELS, CountedError, ImageError, count_notes, load_image
from megatron_apriel.data.multimodal_format import (
    IMAGES_KEY,
    KEYS,
    MASK_KEY,
    PLACEHOLDER,
    REFS_KEY,
    TOKENS_KEY,
    ImageLayout,
    dataset_path,
    meta_path,
)
from megatron_apriel.data.preprocess import PreprocessError, check_inputs, print_control_text
from megatron_apriel.data.tokenizers import add_tokenizer_args, tokenizer_from_args
from megatron_apriel.errors import cli_main
from megatron_apriel.models.presets import PIXTRAL_LAYOUT


class RecordError(CountedError):
    """A record that cannot be written; ``reason`` is the counter it goes to."""



def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="apriel preprocess-multimodal",
        description="Image-text JSONL + image files -> tokens, loss masks and images (megatron-core indexed datasets).",
    )
    p.add_argument("--input", nargs="+", required=True, help="JSONL files (image paths relative to each file)")
    p.add_argument("--output-prefix", required=True)
    add_tokenizer_args(p)
    p.add_argument("--image-placeholder", default=PLACEHOLDER, help="placeholder of an image in text/prompt")
    pixtral = PIXTRAL_LAYOUT
    p.add_argument("--patch-size", type=int, default=pixtral.patch_size)
    p.add_argument("--image-size", type=int, default=pixtral.image_size,
                   help=f"longest edge after resize (Pixtral: {pixtral.image_size})")
    p.add_argument("--image-token-id", type=int, default=pixtral.image_token_id)
    p.add_argument("--image-break-token-id", type=int, default=pixtral.image_break_token_id)
    p.add_argument("--image-end-token-id", type=int, default=pixtral.image_end_token_id)
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


def layout_of(args) -> ImageLayout:
    """The image layout the flags describe."""
    return ImageLayout(patch_size=args.patch_size, image_size=args.image_size, image_token_id=args.image_token_id,
                       image_break_token_id=args.image_break_token_id, image_end_token_id=args.image_end_token_id)


class _Encoder:
    """Turns JSONL lines into (tokens, loss mask, images); one per worker process.

    Images are resized and PNG-encoded here, so the work parallelises; the writer only assigns each
    distinct file its row. A small cache skips re-encoding a file named by consecutive records.
    """

    def __init__(self, args):
        self.tokenizer = tokenizer_from_args(args)
        self.layout = layout_of(args)
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
        raise RecordError("placeholder_mismatch",
                          f"{len(pieces) - 1} {placeholder!r} placeholders for {len(paths)} images")
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

    # Workers come from a forkserver, not a fork of this process: the writer is also called inside
    # longer-lived processes (tests, notebooks) whose threads (tqdm's monitor, tokenizers' pool) may hold
    # a lock at the moment of a fork, and a forked worker then blocks on it forever. The server preloads
    # this module, so each worker still starts without importing it again.
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["megatron_apriel.data.preprocess_multimodal"])
    pool = ctx.Pool(args.workers, initializer=_init_worker, initargs=(args,))
    try:
        pending: collections.deque = collections.deque()
        for c in chunks:
            pending.append(pool.apply_async(_encode_chunk, (c,)))
            if len(pending) >= 2 * args.workers + 2:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()
        pool.close()  # close and join when done: Pool.terminate can wait forever on a busy worker
    finally:
        pool.terminate()  # after close/join a no-op; on an error or an abandoned generator it stops the workers
        pool.join()


def preprocess(args) -> dict:

    if args.image_size % args.patch_size:
        raise PreprocessError(f"--image-size {args.image_size} is not a multiple of --patch-size {args.patch_size}")
    if args.max_image_pixels < 1:
        raise PreprocessError(f"--max-image-pixels {args.max_image_pixels}: must be positive")
    tokenizer = tokenizer_from_args(args)  # flag errors here, before any worker starts
    layout = layout_of(args)
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
                        raise PreprocessError(f"{where}: {res}")
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


@cli_main(bad_input=(ValueError, FileNotFoundError))  # the tokenizer flags' errors
def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    check_inputs(args.input)
    report = preprocess(args)
    reasons = ", ".join(f"{v} {k}" for k, v in report["skipped_by_reason"].items()) or "none"
    normalised = ", ".join(f"{v} {k}" for k, v in report["images_normalised"].items()) or "none"
    print(f"preprocess-multimodal: read {report['read']}, kept {report['kept']}, skipped {report['skipped']} "
          f"({reasons}); {report['images']} images (normalised: {normalised}), {report['tokens']} tokens of which "
          f"{report['image_tokens']} image and {report['loss_tokens']} trained on; {report['seconds']} s -> "
          f"{args.output_prefix}_*_document.bin/.idx")
    print_control_text("preprocess-multimodal", report, "records")
    return 0


if __name__ == "__main__":
    sys.exit(main())
