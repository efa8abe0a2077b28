"""Synthetic visual tasks: every family and difficulty on images the test draws (solid blocks and shapes
at known positions and counts), answers checked against the drawing; dry run; preprocessing of the
output with loss on the responses only."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageColor, ImageDraw

from data_prep import synthetic_visual as sv

BLOCK_COLOURS = ["red", "green", "blue", "yellow", "white", "black", "orange", "purple", "cyan", "pink", "brown",
                 "gray"]
BW, BH = 40, 30  # block size; block images are 4 x 3 blocks = 160 x 90


def draw_blocks(path: Path, shift: int) -> list[list[str]]:
    names = [[BLOCK_COLOURS[(shift + r * 4 + c) % len(BLOCK_COLOURS)] for c in range(4)] for r in range(3)]
    im = Image.new("RGB", (4 * BW, 3 * BH))
    d = ImageDraw.Draw(im)
    for r in range(3):
        for c in range(4):
            d.rectangle((c * BW, r * BH, (c + 1) * BW - 1, (r + 1) * BH - 1), fill=ImageColor.getrgb(names[r][c]))
    im.save(path)
    return names


# shapes images: (circles, squares, crowd of people?) with known boxes; "person" is a crowd region in shapes2
SHAPES = {
    "shapes0.png": {"circle": 0, "square": 1},
    "shapes1.png": {"circle": 2, "square": 2},
    "shapes2.png": {"circle": 5, "square": 1, "person": 1},
    "shapes3.png": {"circle": 9, "square": 0},
}
CATEGORIES = [("circle", "shape"), ("square", "shape"), ("triangle", "shape"), ("dog", "animal"), ("person", "person")]


def draw_shapes(folder: Path) -> dict:
    """Images with shapes at known boxes and the COCO JSON that describes them; returns file -> boxes."""
    coco = {"images": [], "annotations": [],
            "categories": [{"id": i + 1, "name": n, "supercategory": s} for i, (n, s) in enumerate(CATEGORIES)]}
    cat_id = {n: i + 1 for i, (n, _) in enumerate(CATEGORIES)}
    truth = {}
    for img_id, (name, counts) in enumerate(SHAPES.items()):
        im = Image.new("RGB", (200, 160), "white")
        d = ImageDraw.Draw(im)
        boxes = {"circle": [], "square": []}
        for k in range(counts["circle"]):
            x, y = 8 + (k % 5) * 30, 8 + (k // 5) * 30
            d.ellipse((x, y, x + 19, y + 19), fill="red")
            boxes["circle"].append([x, y, 20, 20])
        for k in range(counts["square"]):
            x, y = 20 + k * 80, 100
            d.rectangle((x, y, x + 39 + 10 * k, y + 39), fill="blue")
            boxes["square"].append([x, y, 40 + 10 * k, 40])
        anns = [(c, b, 0) for c in boxes for b in boxes[c]]
        if counts.get("person"):
            anns.append(("person", [150, 10, 40, 60], 1))  # a crowd region: never counted or asked about
        for c, b, crowd in anns:
            coco["annotations"].append({"id": len(coco["annotations"]) + 1, "image_id": img_id,
                                        "category_id": cat_id[c], "bbox": b, "iscrowd": crowd, "area": b[2] * b[3]})
        coco["images"].append({"id": img_id, "file_name": name, "width": 200, "height": 160})
        im.save(folder / name)
        truth[name] = boxes
    (folder.parent / "instances.json").write_text(json.dumps(coco))
    return truth


def xyxy(b, w=200, h=160):
    x, y, bw, bh = b
    return [round(1000 * x / w), round(1000 * y / h), round(1000 * (x + bw) / w), round(1000 * (y + bh) / h)]


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    root = tmp_path_factory.mktemp("sv")
    raw = root / "raw"
    raw.mkdir()
    blocks = {f"blocks{i}.png": draw_blocks(raw / f"blocks{i}.png", i) for i in range(3)}
    truth = draw_shapes(raw)
    out = root / "out"
    assert sv.main(["--images", str(raw), "--annotations", str(root / "instances.json"), "--out", str(out),
                    "--config", "examples/apriel_1p5_15b/cpt_stage2_data.yaml", "--seed", "7"]) == 0
    records = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    cfg = sv.load_config("examples/apriel_1p5_15b/cpt_stage2_data.yaml")
    return root, raw, out, records, blocks, truth, cfg


def load(out: Path, ref: str) -> np.ndarray:
    return np.asarray(Image.open(out / ref).convert("RGB"))


def test_every_family_and_difficulty_is_generated(generated):
    _, _, out, records, _, _, cfg = generated
    seen = {(r["task"], r["difficulty"]) for r in records}
    for fam, spec in cfg["tasks"].items():
        for level in spec["levels"]:
            assert (fam, level) in seen, (fam, level)
    report = json.loads((out / "report.json").read_text())
    assert report["samples"] == len(records)
    assert sum(report["counts"].values()) == len(records)
    for r in records:
        assert r["prompt"].count("<image>") == len(r["images"]) and r["response"]
        assert all((out / p).is_file() for p in r["images"])
    # block images have no annotations: presence/counting are skipped for them and counted
    assert report["skipped"]["presence:no_annotations"] == 3 * cfg["per_image"]
    assert (out / "contact_sheet.png").is_file()


def test_reconstruction_answers(generated):
    _, raw, out, records, blocks, _, cfg = generated
    recs = [r for r in records if r["task"] == "reconstruction"]
    assert recs
    for r in recs:
        lv = cfg["tasks"]["reconstruction"]["levels"][r["difficulty"]]
        original = np.asarray(Image.open(raw / r["source"]).convert("RGB"))
        masked = load(out, r["images"][0])
        x0, y0, x1, y1 = r["answer"]["box_pixels"]
        h, w = original.shape[:2]
        assert (masked[y0:y1, x0:x1] == sv.MASK_FILL).all()
        outside = np.ones((h, w), bool)
        outside[y0:y1, x0:x1] = False
        assert (masked[outside] == original[outside]).all()
        assert abs((x1 - x0) * (y1 - y0) / (w * h) - lv["mask_ratio"]) < 0.03
        assert r["answer"]["box"] == sv.norm_box((x0, y0, x1, y1), w, h)
        cells = r["answer"]["cells"]
        assert len(cells) == lv["grid"] and all(len(row) == lv["grid"] for row in cells)
        assert r["response"] == "\n".join(", ".join(c["colour"] for c in row) for row in cells)
        if r["source"] in blocks:
            names = blocks[r["source"]]
            for row in cells:
                for cell in row:
                    cx0, cy0, cx1, cy1 = cell["box"]
                    touched = {names[br][bc] for br in range(cy0 // BH, (cy1 - 1) // BH + 1)
                               for bc in range(cx0 // BW, (cx1 - 1) // BW + 1)}
                    assert cell["colour"] in touched, (cell, touched)
                    if len(touched) == 1:
                        assert cell["colour"] == touched.pop()


def iou(a, b):
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    return ix * iy / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - ix * iy)


def test_crop_matching_answers(generated):
    _, raw, out, records, _, _, cfg = generated
    recs = [r for r in records if r["task"] == "crop_matching"]
    assert {r["difficulty"] for r in recs} == set(cfg["tasks"]["crop_matching"]["levels"])
    for r in recs:
        lv = cfg["tasks"]["crop_matching"]["levels"][r["difficulty"]]
        k = lv["candidates"]
        assert len(r["images"]) == k + 1 and r["answer"]["distractors"] == lv["distractors"]
        letters = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"[:k]
        assert r["response"] == r["answer"]["letter"] and r["response"] in letters
        original = Image.open(raw / r["source"]).convert("RGB")
        assert load(out, r["images"][0]).tolist() == np.asarray(original).tolist()
        box = r["answer"]["box_pixels"]
        truth = np.asarray(original.crop(box))
        side = int(lv["crop_size"] * min(original.size))
        assert box[2] - box[0] == side and box[3] - box[1] == side
        for i, (ref, cand) in enumerate(zip(r["images"][1:], r["answer"]["candidates"])):
            pixels = load(out, ref)
            if letters[i] == r["response"]:
                assert (pixels == truth).all() and cand["source"] == r["source"] and cand["box_pixels"] == box
            else:
                assert pixels.shape == truth.shape and np.abs(pixels.astype(int) - truth).mean() >= 8
                src = np.asarray(Image.open(raw / cand["source"]).convert("RGB").crop(cand["box_pixels"]))
                assert (pixels == src).all()  # a distractor is what its record says it is
                if lv["distractors"] == "other_image":
                    assert cand["source"] != r["source"]
                elif lv["distractors"] == "same_image":
                    assert cand["source"] == r["source"] and iou(cand["box_pixels"], box) <= 0.2
                else:
                    assert cand["source"] == r["source"] and iou(cand["box_pixels"], box) > 0


def test_presence_answers(generated):
    _, _, _, records, _, truth, cfg = generated
    recs = [r for r in records if r["task"] == "presence"]
    assert {r["difficulty"] for r in recs} == set(cfg["tasks"]["presence"]["levels"])
    sup = dict(CATEGORIES)
    for r in recs:
        lv = cfg["tasks"]["presence"]["levels"][r["difficulty"]]
        boxes = truth[r["source"]]
        cat = r["answer"]["category"]
        assert cat != "person"  # crowd: never asked
        drawn = boxes.get(cat, [])
        assert r["answer"]["present"] == bool(drawn)
        assert sorted(r["answer"]["boxes"]) == sorted(xyxy(b) for b in drawn)
        if lv["answer"] == "presence":
            assert r["response"] == ("yes" if drawn else "no")
        elif lv["answer"] == "box":
            largest = max(drawn, key=lambda b: b[2] * b[3]) if drawn else None
            assert r["response"] == (f"yes {xyxy(largest)}" if drawn else "no")
        else:
            listed = "\n".join(str(xyxy(b)) for b in sorted(drawn, key=lambda b: (b[1], b[0])))
            assert r["response"] == (listed if drawn else "none")
        if not drawn and lv.get("similar_negatives"):
            present = {c for c, bs in boxes.items() if bs}
            assert sup[cat] in {sup[c] for c in present} | {"person"} or not present


def test_counting_answers(generated):
    _, _, _, records, _, _, cfg = generated
    recs = [r for r in records if r["task"] == "counting"]
    levels = cfg["tasks"]["counting"]["levels"]
    assert recs
    for r in recs:
        cat = r["answer"]["category"]
        assert cat != "person"
        n = SHAPES[r["source"]].get(cat, 0)
        assert r["response"] == str(n) and r["answer"]["count"] == n
        assert levels[r["difficulty"]]["min_count"] <= n <= levels[r["difficulty"]]["max_count"]
    # with a count of 9 circles in one image, the hard level (8+) exists
    assert any(r["difficulty"] == "hard" for r in recs)


def test_dry_run_report_and_contact_sheet(generated, capsys, tmp_path):
    root, raw, _, records, _, _, _ = generated
    out = tmp_path / "dry"
    sheet = tmp_path / "sheet.png"
    assert sv.main(["--images", str(raw), "--annotations", str(root / "instances.json"), "--out", str(out),
                    "--config", "examples/apriel_1p5_15b/cpt_stage2_data.yaml", "--seed", "7", "--dry-run",
                    "--contact-sheet", str(sheet)]) == 0
    assert not out.exists()
    text = capsys.readouterr().out
    lines = {line.split()[0]: line.split()[1:] for line in text.splitlines() if line and line.split()[0] in sv.FAMILIES}
    header = text.splitlines()[0].split()[1:-1]
    for fam, values in lines.items():
        for diff, v in zip(header, values):
            assert int(v) == sum(1 for r in records if r["task"] == fam and r["difficulty"] == diff)
        assert int(values[-1]) == sum(1 for r in records if r["task"] == fam)
    with Image.open(sheet) as im:
        assert im.format == "PNG" and im.width >= 3 * 300 and im.height >= 4 * 100


def test_bad_input(tmp_path, generated, capsys):
    _, raw, _, _, _, _, _ = generated
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("tasks:\n  crop_matching:\n    levels:\n"
                   "      easy: {candidates: 1, crop_size: 0.3, distractors: same_image}\n")
    assert sv.main(["--images", str(raw), "--out", str(tmp_path / "o"), "--config", str(cfg)]) == 2
    assert "tasks.crop_matching.levels.easy.candidates" in capsys.readouterr().err
    cfg.write_text("tasks:\n  colouring: {}\n")
    assert sv.main(["--images", str(raw), "--out", str(tmp_path / "o"), "--config", str(cfg)]) == 2
    assert "tasks.colouring: unknown family" in capsys.readouterr().err
    (tmp_path / "full").mkdir()
    (tmp_path / "full/x").write_text("x")
    assert sv.main(["--images", str(raw), "--out", str(tmp_path / "full")]) == 2
    assert "--force" in capsys.readouterr().err and (tmp_path / "full/x").exists()


def test_preprocessed_loss_mask_is_the_response(generated, tmp_path):
    """The generated JSONL goes through preprocess-multimodal; the loss covers exactly each response + EOS."""
    from test_multimodal_data import make_tokenizer
    from transformers import PreTrainedTokenizerFast

    from megatron_apriel.data import multimodal as mm
    from megatron_apriel.data import preprocess_multimodal as pmm

    _, _, out, records, _, _, _ = generated
    tok = make_tokenizer(tmp_path / "tok")
    prefix = tmp_path / "mm/synthetic"
    assert pmm.main(["--input", str(out / "samples.jsonl"), "--output-prefix", str(prefix), "--tokenizer-type",
                    "HuggingFaceTokenizer", "--tokenizer-model", str(tok), "--image-size", "64"]) == 0
    meta = json.loads(Path(f"{prefix}_multimodal.json").read_text())
    assert meta["kept"] == len(records) and meta["skipped"] == 0
    hf = PreTrainedTokenizerFast.from_pretrained(tok)
    ds = mm.MultimodalDataset(str(prefix), seq_length=512)
    n_images = 0
    for doc, r in enumerate(records):
        toks = np.asarray(ds.tokens[doc])
        mask = np.asarray(ds.masks[doc]).astype(bool)
        assert toks[mask].tolist() == hf(r["response"], add_special_tokens=False)["input_ids"] + [hf.eos_token_id]
        assert (toks == 13).sum() == len(r["images"])  # one [IMG_END] per image
        n_images += len(r["images"])
    assert meta["image_refs"] == n_images and meta["images"] < n_images  # originals are stored once


@pytest.mark.parametrize("orientation", range(1, 9))
def test_boxes_follow_exif_orientation_and_downscaling(tmp_path, orientation):
    """A box drawn on the stored pixel grid lands on the same pixels of the upright, downscaled image. (<0.1 s each)"""
    from wild_images import with_orientation

    from megatron_apriel.data.images import load_image

    stored = Image.new("RGB", (120, 80), "black")
    ImageDraw.Draw(stored).rectangle((10, 20, 49, 39), fill="white")  # [x, y, w, h] = [10, 20, 40, 20]
    path = with_orientation(tmp_path / "o.png", stored, orientation)
    full = load_image(str(path))
    assert full.notes == (() if orientation == 1 else ("exif_orientation",))
    x, y, w, h = full.box_to_pixels([10, 20, 40, 20], frame=(120, 80))
    assert (x, y, x + w, y + h) == full.image.convert("L").getbbox()  # exact at full size
    if orientation in (1, 5, 6, 7, 8):  # a frame of the upright size (axes swapped) says: drawn upright, unchanged
        assert full.box_to_pixels([x, y, w, h], frame=full.full_size) == [x, y, w, h]
    half = load_image(str(path), max_side=60)
    assert max(half.image.size) == 60 and half.notes[-1] == "downscaled"
    assert half.box_to_pixels([10, 20, 40, 20]) == [v / 2 for v in (x, y, w, h)]


def test_hostile_and_odd_images_in_the_raw_folder(tmp_path, capsys):
    """Bomb, truncated, non-image and float images are counted skips; rotated / 16-bit / animated /
    alpha / CMYK images are used, normalised, with COCO boxes turned with the image; the samples of
    the other images are all written and preprocess-multimodal reads every file the JSONL names. (about 10 s)"""
    from PIL import ImageOps
    from test_multimodal_data import make_tokenizer
    from wild_images import wild_folder, with_orientation

    from megatron_apriel.data import preprocess_multimodal as pmm

    raw = tmp_path / "raw"
    files = wild_folder(raw)
    for i in range(2):
        draw_blocks(raw / f"blocks{i}.png", i)
    # an annotated photo stored sideways: boxes on the stored grid (COCO width/height 200 x 160)
    im = Image.new("RGB", (200, 160), "white")
    d = ImageDraw.Draw(im)
    d.rectangle((20, 100, 59, 139), fill="blue")
    d.rectangle((120, 10, 179, 49), fill="blue")
    d.ellipse((8, 8, 27, 27), fill="red")
    with_orientation(raw / "sideways.png", im, 6)
    coco = {"images": [{"id": 1, "file_name": "sideways.png", "width": 200, "height": 160}],
            "categories": [{"id": 1, "name": "square", "supercategory": "shape"},
                           {"id": 2, "name": "circle", "supercategory": "shape"},
                           {"id": 3, "name": "dog", "supercategory": "animal"}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [20, 100, 40, 40], "iscrowd": 0},
                            {"id": 2, "image_id": 1, "category_id": 1, "bbox": [120, 10, 60, 40], "iscrowd": 0},
                            {"id": 3, "image_id": 1, "category_id": 2, "bbox": [8, 8, 20, 20], "iscrowd": 0}]}
    (tmp_path / "coco.json").write_text(json.dumps(coco))
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("per_image: 4\ntasks:\n  reconstruction: {levels: {easy: {mask_ratio: 0.1, grid: 1}}}\n"
                   "  presence: {levels: {box: {answer: all_boxes, similar_negatives: false}}}\n"
                   "  counting: {levels: {few: {min_count: 0, max_count: 5}}}\n")
    out = tmp_path / "out"
    argv = ["--images", str(raw), "--annotations", str(tmp_path / "coco.json"), "--config", str(cfg), "--seed", "1"]
    assert sv.main(argv + ["--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["images"] == 12
    assert {k: v for k, v in report["skipped"].items() if k.startswith("image_")} == {
        "image_too_large": 1, "image_truncated": 1, "image_unreadable": 1, "image_mode_unsupported": 1}
    assert any(e.startswith(str(files["bomb.png"])) for e in report["skipped_images"])
    assert report["images_normalised"] == {"exif_orientation": 2, "first_frame": 1, "mode_CMYK": 1, "mode_I;16": 1,
                                           "mode_P": 1, "mode_RGBA": 1}
    records = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    used = ["blocks0.png", "blocks1.png", "sideways.png", "rotated.png", "grey16.png", "animated.gif", "alpha.png",
            "cmyk.jpg"]
    assert sorted({r["source"] for r in records}) == sorted(used)
    assert all(sum(r["source"] == s and r["task"] == "reconstruction" for r in records) == 4 for s in used)
    # the sideways photo: counts, and every box covers its shape in the upright image
    with Image.open(raw / "sideways.png") as f:
        upright = np.asarray(ImageOps.exif_transpose(f).convert("RGB")).astype(int)
    assert upright.shape[:2] == (200, 160)
    side = [r for r in records if r["source"] == "sideways.png"]
    assert {r["answer"]["category"]: r["answer"]["count"] for r in side if r["task"] == "counting"}.items() <= \
        {"square": 2, "circle": 1, "dog": 0}.items()
    boxes = [(r["answer"]["category"], b) for r in side if r["task"] == "presence" for b in r["answer"]["boxes"]]
    assert {c for c, _ in boxes} == {"square", "circle"}
    for cat, (x0, y0, x1, y1) in boxes:
        crop = upright[round(y0 * 200 / 1000) : round(y1 * 200 / 1000), round(x0 * 160 / 1000) : round(x1 * 160 / 1000)]
        colour = np.array([0, 0, 255] if cat == "square" else [255, 0, 0])
        share = (np.abs(crop - colour).sum(axis=2) < 60).mean()
        assert share > (0.95 if cat == "square" else 0.7), (cat, share)
    # every file the JSONL names, originals included, is read by preprocessing as it was here
    tok = make_tokenizer(tmp_path / "tok")
    assert pmm.main(["--input", str(out / "samples.jsonl"), "--output-prefix", str(tmp_path / "mm/s"),
                     "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", str(tok),
                     "--image-size", "64"]) == 0
    meta = json.loads((tmp_path / "mm/s_multimodal.json").read_text())
    assert meta["kept"] == len(records) and meta["skipped"] == 0
    # --strict: the first unusable image stops the run, exit 2, no output folder
    capsys.readouterr()
    assert sv.main(argv + ["--out", str(tmp_path / "strict"), "--strict"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bomb.png: image_too_large" in err[0]
    assert not (tmp_path / "strict").exists() and not list(tmp_path.glob("strict.tmp*"))


def test_large_jpeg_is_decoded_at_reduced_scale(tmp_path):
    """With a working size, a JPEG is decoded by DCT scaling to just above it, then resized; over the
    pixel budget only a JPEG that fits once reduced is kept. (<0.1 s)"""
    from megatron_apriel.data.images import ImageError, load_image

    Image.new("RGB", (400, 300), "red").save(tmp_path / "a.jpg")
    Image.new("RGB", (400, 300), "red").save(tmp_path / "a.png")
    got = load_image(str(tmp_path / "a.jpg"), target_side=90, max_side=90)
    assert got.notes == ("jpeg_draft", "downscaled") and got.image.size == (90, 68)
    assert got.box_to_pixels([0, 0, 400, 300]) == [0, 0, 90, 68]
    assert load_image(str(tmp_path / "a.png"), max_side=90).notes == ("downscaled",)
    assert load_image(str(tmp_path / "a.jpg"), max_pixels=10000, target_side=90).image.size == (100, 75)  # 1/4
    with pytest.raises(ImageError) as e:
        load_image(str(tmp_path / "a.jpg"), max_pixels=1000, target_side=90)  # 1/4 = 7500 px: still over
    assert e.value.reason == "image_too_large"
    with pytest.raises(ImageError) as e:
        load_image(str(tmp_path / "a.png"), max_pixels=10000)
    assert e.value.reason == "image_too_large" and "400x300 = 120000 pixels > budget 10000" in str(e.value)
