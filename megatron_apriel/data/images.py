"""One image file -> one RGB ``PIL.Image``, or a counted reason why not.

Crawled image-text corpora hold files that stop a naive ``Image.open(path).convert("RGB")`` loop or
make it run out of memory: decompression bombs (a 30000 x 30000 PNG is under 1 MB on disk),
truncated downloads, files that are not images, 16-bit, CMYK, palette and animated images, photos
whose EXIF tag says they are stored rotated. :func:`load_image` is the one loader that
``apriel preprocess-multimodal`` and ``data_prep/synthetic_visual.py`` share, so both skip the same
files for the same counted reasons and see the same pixels for the files they keep (the synthetic
generator writes answers about a file that preprocessing then reads again).

Skipped (an :class:`ImageError` whose ``reason`` is the counter it goes to):

* ``image_missing``          no such file;
* ``image_unreadable``       not an image Pillow can identify, or a corrupt stream;
* ``image_truncated``        the file ends before its pixels do;
* ``image_too_large``        more pixels than ``max_pixels``, read from the header before any
  pixel is decoded (Pillow's own ``DecompressionBombError`` ceiling, twice
  ``Image.MAX_IMAGE_PIXELS``, stays a hard limit above any budget);
* ``image_mode_unsupported`` a pixel mode with no defined 8-bit RGB meaning (float ``F``, ...).

Kept and normalised (each normalisation is named in :attr:`LoadedImage.notes`, so a run can count
them):

* ``exif_orientation``: the EXIF Orientation tag is applied (``ImageOps.exif_transpose``), the
  image is the way a viewer shows it;
* ``first_frame``: animated GIF / PNG / WebP and multi-page TIFF are reduced to their first frame;
* ``mode_<M>``: converted to RGB: ``1``/``L`` replicate the grey level; ``I;16*``/``I`` (16-bit
  grey) are scaled by 255/65535 (Pillow's own ``convert`` would clip everything above 255 to
  white); palette images with a transparency entry and every mode with alpha (``LA``, ``PA``,
  ``RGBA``, ...) are composited over white, as transformers' ``convert_to_rgb`` does; ``CMYK``,
  ``YCbCr``, ``LAB`` and ``HSV`` use Pillow's conversion (no ICC colour management);
* ``jpeg_draft``: a JPEG over ``max_pixels`` is decoded at 1/2, 1/4 or 1/8 scale by libjpeg's DCT
  scaling (``Image.draft``), the smallest scale that keeps the longest edge >= ``target_side``, and
  kept if that fits the budget; other formats cannot be decoded smaller, so over the budget they are
  skipped. Without ``max_side``, images within the budget are decoded in full, so their pixels are
  exactly what transformers' processors would see; with it, any JPEG longer than ``max_side`` is
  decoded at the DCT scale that keeps ``target_side`` (the caller wants it smaller anyway);
* ``downscaled``: longest edge above ``max_side`` (when given) resized down (bicubic).

Memory is therefore bounded by ``max_pixels``, not by the largest file present: in preprocessing
the peak grows by about 14 bytes per decoded pixel (Pillow's RGBX copy and the image processor's
numpy copies; ``benchmarks/multimodal_images.py``).

Written by hand because no library wraps Pillow this way; every pixel operation is Pillow's.
"""

from __future__ import annotations

import os
import struct
import warnings
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
from PIL import ExifTags, Image, ImageOps

from megatron_apriel.errors import InputError

# 64 million pixels: an 8000 x 8000 scan (192 MB as RGB); Pixtral sees at most 1024 x 1024 anyway.
DEFAULT_MAX_PIXELS = 64_000_000

REASONS = ("image_missing", "image_unreadable", "image_truncated", "image_too_large", "image_mode_unsupported")

_ALPHA_MODES = ("LA", "La", "PA", "RGBA", "RGBa")
_SIXTEEN_BIT = ("I", "I;16", "I;16L", "I;16B", "I;16N")
_PILLOW_TO_RGB = ("1", "L", "CMYK", "YCbCr", "LAB", "HSV")

# EXIF Orientation -> the transpose exif_transpose applies (the same table as Pillow's ImageOps)
_ORIENTATION = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
                5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
                8: Image.Transpose.ROTATE_90}


class CountedError(InputError):
    """Something skipped; ``reason`` is the counter it goes to."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason

    def __reduce__(self):  # travels back from worker processes
        return type(self), (self.reason, str(self))


class ImageError(CountedError):
    """An image that is skipped; ``reason`` is one of :data:`REASONS`."""


@dataclass
class LoadedImage:
    image: Image.Image  # RGB, oriented, possibly reduced
    stored_size: tuple[int, int]  # (width, height) of the pixel grid in the file
    transpose: Optional[Image.Transpose]  # what the EXIF orientation applied to the stored grid
    notes: tuple[str, ...]  # normalisations applied (see the module docstring)

    @property
    def full_size(self) -> tuple[int, int]:
        """(width, height) as displayed at full resolution: the stored size, axes swapped by a 90-degree orientation."""
        w, h = self.stored_size
        return (h, w) if self.transpose in _SWAPS else (w, h)

    def box_to_pixels(self, xywh: Sequence[float], frame: Optional[tuple[int, int]] = None) -> list[float]:
        """A box ``[x, y, w, h]`` drawn on the file -> ``[x, y, w, h]`` in pixels of :attr:`image`.

        ``frame`` is the (width, height) the box was drawn on (COCO's ``width``/``height``). Boxes are
        taken to be on the stored pixel grid (what tools that ignore EXIF, like pycocotools and
        torchvision, show) unless ``frame`` matches the displayed size and not the stored one; a
        ``frame`` of another resolution is scaled. The orientation and any reduction are applied.
        """
        x, y, bw, bh = (float(v) for v in xywh)
        sw, sh = self.stored_size
        fw, fh = self.full_size
        oriented = frame is not None and tuple(frame) == (fw, fh) and tuple(frame) != (sw, sh)
        if frame is not None and tuple(frame) not in ((fw, fh), (sw, sh)):  # drawn on a resized copy
            x, bw = x * fw / frame[0], bw * fw / frame[0]
            y, bh = y * fh / frame[1], bh * fh / frame[1]
            oriented = True
        if not oriented and self.transpose is not None:
            corners = [_transpose_point(self.transpose, px, py, sw, sh) for px, py in ((x, y), (x + bw, y + bh))]
            x, y = min(c[0] for c in corners), min(c[1] for c in corners)
            bw, bh = abs(corners[0][0] - corners[1][0]), abs(corners[0][1] - corners[1][1])
        sx, sy = self.image.width / fw, self.image.height / fh
        return [x * sx, y * sy, bw * sx, bh * sy]


_SWAPS = (Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_270, Image.Transpose.TRANSPOSE, Image.Transpose.TRANSVERSE)


def _transpose_point(method: Image.Transpose, x: float, y: float, w: int, h: int) -> tuple[float, float]:
    """Where the point (x, y) of a w x h grid lands after ``Image.transpose(method)`` (edge coordinates)."""
    T = Image.Transpose
    return {T.FLIP_LEFT_RIGHT: (w - x, y), T.FLIP_TOP_BOTTOM: (x, h - y), T.ROTATE_180: (w - x, h - y),
            T.ROTATE_90: (y, w - x), T.ROTATE_270: (h - y, x), T.TRANSPOSE: (y, x),
            T.TRANSVERSE: (h - y, w - x)}[method]


def _draft_scale(size: tuple[int, int], target_side: int) -> int:
    """The largest JPEG DCT scale (1/8, 1/4, 1/2) that keeps the longest edge >= target_side; 1 if none."""
    for s in (8, 4, 2):
        if -(-max(size) // s) >= target_side:
            return s
    return 1


def _to_rgb(im: Image.Image, notes: list) -> Image.Image:
    mode = im.mode
    if mode == "RGB":
        return im
    notes.append(f"mode_{mode}")
    if mode in _SIXTEEN_BIT:
        a = np.asarray(im).astype(np.int64)
        a = (np.clip(a, 0, 65535) * 255 + 32767) // 65535
        return Image.fromarray(a.astype(np.uint8), "L").convert("RGB")
    if mode in _ALPHA_MODES or (mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if mode in _PILLOW_TO_RGB or mode == "P":
        return im.convert("RGB")
    raise ImageError("image_mode_unsupported", f"pixel mode {mode!r} has no 8-bit RGB meaning")


def load_image(path: str, max_pixels: int = DEFAULT_MAX_PIXELS, target_side: int = 1024,
               max_side: Optional[int] = None) -> LoadedImage:
    """The RGB image of ``path`` (oriented, first frame), or :class:`ImageError`.

    ``max_pixels``: most pixels ever decoded (checked from the header). ``target_side``: the longest
    edge the caller will resize to; a JPEG over the budget is decoded at the smallest DCT scale that
    keeps this much. ``max_side``: resize the result so its longest edge is at most this.
    """
    if not os.path.isfile(path):
        raise ImageError("image_missing", "not a regular file" if os.path.exists(path) else "no such file")
    notes: list[str] = []
    try:
        with warnings.catch_warnings():
            # Pillow warns above MAX_IMAGE_PIXELS; the budget below is the limit that applies
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as opened:
                im = opened
                stored = im.size
                if stored[0] <= 0 or stored[1] <= 0:
                    raise ImageError("image_unreadable", f"empty image {stored[0]}x{stored[1]}")
                if getattr(im, "is_animated", False):  # not n_frames: counting GIF frames reads them all
                    notes.append("first_frame")  # Image.open is positioned on frame 0
                over = stored[0] * stored[1] > max_pixels
                shrink = max_side is not None and max(stored) > max_side  # the caller downscales anyway
                if over or (shrink and im.format == "JPEG"):
                    scale = _draft_scale(stored, target_side) if im.format == "JPEG" else 1
                    reduced = (-(-stored[0] // scale), -(-stored[1] // scale))
                    if reduced[0] * reduced[1] > max_pixels:
                        raise ImageError("image_too_large", f"{stored[0]}x{stored[1]} = {stored[0] * stored[1]} pixels "
                                         f"> budget {max_pixels} (--max-image-pixels)")
                    if scale > 1:
                        im.draft(None, (stored[0] // scale, stored[1] // scale))
                        notes.append("jpeg_draft")
                im.load()
                transpose = None
                try:
                    transpose = _ORIENTATION.get(im.getexif().get(ExifTags.Base.Orientation, 1))
                except Exception:  # malformed EXIF: the pixels are still good, keep them as stored
                    pass
                if transpose is not None:
                    im = ImageOps.exif_transpose(im)
                    notes.append("exif_orientation")
                rgb = _to_rgb(im, notes)
                if rgb is opened:
                    rgb = opened.copy()  # closing the file frees the pixels of the opened image
    except ImageError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageError("image_too_large", str(e)) from None
    except (OSError, ValueError, SyntaxError, EOFError, Image.UnidentifiedImageError) as e:
        reason = "image_truncated" if "truncated" in str(e).lower() else "image_unreadable"
        raise ImageError(reason, f"{type(e).__name__}: {e}") from None
    except struct.error as e:  # some decoders read absurd header fields with struct
        raise ImageError("image_unreadable", f"{type(e).__name__}: {e}") from None
    if max_side is not None and max(rgb.size) > max_side:
        k = max_side / max(rgb.size)
        rgb = rgb.resize((max(1, round(rgb.width * k)), max(1, round(rgb.height * k))), Image.Resampling.BICUBIC)
        notes.append("downscaled")
    return LoadedImage(rgb, stored, transpose, tuple(notes))


def count_notes(counter: dict, notes: Sequence[str]) -> None:
    for n in notes:
        counter[n] = counter.get(n, 0) + 1
