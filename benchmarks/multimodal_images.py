"""Peak memory of image-text preprocessing on a folder that mixes ordinary photos with hostile ones.

    python benchmarks/multimodal_images.py [--work /tmp/mm_images_bench] [--normal 24]

The folder holds ``--normal`` ordinary images (1600 x 1200 JPEGs and 1024 x 768 PNGs) and, in the
mixed runs, the files a crawl brings: a 30000 x 30000 PNG decompression bomb (about 110 KB on disk),
a 12000 x 9000 JPEG scan (108 Mpx, over the default 64 Mpx budget: decoded at 1/8 scale), a
7000 x 7000 PNG (49 Mpx, within the budget: decoded in full), a truncated PNG, a CMYK JPEG, a 16-bit
greyscale PNG and an animated GIF. Each row runs one tool in a fresh process (``benchmarks/_common.py``:
VmHWM = peak resident set, anon = peak anonymous RSS sampled every 20 ms) with one worker:
``apriel preprocess-multimodal`` (Pixtral tokenizer, 1024 px) on the normal images alone, on the
mixed folder at the default budget and at ``--max-image-pixels 16000000``, and
``data_prep/synthetic_visual.py`` on the mixed folder. The point: the peak follows the largest image
the budget allows (the 7000 x 7000 PNG, or at 16 Mpx nothing larger than the drafted scan), not the
largest file present (the 900 Mpx bomb, which a plain ``Image.open(...).convert("RGB")`` loop either
refuses with a traceback or, with Pillow's limit lifted, would need 900 MB to 2.7 GB for).
"""

from __future__ import annotations

import argparse
import json
import shutil
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
from _common import run_measured
from PIL import Image, ImageDraw


def _picture(size: tuple[int, int], seed: int) -> Image.Image:
    """Smooth gradients with shapes and a little noise: compresses like a photo, not like a flat fill."""
    rng = np.random.default_rng(seed)
    w, h = size
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    a = np.stack([(x / w * 255), (y / h * 255), ((x + y) / (w + h) * 255)], axis=2)
    a += rng.normal(0, 6, (h, w, 1)).astype(np.float32)
    im = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8), "RGB")
    d = ImageDraw.Draw(im)
    for _ in range(6):
        x0, y0 = int(rng.integers(0, w - w // 4)), int(rng.integers(0, h - h // 4))
        d.ellipse((x0, y0, x0 + w // 5, y0 + h // 5), fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
    return im


def _png_bomb(path: Path, side: int) -> None:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    row = b"\x00" + bytes(-(-side // 8))
    z = zlib.compressobj(9)
    idat = b"".join([z.compress(row * 1000) for _ in range(side // 1000)]
                    + [z.compress(row * (side % 1000)), z.flush()])
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0))
                     + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def build_folders(work: Path, n_normal: int) -> tuple[Path, Path]:
    normal, mixed = work / "normal", work / "mixed"
    if (work / "done").exists():
        return normal, mixed
    normal.mkdir(parents=True, exist_ok=True)
    for i in range(n_normal):
        if i % 2:
            _picture((1024, 768), i).save(normal / f"photo{i:03d}.png", compress_level=1)
        else:
            _picture((1600, 1200), i).save(normal / f"photo{i:03d}.jpg", quality=90)
    shutil.copytree(normal, mixed)
    print("writing the large files ...", file=sys.stderr)
    _png_bomb(mixed / "bomb.png", 30000)
    big = Image.new("RGB", (12000, 9000), (90, 140, 200))
    ImageDraw.Draw(big).ellipse((2000, 1000, 9000, 8000), fill=(230, 200, 40))
    big.save(mixed / "scan.jpg", quality=85)
    del big
    legal = Image.new("RGB", (7000, 7000), (30, 160, 60))
    ImageDraw.Draw(legal).rectangle((1000, 1000, 5000, 6000), fill=(200, 30, 30))
    legal.save(mixed / "poster.png", compress_level=1)
    del legal
    _picture((800, 600), 99).save(mixed / "truncated.png")
    data = (mixed / "truncated.png").read_bytes()
    (mixed / "truncated.png").write_bytes(data[: len(data) // 2])
    _picture((800, 600), 98).convert("CMYK").save(mixed / "cmyk.jpg", quality=90)
    grey = (np.linspace(0, 65535, 800 * 600).reshape(600, 800)).astype(np.uint16)
    Image.fromarray(grey).save(mixed / "grey16.png")
    frames = [_picture((320, 240), s).convert("P") for s in (1, 2, 3)]
    frames[0].save(mixed / "animated.gif", save_all=True, append_images=frames[1:], duration=100)
    (work / "done").write_text("")
    return normal, mixed


def jsonl_for(folder: Path) -> Path:
    path = folder.with_suffix(".jsonl")
    with open(path, "w", encoding="utf-8") as f:
        for p in sorted(folder.iterdir()):
            record = {"images": [str(p)], "prompt": "<image>\nDescribe the image.", "response": p.stem}
            f.write(json.dumps(record) + "\n")
    return path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default="/tmp/mm_images_bench", help="scratch folder (images are kept for reruns)")
    ap.add_argument("--normal", type=int, default=24, help="ordinary images in each folder")
    args = ap.parse_args()
    work = Path(args.work)
    normal, mixed = build_folders(work, args.normal)
    pre = ["--tokenizer-type", "TikTokenizer", "--tokenizer-model", "pixtral", "--workers", "1"]
    runs = [
        ("preprocess-multimodal, normal images", "megatron_apriel.data.preprocess_multimodal",
         ["--input", jsonl_for(normal), "--output-prefix", work / "out/normal", *pre],
         work / "out/normal_multimodal.json"),
        ("preprocess-multimodal, mixed, 64 Mpx budget", "megatron_apriel.data.preprocess_multimodal",
         ["--input", jsonl_for(mixed), "--output-prefix", work / "out/mixed", *pre],
         work / "out/mixed_multimodal.json"),
        ("preprocess-multimodal, mixed, 16 Mpx budget", "megatron_apriel.data.preprocess_multimodal",
         ["--input", jsonl_for(mixed), "--output-prefix", work / "out/mixed16", *pre, "--max-image-pixels", "16000000"],
         work / "out/mixed16_multimodal.json"),
        ("synthetic_visual, mixed, 64 Mpx budget", "data_prep.synthetic_visual",
         ["--images", mixed, "--out", work / "out/synthetic", "--force"], work / "out/synthetic/report.json"),
    ]
    rows = []
    for name, module, argv, report_path in runs:
        r = run_measured(module, [str(a) for a in argv], work)
        report = json.loads(Path(report_path).read_text())
        skipped = report.get("skipped_by_reason", report.get("skipped"))
        skipped = {k: v for k, v in skipped.items() if k.startswith("image_")}
        rows.append((name, report.get("kept", report.get("samples")), sum(skipped.values()), r["seconds"],
                     r["hwm"] / 2**20, r["anon"] / 2**20, ", ".join(f"{v} {k}" for k, v in sorted(skipped.items()))))
        print(f"{name}: done", file=sys.stderr)
    print(f"{'run':<46} {'kept':>5} {'skipped':>7} {'s':>6} {'VmHWM MiB':>10} {'anon MiB':>9}  skipped images")
    for name, kept, skipped, s, hwm, anon, reasons in rows:
        print(f"{name:<46} {kept:>5} {skipped:>7} {s:>6.1f} {hwm:>10.0f} {anon:>9.0f}  {reasons or '-'}")
    print("(kept: records for preprocess-multimodal, samples for synthetic_visual)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
