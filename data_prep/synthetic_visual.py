"""Synthetic visual tasks of Apriel-1.5 CPT stage 2, generated from a folder of raw images.

    python data_prep/synthetic_visual.py --images raw/ [--annotations instances.json] \\
        --config examples/apriel_1p5_15b/cpt_stage2_data.yaml --out data/cpt2/synthetic [--dry-run]

Four task families, each with difficulty levels set in the config:

* ``reconstruction``: a rectangle covering ``mask_ratio`` of the image is painted grey; the answer
  names the main colour of each cell of a ``grid`` x ``grid`` split of the hidden rectangle (the
  palette colour that most of the cell's original pixels are nearest to).
* ``crop_matching``: a square crop (side ``crop_size`` x the short side) and ``candidates`` - 1
  distractors of the same size: from ``other_image`` s, elsewhere in the ``same_image``, or
  ``shifted`` from the true position by a fraction of the side (overlapping, hence most similar).
  The answer is the letter of the true crop.
* ``presence`` (needs COCO boxes): is a category in the image; ``answer: presence`` (yes/no),
  ``box`` (yes + box of the largest instance) or ``all_boxes``; absent categories are drawn from
  the same COCO supercategory when ``similar_negatives`` is set.
* ``counting`` (needs COCO boxes): how many instances of a category; the level is the count
  range (``min_count`` .. ``max_count``) the true count falls in, levels kept balanced where the
  images allow. Crowd annotations make a count
  unknowable, so their categories are never asked about.

Every answer is computed from the generation (the region that was painted, the crop that was cut,
the annotations), and the structured ``answer`` is kept in the record beside the ``response``
text so the data can be checked. Boxes are ``[x0, y0, x1, y1]`` in 0-1000 coordinates of the image.

Output: ``OUT/samples.jsonl`` (the format ``apriel preprocess-multimodal`` reads: ``images``,
``prompt`` with ``<image>`` placeholders, ``response``; plus ``task``, ``difficulty``, ``answer``,
``source``), ``OUT/images/`` (masked images and crops; untouched originals are referenced by a
path relative to OUT), ``OUT/report.json`` and ``OUT/contact_sheet.png``. The folder is built
under a temporary name and renamed when complete. ``--dry-run`` writes only the contact sheet and
prints the counts per task and difficulty.

Images are read by :func:`megatron_apriel.data.images.load_image`, the loader of
``apriel preprocess-multimodal``: an image that cannot be used (missing, unreadable, truncated, over
``--max-image-pixels``, a decompression bomb, an unsupported pixel mode) is counted in the report's
``skipped`` under that reason with an example in ``skipped_images`` and the run goes on (``--strict``
stops at the first, exit 2); odd but valid images are normalised the same way preprocessing will
(EXIF orientation, first frame, RGB), COCO boxes follow the orientation and any downscaling, and
images larger than ``--max-image-side`` are worked on downscaled.

Written by hand: these tasks are described in the Apriel-1.5 report but no library generates them;
Pillow does the image work.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import string
import sys
import time
from dataclasses import dataclass, field
from typing import Iterator, Optional

import numpy as np
from PIL import Image, ImageColor, ImageDraw

from megatron_apriel.data.images import DEFAULT_MAX_PIXELS, ImageError, LoadedImage, count_notes, load_image

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
PALETTE_NAMES = ("black", "white", "gray", "red", "green", "blue", "yellow", "orange", "purple", "brown", "pink",
                 "cyan")
PALETTE = np.array([ImageColor.getrgb(n) for n in PALETTE_NAMES], dtype=np.float64)
MASK_FILL = (128, 128, 128)

DEFAULT_CONFIG: dict = {
    "seed": 0,
    "per_image": 1,  # samples of each family per image
    "tasks": {
        "reconstruction": {"levels": {
            "easy": {"mask_ratio": 0.05, "grid": 1},
            "medium": {"mask_ratio": 0.15, "grid": 2},
            "hard": {"mask_ratio": 0.30, "grid": 3},
        }},
        "crop_matching": {"levels": {
            "easy": {"candidates": 2, "crop_size": 0.5, "distractors": "other_image"},
            "medium": {"candidates": 4, "crop_size": 0.35, "distractors": "same_image"},
            "hard": {"candidates": 6, "crop_size": 0.25, "distractors": "shifted"},
        }},
        "presence": {"levels": {
            "easy": {"answer": "presence", "similar_negatives": False},
            "medium": {"answer": "box", "similar_negatives": False},
            "hard": {"answer": "all_boxes", "similar_negatives": True},
        }},
        "counting": {"levels": {
            "easy": {"min_count": 0, "max_count": 3},
            "medium": {"min_count": 4, "max_count": 7},
            "hard": {"min_count": 8, "max_count": 1000},
        }},
    },
}
FAMILIES = tuple(DEFAULT_CONFIG["tasks"])
DISTRACTOR_KINDS = ("other_image", "same_image", "shifted")
PRESENCE_ANSWERS = ("presence", "box", "all_boxes")


class ConfigError(ValueError):
    pass


class Skip(Exception):
    """A sample that cannot be made from this image; the message is the counted reason."""


@dataclass
class Sample:
    task: str
    difficulty: str
    source: str
    images: list  # str (an existing file) or PIL.Image (written to OUT/images)
    prompt: str
    response: str
    answer: dict


@dataclass
class Annotations:
    """COCO boxes per image file name: {file: [(category name, supercategory, [x,y,w,h], iscrowd)]}."""

    by_file: dict
    categories: dict  # name -> supercategory
    sizes: dict = field(default_factory=dict)  # file -> (width, height) the boxes were drawn on, when given


class ImageSource:
    """Opens raw images through the loader preprocess-multimodal uses, and counts what it skips and normalises.

    Every image is read with :func:`megatron_apriel.data.images.load_image`, so the pixels the answers
    are computed on are the ones preprocessing later reads from the same file (oriented, RGB, first
    frame); images wider or taller than ``max_side`` are worked on downscaled (boxes in the answers
    are in 0-1000 coordinates, so they hold for the file at any size; ``box_pixels`` are in the
    downscaled image). A skipped image is counted under its reason with an example, or with
    ``strict`` stops the run (exit 2).
    """

    def __init__(self, max_pixels: int = DEFAULT_MAX_PIXELS, max_side: Optional[int] = None, strict: bool = False):
        self.max_pixels, self.max_side, self.strict = max_pixels, max_side, strict
        self.skipped: dict = {}
        self.examples: list[str] = []
        self.normalised: dict = {}

    def load(self, path: str) -> LoadedImage:
        """The image, or ImageError (uncounted: for images that are counted in their own turn)."""
        return load_image(path, max_pixels=self.max_pixels, target_side=self.max_side or 1024, max_side=self.max_side)

    def open(self, path: str) -> Optional[LoadedImage]:
        """The image, counted as used or as skipped (None)."""
        try:
            loaded = self.load(path)
        except ImageError as e:
            if self.strict:
                raise ConfigError(f"{path}: {e.reason}: {e}") from None
            self.skipped[e.reason] = self.skipped.get(e.reason, 0) + 1
            if len(self.examples) < 1000:
                self.examples.append(f"{path}: {e.reason}: {e}")
            print(f"synthetic_visual: {path}: {e.reason} ({e}); skipped", file=sys.stderr)
            return None
        count_notes(self.normalised, loaded.notes)
        return loaded


# --------------------------------------------------------------------------------------------------
# config and inputs


def load_config(path: Optional[str]) -> dict:
    cfg = copy.deepcopy(DEFAULT_CONFIG)
    if path:
        import yaml

        with open(path, encoding="utf-8") as f:
            user = yaml.safe_load(f) or {}
        if not isinstance(user, dict):
            raise ConfigError(f"{path}: expected a mapping")
        for key, value in user.items():
            if key == "tasks":
                if not isinstance(value, dict):
                    raise ConfigError(f"{path}: tasks: expected a mapping of families")
                cfg["tasks"] = {}
                for fam, spec in value.items():
                    if fam not in FAMILIES:
                        raise ConfigError(f"{path}: tasks.{fam}: unknown family (one of {', '.join(FAMILIES)})")
                    cfg["tasks"][fam] = spec if spec else copy.deepcopy(DEFAULT_CONFIG["tasks"][fam])
            elif key in ("seed", "per_image"):
                cfg[key] = value
            else:
                raise ConfigError(f"{path}: {key}: unknown key (seed, per_image, tasks)")
    check_config(cfg, path or "config")
    return cfg


def check_config(cfg: dict, where: str) -> None:
    def need(cond, key, msg):
        if not cond:
            raise ConfigError(f"{where}: {key}: {msg}")

    need(isinstance(cfg["per_image"], int) and cfg["per_image"] >= 1, "per_image", "a positive integer")
    for fam, spec in cfg["tasks"].items():
        levels = spec.get("levels") if isinstance(spec, dict) else None
        need(isinstance(levels, dict) and levels, f"tasks.{fam}.levels", "give at least one level")
        for name, lv in levels.items():
            key = f"tasks.{fam}.levels.{name}"
            need(isinstance(lv, dict), key, "expected a mapping")
            if fam == "reconstruction":
                need(0 < lv.get("mask_ratio", 0) < 1, f"{key}.mask_ratio", "in (0, 1)")
                need(isinstance(lv.get("grid"), int) and 1 <= lv["grid"] <= 8, f"{key}.grid", "an integer 1..8")
            elif fam == "crop_matching":
                need(isinstance(lv.get("candidates"), int) and 2 <= lv["candidates"] <= 26, f"{key}.candidates",
                     "an integer 2..26")
                need(0 < lv.get("crop_size", 0) < 1, f"{key}.crop_size", "in (0, 1)")
                need(lv.get("distractors") in DISTRACTOR_KINDS, f"{key}.distractors",
                     f"one of {', '.join(DISTRACTOR_KINDS)}")
            elif fam == "presence":
                need(lv.get("answer") in PRESENCE_ANSWERS, f"{key}.answer", f"one of {', '.join(PRESENCE_ANSWERS)}")
            elif fam == "counting":
                lo, hi = lv.get("min_count"), lv.get("max_count")
                need(isinstance(lo, int) and isinstance(hi, int) and 0 <= lo <= hi, key,
                     "min_count <= max_count, non-negative integers")
        if fam == "counting":
            ranges = sorted((lv["min_count"], lv["max_count"]) for lv in levels.values())
            for (_, hi), (lo, _) in zip(ranges, ranges[1:]):
                need(lo > hi, f"tasks.{fam}.levels", "count ranges overlap")


def list_images(folder: str) -> list[str]:
    if not os.path.isdir(folder):
        raise ConfigError(f"--images {folder}: not a directory")
    out = []
    for root, _, files in os.walk(folder):
        out += [os.path.join(root, f) for f in files if f.lower().endswith(IMAGE_EXTS)]
    return sorted(out)


def load_coco(path: str) -> Annotations:
    try:
        with open(path, encoding="utf-8") as f:
            coco = json.load(f)
        cats = {c["id"]: (c["name"], c.get("supercategory", c["name"])) for c in coco["categories"]}
        files = {im["id"]: im["file_name"] for im in coco["images"]}
        sizes = {im["file_name"]: (int(im["width"]), int(im["height"])) for im in coco["images"]
                 if "width" in im and "height" in im}
        by_file: dict = {f: [] for f in files.values()}
        for i, a in enumerate(coco["annotations"]):
            name, sup = cats[a["category_id"]]
            x, y, w, h = (float(v) for v in a["bbox"])
            by_file[files[a["image_id"]]].append((name, sup, [x, y, w, h], int(a.get("iscrowd", 0))))
    except (OSError, ValueError) as e:
        raise ConfigError(f"--annotations {path}: {e}") from None
    except (KeyError, TypeError) as e:
        raise ConfigError(f"--annotations {path}: not COCO instances JSON (missing or bad {e})") from None
    return Annotations(by_file, {n: s for n, s in cats.values()}, sizes)


# --------------------------------------------------------------------------------------------------
# the four families


def norm_box(box, w: int, h: int) -> list[int]:
    """Pixel [x0, y0, x1, y1] -> 0-1000 integers."""
    x0, y0, x1, y1 = box
    return [round(1000 * x0 / w), round(1000 * y0 / h), round(1000 * x1 / w), round(1000 * y1 / h)]


def colour_name(pixels: np.ndarray) -> str:
    """The palette colour most pixels are nearest to (a mean would call half red, half white "pink")."""
    px = pixels.reshape(-1, 3).astype(np.float64)
    nearest = ((px[:, None, :] - PALETTE[None]) ** 2).sum(axis=2).argmin(axis=1)
    return PALETTE_NAMES[int(np.bincount(nearest, minlength=len(PALETTE)).argmax())]


def reconstruction(img: Image.Image, lv: dict, rng: np.random.Generator) -> tuple:
    w, h = img.size
    g = lv["grid"]
    area = lv["mask_ratio"] * w * h
    aspect = float(np.exp(rng.uniform(np.log(0.5), np.log(2.0))))
    bw = int(min(w, max(g, round(np.sqrt(area * aspect)))))
    bh = int(min(h, max(g, round(area / bw))))
    x0, y0 = int(rng.integers(0, w - bw + 1)), int(rng.integers(0, h - bh + 1))
    box = (x0, y0, x0 + bw, y0 + bh)
    arr = np.asarray(img)
    xs = np.linspace(x0, x0 + bw, g + 1).round().astype(int)
    ys = np.linspace(y0, y0 + bh, g + 1).round().astype(int)
    cells = [[{"box": [int(xs[c]), int(ys[r]), int(xs[c + 1]), int(ys[r + 1])],
               "colour": colour_name(arr[ys[r] : ys[r + 1], xs[c] : xs[c + 1]])} for c in range(g)] for r in range(g)]
    masked = img.copy()
    ImageDraw.Draw(masked).rectangle((x0, y0, x0 + bw - 1, y0 + bh - 1), fill=MASK_FILL)
    nb = norm_box(box, w, h)
    if g == 1:
        prompt = (f"<image>\nThe grey rectangle at {nb} hides part of the image. What is the main colour of "
                  f"the hidden part? Answer with one of: {', '.join(PALETTE_NAMES)}.")
        response = cells[0][0]["colour"]
    else:
        prompt = (f"<image>\nThe grey rectangle at {nb} hides part of the image. Split it into a {g}x{g} grid and "
                  "give the main colour of each cell, one row per line, left to right, using: "
                  f"{', '.join(PALETTE_NAMES)}.")
        response = "\n".join(", ".join(c["colour"] for c in row) for row in cells)
    answer = {"box_pixels": list(box), "box": nb, "grid": g, "cells": cells}
    return [masked], prompt, response, answer


def _iou(a, b) -> float:
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union else 0.0


def crop_matching(img: Image.Image, path: str, lv: dict, rng: np.random.Generator, all_paths: list[str],
                  source: Optional[ImageSource] = None) -> tuple:
    w, h = img.size
    side = max(8, int(lv["crop_size"] * min(w, h)))
    if side >= min(w, h):
        raise Skip("image_too_small")
    k = lv["candidates"]

    def rand_box():
        x, y = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
        return (x, y, x + side, y + side)

    true_box = rand_box()
    true_crop = np.asarray(img.crop(true_box)).astype(np.int16)
    kind = lv["distractors"]
    if kind == "other_image" and len(all_paths) < 2:
        kind = "same_image"  # one image only: the next most different source
    distractors: list[tuple] = []  # (source path, box, PIL crop)
    for _ in range(50 * k):
        if len(distractors) == k - 1:
            break
        src, im = path, img
        if kind == "other_image":
            src = all_paths[int(rng.integers(len(all_paths)))]
            if src == path:
                continue
            try:
                im = (source or ImageSource()).load(src).image
            except ImageError:  # counted when its own turn comes
                continue
            if min(im.size) <= side:
                continue
            ow, oh = im.size
            x, y = int(rng.integers(0, ow - side + 1)), int(rng.integers(0, oh - side + 1))
            box = (x, y, x + side, y + side)
        elif kind == "same_image":
            box = rand_box()
            if _iou(box, true_box) > 0.2:
                continue
        else:  # shifted: overlaps the true crop
            dx, dy = (rng.uniform(0.2, 0.5, size=2) * side * rng.choice([-1, 1], size=2)).astype(int)
            dx, dy = int(dx), int(dy)
            box = (true_box[0] + dx, true_box[1] + dy, true_box[2] + dx, true_box[3] + dy)
            if box[0] < 0 or box[1] < 0 or box[2] > w or box[3] > h:
                continue
        crop = im.crop(box)
        # a distractor that looks like the true crop (flat background) would make two right answers
        if np.abs(np.asarray(crop).astype(np.int16) - true_crop).mean() < 8:
            continue
        if any(src == s and box == b for s, b, _ in distractors):
            continue
        distractors.append((src, box, crop))
    if len(distractors) < k - 1:
        raise Skip("no_distinct_distractors")
    correct = int(rng.integers(k))
    cands = distractors[:correct] + [(path, true_box, img.crop(true_box))] + distractors[correct:]
    letters = string.ascii_uppercase[:k]
    prompt = ("<image>\nWhich of these crops is cut from the image above?\n"
              + "\n".join(f"{L}: <image>" for L in letters) + f"\nAnswer with the letter ({', '.join(letters)}).")
    answer = {"letter": letters[correct], "box_pixels": list(true_box), "box": norm_box(true_box, w, h),
              "distractors": kind, "candidates": [{"source": s, "box_pixels": list(b)} for s, b, _ in cands]}
    return [path] + [c for _, _, c in cands], prompt, letters[correct], answer


def _usable(objects) -> tuple[dict, set]:
    """category -> [boxes]; categories with a crowd annotation are left out (their count is unknown)."""
    crowd = {o[0] for o in objects if o[3]}
    out: dict = {}
    for name, _, box, iscrowd in objects:
        if name not in crowd:
            out.setdefault(name, []).append(box)
    return out, crowd


def _xyxy(b, w, h) -> list[int]:
    x, y, bw, bh = b
    return norm_box((x, y, x + bw, y + bh), w, h)


def presence(img: Image.Image, objects, ann: Annotations, lv: dict, rng: np.random.Generator) -> tuple:
    w, h = img.size
    present, crowd = _usable(objects)
    absent = sorted(set(ann.categories) - set(present) - crowd)
    positive = bool(present) and (not absent or rng.random() < 0.5)
    if positive:
        cat = sorted(present)[int(rng.integers(len(present)))]
        boxes = sorted(present[cat], key=lambda b: -b[2] * b[3])
    else:
        if not absent:
            raise Skip("no_usable_category")
        pool = absent
        if lv.get("similar_negatives"):
            sups = {ann.categories[c] for c in present} | {ann.categories[c] for c in crowd}
            similar = [c for c in absent if ann.categories[c] in sups]
            pool = similar or absent
        cat = pool[int(rng.integers(len(pool)))]
        boxes = []
    mode = lv["answer"]
    if mode == "presence":
        prompt = f"<image>\nIs there a {cat} in the image? Answer yes or no."
        response = "yes" if boxes else "no"
    elif mode == "box":
        prompt = (f"<image>\nIs there a {cat} in the image? If there is, give the box of the largest one as "
                  f"[x0, y0, x1, y1] in 0-1000 coordinates; otherwise answer no.")
        response = f"yes {_xyxy(boxes[0], w, h)}" if boxes else "no"
    else:
        boxes = sorted(boxes, key=lambda b: (b[1], b[0]))
        prompt = (f"<image>\nGive the box of every {cat} in the image as [x0, y0, x1, y1] in 0-1000 coordinates, "
                  f"one per line, top to bottom; answer none if there is no {cat}.")
        response = "\n".join(str(_xyxy(b, w, h)) for b in boxes) if boxes else "none"
    answer = {"category": cat, "present": bool(boxes), "boxes": [_xyxy(b, w, h) for b in boxes]}
    return prompt, response, answer


def counting(img: Image.Image, objects, ann: Annotations, levels: dict, tally: dict, rng: np.random.Generator) -> tuple:
    """The level is set by the true count; among the levels this image can serve, the one with the
    fewest samples so far (``tally``) is taken, which keeps the rare high counts from being crowded out."""
    present, crowd = _usable(objects)
    counts = {c: len(b) for c, b in present.items()}
    counts.update({c: 0 for c in ann.categories if c not in present and c not in crowd})
    by_level: dict = {}
    for cat, n in sorted(counts.items()):
        for name, lv in levels.items():
            if lv["min_count"] <= n <= lv["max_count"]:
                by_level.setdefault(name, []).append(cat)
    if not by_level:
        raise Skip("no_count_in_levels")
    level = min(sorted(by_level), key=lambda name: tally.get(name, 0))
    cats = by_level[level]
    cat = cats[int(rng.integers(len(cats)))]
    prompt = f"<image>\nHow many instances of {cat} are in the image? Answer with a number."
    return level, prompt, str(counts[cat]), {"category": cat, "count": counts[cat]}


# --------------------------------------------------------------------------------------------------
# driver


def generate(cfg: dict, image_paths: list[str], ann: Optional[Annotations], images_root: str,
             skipped: dict, progress: bool = True, source: Optional[ImageSource] = None) -> Iterator[Sample]:
    """All samples of all families, deterministic in (seed, image index, family, repeat).

    ``skipped`` counts samples a family cannot make from an image; images that cannot be used at all
    are counted by ``source`` (an :class:`ImageSource`)."""
    from tqdm import tqdm

    source = source or ImageSource()
    fam_index = {f: i for i, f in enumerate(FAMILIES)}
    count_tally: dict = {}
    bar = tqdm(image_paths, desc="images", unit=" img", disable=not progress or None, mininterval=2.0)
    for idx, path in enumerate(bar):
        loaded = source.open(path)
        if loaded is None:
            continue
        img = loaded.image
        rel = os.path.relpath(path, images_root).replace(os.sep, "/")
        objects = None
        if ann is not None:
            name = rel if rel in ann.by_file else os.path.basename(path)
            frame = ann.sizes.get(name)  # boxes follow the image through orientation and downscaling
            objects = ann.by_file.get(name)
            objects = None if objects is None else [(n, sup, loaded.box_to_pixels(b, frame), crowd)
                                                    for n, sup, b, crowd in objects]
        for fam, spec in cfg["tasks"].items():
            levels = spec["levels"]
            names = list(levels)
            for rep in range(cfg["per_image"]):
                rng = np.random.default_rng([cfg["seed"], idx, fam_index[fam], rep])
                level = names[(idx * cfg["per_image"] + rep) % len(names)]
                lv = levels[level]
                try:
                    if fam == "reconstruction":
                        images, prompt, response, answer = reconstruction(img, lv, rng)
                    elif fam == "crop_matching":
                        images, prompt, response, answer = crop_matching(img, path, lv, rng, image_paths, source)
                        for cand in answer["candidates"]:  # paths relative to --images, not this machine's
                            cand["source"] = os.path.relpath(cand["source"], images_root).replace(os.sep, "/")
                    else:
                        if objects is None:
                            raise Skip("no_annotations")
                        images = [path]
                        if fam == "presence":
                            prompt, response, answer = presence(img, objects, ann, lv, rng)
                        else:
                            level, prompt, response, answer = counting(img, objects, ann, levels, count_tally, rng)
                            count_tally[level] = count_tally.get(level, 0) + 1
                except Skip as e:
                    key = f"{fam}:{e}"
                    skipped[key] = skipped.get(key, 0) + 1
                    continue
                yield Sample(fam, level, path, images, prompt, response, answer)


def contact_sheet(examples: dict, path: str, thumb: int = 96, cell_w: int = 420,
                  source: Optional[ImageSource] = None) -> None:
    """One tile per (task, difficulty): the sample's images scaled to ``thumb`` px high, then its response."""
    rows = [f for f in FAMILIES if any(k[0] == f for k in examples)]
    cols = sorted({k[1] for k in examples}, key=lambda d: (["easy", "medium", "hard"] + [d]).index(d))
    if not rows:
        return
    text_h = 56
    sheet = Image.new("RGB", (cell_w * len(cols), (thumb + text_h) * len(rows)), "white")
    d = ImageDraw.Draw(sheet)
    for r, fam in enumerate(rows):
        for c, diff in enumerate(cols):
            s = examples.get((fam, diff))
            x, y = c * cell_w, r * (thumb + text_h)
            d.rectangle((x, y, x + cell_w - 1, y + thumb + text_h - 1), outline="black")
            if s is None:
                continue
            xo = x + 2
            for im in s.images:
                if isinstance(im, str):
                    im = (source or ImageSource()).load(im).image  # used above: it loads as it did then
                t = im.copy()
                t.thumbnail((thumb * 3, thumb - 4))
                if xo + t.width > x + cell_w:
                    break
                sheet.paste(t, (xo, y + 2))
                d.rectangle((xo - 1, y + 1, xo + t.width, y + 2 + t.height), outline="gray")
                xo += t.width + 3
            lines = [f"{fam} / {diff}"] + s.response.replace("\n", " | ").splitlines()
            d.text((x + 3, y + thumb + 2), "\n".join(line[:64] for line in lines)[:200], fill="black")
    tmp = path + f".tmp{os.getpid()}.png"
    sheet.save(tmp)
    os.replace(tmp, path)


def run(args) -> dict:
    cfg = load_config(args.config)
    if args.max_image_pixels < 1 or args.max_image_side < 0:
        raise ConfigError("--max-image-pixels must be positive and --max-image-side non-negative")
    args.max_image_side = args.max_image_side or None
    if args.seed is not None:
        cfg["seed"] = args.seed
    paths = list_images(args.images)
    if args.limit:
        paths = paths[: args.limit]
    if not paths:
        raise ConfigError(f"--images {args.images}: no image files ({', '.join(IMAGE_EXTS)})")
    ann = load_coco(args.annotations) if args.annotations else None
    out = os.path.abspath(args.out)
    if not args.dry_run and os.path.exists(out) and os.listdir(out) and not args.force:
        raise ConfigError(f"--out {args.out}: exists and is not empty (use --force to replace it)")
    tmp = out + f".tmp{os.getpid()}"
    counts: dict = {}
    skipped: dict = {}
    source = ImageSource(args.max_image_pixels, args.max_image_side, args.strict)
    examples: dict = {}
    start = time.time()
    n = 0
    try:
        if not args.dry_run:
            os.makedirs(os.path.join(tmp, "images"))
            jsonl = open(os.path.join(tmp, "samples.jsonl"), "w", encoding="utf-8")
        for s in generate(cfg, paths, ann, args.images, skipped, source=source):
            key = (s.task, s.difficulty)
            counts[key] = counts.get(key, 0) + 1
            examples.setdefault(key, s)
            if args.dry_run:
                n += 1
                continue
            refs = []
            for j, im in enumerate(s.images):
                if isinstance(im, str):
                    refs.append(os.path.relpath(os.path.abspath(im), out).replace(os.sep, "/"))
                else:
                    name = f"images/{n:08d}_{j}.png"
                    im.save(os.path.join(tmp, name))
                    refs.append(name)
            record = {"id": f"{s.task}-{n:08d}", "task": s.task, "difficulty": s.difficulty,
                      "source": os.path.relpath(s.source, args.images).replace(os.sep, "/"),
                      "images": refs, "prompt": s.prompt, "response": s.response, "answer": s.answer}
            jsonl.write(json.dumps(record) + "\n")
            n += 1
        default_sheet = out + "_contact_sheet.png" if args.dry_run else os.path.join(tmp, "contact_sheet.png")
        sheet = args.contact_sheet or default_sheet
        contact_sheet(examples, sheet, source=source)
        report = {
            "images": len(paths),
            "samples": n,
            "counts": {f"{t}/{d}": c for (t, d), c in sorted(counts.items())},
            "skipped": dict(sorted({**skipped, **source.skipped}.items())),
            "skipped_images": source.examples,
            "images_normalised": dict(sorted(source.normalised.items())),
            "max_image_pixels": source.max_pixels,
            "max_image_side": source.max_side,
            "config": cfg,
            "annotations": args.annotations,
            "dry_run": args.dry_run,
            "contact_sheet": sheet if args.dry_run or args.contact_sheet else os.path.join(out, "contact_sheet.png"),
            "seconds": round(time.time() - start, 2),
        }
        if not args.dry_run:
            jsonl.close()
            with open(os.path.join(tmp, "report.json"), "w", encoding="utf-8") as f:
                json.dump(report, f, indent=2)
            if os.path.exists(out):
                shutil.rmtree(out)
            os.replace(tmp, out)
    except BaseException:
        if not args.dry_run:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    report["table"] = counts
    return report


def print_table(report: dict) -> None:
    counts = report["table"]
    diffs = sorted({d for _, d in counts}, key=lambda d: (["easy", "medium", "hard"] + [d]).index(d))
    fams = [f for f in FAMILIES if any(t == f for t, _ in counts)]
    print(f"{'task':<16}" + "".join(f"{d:>9}" for d in diffs) + f"{'total':>9}")
    for f in fams:
        row = [counts.get((f, d), 0) for d in diffs]
        print(f"{f:<16}" + "".join(f"{v:>9}" for v in row) + f"{sum(row):>9}")
    skipped = ", ".join(f"{v} {k}" for k, v in report["skipped"].items()) or "none"
    normalised = ", ".join(f"{v} {k}" for k, v in report["images_normalised"].items()) or "none"
    print(f"{report['samples']} samples from {report['images']} images in {report['seconds']} s; skipped: {skipped}; "
          f"images normalised: {normalised}; "
          f"contact sheet: {report['contact_sheet']}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Synthetic visual tasks (CPT stage 2) from raw images -> JSONL + images.")
    p.add_argument("--images", required=True, help="folder of raw images (searched recursively)")
    p.add_argument("--annotations", default=None, help="COCO instances JSON (file_name relative to --images); "
                   "needed for presence and counting")
    p.add_argument("--config", default=None, help="YAML of task families and difficulty levels (default: built in)")
    p.add_argument("--out", required=True, help="output folder (samples.jsonl, images/, report.json)")
    p.add_argument("--seed", type=int, default=None, help="overrides the config's seed")
    p.add_argument("--limit", type=int, default=None, help="use only the first N images (sorted)")
    p.add_argument("--dry-run", action="store_true", help="count and draw the contact sheet; write no samples")
    p.add_argument("--contact-sheet", default=None,
                   help="PNG path (default: OUT/contact_sheet.png, or OUT_contact_sheet.png with --dry-run)")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out")
    p.add_argument("--max-image-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                   help="most pixels decoded per image, checked from the header: larger images are skipped as "
                   "image_too_large (JPEGs are first decoded at 1/2..1/8 scale when that fits)")
    p.add_argument("--max-image-side", type=int, default=2048,
                   help="images with a longer edge are worked on downscaled to it (0: never)")
    p.add_argument("--strict", action="store_true", help="stop at the first image that cannot be used (exit 2)")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        report = run(args)
    except ConfigError as e:
        print(f"synthetic_visual: {e}", file=sys.stderr)
        return 2
    print_table(report)
    if not args.dry_run:
        print(f"-> {os.path.join(args.out, 'samples.jsonl')} (apriel preprocess-multimodal --input it)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
