"""Image files of the kinds a crawled corpus holds, made on the spot for the image-loading tests.

Each maker writes one file and returns its path; :func:`wild_folder` writes one of each kind.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_bomb(path: Path, side: int = 30000) -> Path:
    """A valid 1-bit greyscale PNG of side x side pixels, all black, under 200 KB on disk.

    Written row by row through zlib so the test never holds the pixels (Pillow would need 900 MB)."""
    row = b"\x00" + bytes(-(-side // 8))  # filter byte + packed bits
    z = zlib.compressobj(9)
    parts = [z.compress(row * 1000) for _ in range(side // 1000)] + [z.compress(row * (side % 1000)), z.flush()]
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", b"".join(parts))
                     + _chunk(b"IEND", b""))
    return path


def scene(size: tuple[int, int], seed: int = 0) -> Image.Image:
    """An RGB picture with a few coloured shapes (distinct pixels, so orientation errors show)."""
    rng = np.random.default_rng(seed)
    im = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(im)
    w, h = size
    for k in range(4):
        x0, y0 = int(rng.integers(0, w - 4)), int(rng.integers(0, h - 4))
        box = (x0, y0, min(w - 1, x0 + w // 3), min(h - 1, y0 + h // 3))
        d.rectangle(box, fill=tuple(int(v) for v in rng.integers(0, 255, 3))) if k % 2 else d.ellipse(box, fill="red")
    return im


def truncated(path: Path, size=(80, 60)) -> Path:
    scene(size).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def with_orientation(path: Path, im: Image.Image, orientation: int) -> Path:
    exif = Image.Exif()
    exif[0x0112] = orientation
    im.save(path, exif=exif)
    return path


def grey16(path: Path, size=(48, 32)) -> tuple[Path, np.ndarray]:
    a = (np.arange(size[0] * size[1], dtype=np.int64).reshape(size[1], size[0]) * 42 % 65536).astype(np.uint16)
    Image.fromarray(a).save(path)
    return path, a


def animated_gif(path: Path, size=(40, 30)) -> Path:
    frames = [scene(size, seed).convert("P") for seed in (1, 2, 3)]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0, transparency=0)
    return path


def rgba(path: Path, size=(40, 40)) -> Path:
    im = scene(size, 4).convert("RGBA")
    a = np.asarray(im).copy()
    a[:, : size[0] // 2, 3] = 60  # half the image translucent
    Image.fromarray(a, "RGBA").save(path)
    return path


def cmyk(path: Path, size=(40, 30)) -> Path:
    scene(size, 5).convert("CMYK").save(path, quality=95)
    return path


def float_tiff(path: Path, size=(20, 20)) -> Path:
    Image.fromarray(np.linspace(0, 1, size[0] * size[1], dtype=np.float32).reshape(size[1], size[0]), "F").save(path)
    return path


def wild_folder(folder: Path) -> dict:
    """One file of every kind in ``folder``: name -> path (names say what each is)."""
    folder.mkdir(parents=True, exist_ok=True)
    out = {
        "bomb.png": png_bomb(folder / "bomb.png"),
        "truncated.png": truncated(folder / "truncated.png"),
        "not_an_image.jpg": folder / "not_an_image.jpg",
        "float.tif": float_tiff(folder / "float.tif"),
        "rotated.png": with_orientation(folder / "rotated.png", scene((64, 40), 6), 6),
        "grey16.png": grey16(folder / "grey16.png")[0],
        "animated.gif": animated_gif(folder / "animated.gif"),
        "alpha.png": rgba(folder / "alpha.png"),
        "cmyk.jpg": cmyk(folder / "cmyk.jpg"),
    }
    out["not_an_image.jpg"].write_text("<html>404 Not Found</html>\n")
    return out
