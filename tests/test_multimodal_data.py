"""Image-text sample format: token layout against transformers' PixtralProcessor, loss masks, images,
bad-input accounting and the collated micro-batch."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_python
from PIL import Image, ImageDraw

from megatron_apriel.data import multimodal as mm
from megatron_apriel.data import multimodal_format as fmt
from megatron_apriel.data import preprocess_multimodal as pmm
from megatron_apriel.data.image_text_blend import ImageTextBlend

SPECIALS = (["<unk>", "<s>", "</s>"] + [f"<sp{i}>" for i in range(3, 10)]
            + ["[IMG]", "<sp11>", "[IMG_BREAK]", "[IMG_END]", "<sp14>", "<sp15>"])


def make_tokenizer(path: Path) -> Path:
    """A byte-level BPE with Pixtral's image tokens at ids 10/12/13, small enough for tiny presets."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    corpus = ["How many circles are in the image? Answer with a number.", "A red square and a blue circle.",
              "Which candidate crop (A, B, C, D) is taken from the image?"] * 20
    tok.train_from_iterator(corpus, trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    assert hf.convert_tokens_to_ids(["[IMG]", "[IMG_BREAK]", "[IMG_END]"]) == [10, 12, 13]
    hf.save_pretrained(path)
    return path


def draw(path: Path, size: tuple[int, int], shapes: list[tuple[str, tuple[int, int, int, int], str]]) -> Path:
    """An RGB image (width, height) with the given shapes ("rect"/"ellipse", box, colour)."""
    im = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(im)
    for kind, box, colour in shapes:
        (d.rectangle if kind == "rect" else d.ellipse)(box, fill=colour)
    im.save(path)
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("mm")
    tok = make_tokenizer(root / "tok")
    (root / "img").mkdir()
    draw(root / "img/a.png", (70, 40), [("rect", (5, 5, 20, 20), "red"), ("ellipse", (30, 10, 60, 35), "blue")])
    draw(root / "img/b.png", (30, 100), [("ellipse", (2, 2, 28, 28), "green")])
    draw(root / "img/c.jpg", (200, 120), [("rect", (50, 20, 150, 100), "yellow")])  # resized: longest edge 64
    records = [
        {"images": ["img/a.png", "img/b.png"], "prompt": "Look <image> and <image> here.",
         "response": "A red square and a blue circle."},
        {"images": ["img/c.jpg"], "text": "<image>A yellow square."},
        {"images": ["img/a.png"], "prompt": "How many circles are in the image?", "response": "1"},  # no placeholder
        {"prompt": "No image at all?", "response": "Yes."},
    ]
    good = root / "good.jsonl"
    good.write_text("".join(json.dumps(r) + "\n" for r in records))
    return root, tok, good, records


def run_preprocess(root, tok, inputs, prefix, *extra):
    argv = ["--input", *map(str, inputs), "--output-prefix", str(root / prefix), "--tokenizer-type",
            "HuggingFaceTokenizer", "--tokenizer-model", str(tok), "--image-size", "64", "--patch-size", "16", *extra]
    return pmm.main(argv)


def pixtral_processor_class(monkeypatch):
    """transformers' PixtralProcessor. Its module imports one size helper from the torchvision image
    processor; without torchvision the PIL image processor module, which defines the same helper,
    stands in for that import (the processor is then used with the PIL image processor anyway)."""
    try:
        from transformers.models.pixtral.processing_pixtral import PixtralProcessor
    except ImportError:
        import transformers.models.pixtral.image_processing_pil_pixtral as pil

        monkeypatch.setitem(sys.modules, "transformers.models.pixtral.image_processing_pixtral", pil)
        monkeypatch.delitem(sys.modules, "transformers.models.pixtral.processing_pixtral", raising=False)
        from transformers.models.pixtral.processing_pixtral import PixtralProcessor
    return PixtralProcessor


def test_tokens_and_pixels_match_pixtral_processor(corpus, monkeypatch):
    from transformers import PreTrainedTokenizerFast
    from transformers.models.pixtral.image_processing_pil_pixtral import PixtralImageProcessorPil

    PixtralProcessor = pixtral_processor_class(monkeypatch)

    root, tok, good, records = corpus
    hf_tok = PreTrainedTokenizerFast.from_pretrained(tok)
    proc = PixtralProcessor(image_processor=PixtralImageProcessorPil(size={"longest_edge": 64}, patch_size=16),
                            tokenizer=hf_tok, patch_size=16)
    assert run_preprocess(root, tok, [good], "out/a") == 0
    ds = mm.MultimodalDataset(str(root / "out/a"), seq_length=256)
    layout = ds.layout
    for doc, rec in enumerate(records):
        toks = np.asarray(ds.tokens[doc], dtype=np.int64)
        images = [Image.open(root / p) for p in rec.get("images", [])]
        prompt = rec.get("prompt", rec.get("text"))
        hf_prompt = prompt.replace("<image>", "[IMG]") if "<image>" in prompt else "[IMG]" * len(images) + prompt
        ref = proc(text=hf_prompt, images=images or None, return_tensors="pt")
        ids = ref["input_ids"][0].numpy()
        assert toks[0] == hf_tok.bos_token_id
        np.testing.assert_array_equal(toks[1 : 1 + len(ids)], ids)  # prompt with expanded images, token for token
        rest = toks[1 + len(ids) :]
        response = hf_tok(rec["response"], add_special_tokens=False)["input_ids"] if "response" in rec else []
        expected_rest = response + [hf_tok.eos_token_id]
        np.testing.assert_array_equal(rest, expected_rest)
        # pixels: the stored image, rescaled and normalised, is exactly what the processor gives
        item_images = [ds._normalise([ds.load_image(r)])[0] for r in ds.image_rows(doc)]
        assert len(item_images) == len(images)
        for got, want, size in zip(item_images, ref.get("pixel_values", []), ref.get("image_sizes", [])):
            h, w = size.tolist()
            assert got.shape == (3, h, w) and h % layout.patch_size == 0 and w % layout.patch_size == 0
            torch.testing.assert_close(got, want[:, :h, :w], rtol=0, atol=0)
    # an image named by two records is stored once
    meta = json.loads((root / "out/a_multimodal.json").read_text())
    assert meta["kept"] == 4 and meta["skipped"] == 0 and meta["images"] == 3 and meta["image_refs"] == 4


def test_loss_mask_covers_exactly_the_response(corpus):
    root, tok, good, records = corpus
    assert run_preprocess(root, tok, [good], "out/m") == 0
    from transformers import PreTrainedTokenizerFast

    hf_tok = PreTrainedTokenizerFast.from_pretrained(tok)
    ds = mm.MultimodalDataset(str(root / "out/m"), seq_length=256)
    image_ids = list(ds.layout.token_ids)
    for doc, rec in enumerate(records):
        toks = np.asarray(ds.tokens[doc], dtype=np.int64)
        mask = np.asarray(ds.masks[doc]).astype(bool)
        assert not mask[np.isin(toks, image_ids)].any()
        if "response" in rec:
            want = hf_tok(rec["response"], add_special_tokens=False)["input_ids"] + [hf_tok.eos_token_id]
            assert toks[mask].tolist() == want
            assert mask[len(toks) - len(want) :].all() and not mask[: len(toks) - len(want)].any()
        else:  # text record: every text token but BOS
            assert (mask == ~np.isin(toks, image_ids + [hf_tok.bos_token_id])).all()
    # the training item shifts by one: loss_mask[i] says whether labels[i] is trained on
    item = ds[0]
    n = len(ds.tokens[ds.bins[0][0]]) - 1
    doc_mask = np.asarray(ds.masks[ds.bins[0][0]], dtype=np.float32)[1:]
    np.testing.assert_array_equal(item["loss_mask"][:n].numpy(), doc_mask)
    assert item["loss_mask"][n:].sum() == 0
    assert not torch.isin(item["labels"][item["loss_mask"] > 0], torch.tensor(image_ids)).any()


def test_collate_batch_contract(corpus):
    root, tok, good, records = corpus
    assert run_preprocess(root, tok, [good], "out/c") == 0
    for pack in (False, True):
        ds = mm.MultimodalDataset(str(root / "out/c"), seq_length=128, pack=pack, seed=3)
        items = [ds[i] for i in range(len(ds))]
        batch = mm.MultimodalDataset.collate(items)
        b = len(items)
        for key in ("tokens", "labels", "loss_mask", "position_ids"):
            assert batch[key].shape == (b, 128), key
        assert batch["tokens"].dtype == torch.int64 and batch["loss_mask"].dtype == torch.float32
        assert ("cu_seqlens" in batch) == pack
        # images in placeholder order, row 0 first: the [IMG] runs of the tokens match image_sizes
        sizes = batch["image_sizes"]
        assert batch["pixel_values"].dtype == torch.float32 and batch["image_sizes"].dtype == torch.int64
        n_img = int((batch["tokens"] == ds.layout.image_end_token_id).sum())
        assert n_img == 4 and batch["pixel_values"].shape[0] == sizes.shape[0] == 4
        flat = batch["tokens"].reshape(-1)
        ends = torch.nonzero(flat == ds.layout.image_end_token_id).flatten().tolist()
        start = 0
        for (h, w), end in zip(sizes.tolist(), ends):
            run = flat[start : end + 1]
            first = int(torch.nonzero(torch.isin(run, torch.tensor([10, 12, 13]))).flatten()[0])
            np.testing.assert_array_equal(run[first:].numpy(), ds.layout.image_tokens(h, w))
            start = end + 1
        H, W = batch["pixel_values"].shape[2:]
        assert H == max(h for h, _ in sizes.tolist()) and W == max(w for _, w in sizes.tolist())
        for img, (h, w) in zip(batch["pixel_values"], sizes.tolist()):
            assert img[:, h:, :].abs().sum() == 0 and img[:, :, w:].abs().sum() == 0  # zero padding
            assert img[:, :h, :w].abs().sum() > 0
    # a micro-batch of text-only samples has no images
    ds = mm.MultimodalDataset(str(root / "out/c"), seq_length=128)
    text_only = [it for it in (ds[i] for i in range(len(ds))) if it["image_sizes"].shape[0] == 0]
    assert len(text_only) == 1
    batch = mm.MultimodalDataset.collate(text_only)
    assert batch["pixel_values"].shape == (0, 3, 0, 0) and batch["image_sizes"].shape == (0, 2)


def test_bad_records_are_counted_and_strict_stops(corpus, capsys):
    root, tok, good, _ = corpus
    Path(root / "img/broken.png").write_bytes(b"not a png")
    bad = root / "bad.jsonl"
    lines = [
        '{"images": ["img/a.png"], "prompt": "<image> ok", "response": "fine"}',
        '{"images": ["img/a.png"], "prompt": "<image> broken json"',
        '{"images": ["img/missing.png"], "prompt": "<image>", "response": "x"}',
        '{"images": ["img/broken.png"], "prompt": "<image>", "response": "x"}',
        '{"images": ["img/a.png"], "prompt": "<image><image>", "response": "x"}',
        '{"images": [], "prompt": "p"}',
        '{"images": ["img/c.jpg"], "prompt": "<image>", "response": "' + "long " * 200 + '"}',
        '{"images": ["img/a.png"], "prompt": "<image>", "response": "see <image>"}',
        '["a list"]',
        "",
    ]
    bad.write_text("\n".join(lines) + "\n")
    assert run_preprocess(root, tok, [bad], "out/bad", "--seq-length", "128") == 0
    meta = json.loads((root / "out/bad_multimodal.json").read_text())
    assert meta["read"] == 9 and meta["kept"] == 1 and meta["skipped"] == 8
    assert meta["skipped_by_reason"] == {"bad_json": 1, "image_missing": 1, "image_unreadable": 1,
                                         "placeholder_mismatch": 1, "missing_key": 1, "overlong": 1,
                                         "placeholder_in_response": 1, "not_an_object": 1}
    assert any("bad.jsonl:2:" in e for e in meta["skipped_records"])
    out = capsys.readouterr().out
    assert "kept 1, skipped 8" in out
    # worker processes: the same bytes and the same report
    assert run_preprocess(root, tok, [bad, good], "out/w1", "--seq-length", "128") == 0
    assert run_preprocess(root, tok, [bad, good], "out/w2", "--seq-length", "128", "--workers", "2") == 0
    for key in fmt.KEYS:
        for ext in (".bin", ".idx"):
            one = Path(fmt.dataset_path(str(root / "out/w1"), key) + ext).read_bytes()
            assert one == Path(fmt.dataset_path(str(root / "out/w2"), key) + ext).read_bytes(), key + ext
    # the same from the command line, where the workers' module is the one run as __main__ (about 10 s)
    argv = ["--input", str(bad), str(good), "--output-prefix", str(root / "out/cli"), "--tokenizer-type",
            "HuggingFaceTokenizer", "--tokenizer-model", str(tok), "--image-size", "64", "--patch-size", "16",
            "--seq-length", "128", "--workers", "2"]
    proc = run_python(["-m", "megatron_apriel.data.preprocess_multimodal", *argv], timeout=300)
    assert proc.returncode == 0, proc.stderr
    for key in fmt.KEYS:
        one = Path(fmt.dataset_path(str(root / "out/w1"), key) + ".bin").read_bytes()
        assert one == Path(fmt.dataset_path(str(root / "out/cli"), key) + ".bin").read_bytes(), key
    w1, w2 = (json.loads((root / f"out/{n}_multimodal.json").read_text()) for n in ("w1", "w2"))
    def timeless(w):
        return {k: v for k, v in w.items() if k not in ("seconds", "outputs")}

    assert timeless(w1) == timeless(w2)
    assert w1["kept"] == 5 and w1["skipped"] == 8
    capsys.readouterr()
    # --strict: one line naming file:line, exit 2, nothing written
    assert run_preprocess(root, tok, [bad], "out/strict", "--strict", "--workers", "2") == 2
    assert "bad.jsonl:2:" in capsys.readouterr().err
    assert not list((root / "out").glob("strict*"))


LOOP = """
model: {{preset: tiny-llava, device: cpu}}
data:
  kind: dataset
  factory: multimodal
  factory_args: {{prefix: {prefix}, epochs: {epochs}, seed: 0, pack: {pack}}}
train:
  seq_length: 256
  micro_batch_size: {mbs}
  global_batch_size: 2
  train_iters: 2
  seed: 1
  freeze: [vision_encoder]
  optim: {{lr: 1.0e-3, min_lr: 1.0e-4, weight_decay: 0.0, clip_grad: 1.0, use_distributed_optimizer: true}}
  schedule: {{warmup_iters: 0, decay_style: constant}}
checkpoint: {{save: null}}
logging: {{log_interval: 1, log_dir: {logs}}}
"""


def test_samples_train_the_tiny_multimodal_model(corpus, tmp_path):
    """Preprocessed samples through the training loop's data path (factory, collate, packed rows) into tiny-llava."""
    from conftest import run_python

    from megatron_apriel.models import get_preset

    root, tok, good, _ = corpus
    vision = get_preset("tiny-llava").vision  # the multimodal model's patch and image token ids
    assert (vision.image_token_id, vision.image_break_token_id, vision.image_end_token_id) == (10, 12, 13)
    prefix = tmp_path / "mm"
    assert run_preprocess(root, tok, [good], tmp_path / "mm", "--patch-size", str(vision.patch_size),
                          "--image-size", "32") == 0
    ds = mm.MultimodalDataset(str(prefix), seq_length=256)
    batch = mm.MultimodalDataset.collate([ds[i] for i in range(len(ds))])
    assert (batch["image_sizes"] % vision.patch_size == 0).all() and batch["image_sizes"].max() <= 32
    for pack, mbs in ((False, 2), (True, 1)):
        logs = tmp_path / f"logs_{pack}"
        cfg = tmp_path / f"loop_{pack}.yaml"
        cfg.write_text(LOOP.format(prefix=prefix, pack=str(pack).lower(), epochs=8 if pack else 2, mbs=mbs, logs=logs))
        proc = run_python(["-m", "megatron_apriel.train", "--config", cfg], env={"OMP_NUM_THREADS": "1"})
        assert "step 2/2" in proc.stdout
        losses = [json.loads(line)["loss"] for line in (logs / "metrics.jsonl").read_text().splitlines()
                  if "loss" in json.loads(line)]
        assert len(losses) == 2 and all(np.isfinite(losses)) and all(0 < x < 20 for x in losses)


def write_text_prefix(path: Path, docs: int, seed: int, vocab: int = 300, eod: int = 2) -> str:
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    rng = np.random.default_rng(seed)
    builder = IndexedDatasetBuilder(str(path) + ".bin", dtype=np.uint16)
    for _ in range(docs):
        doc = np.concatenate([rng.integers(20, vocab, size=int(rng.integers(20, 200))), [eod]]).astype(np.uint16)
        builder.add_document(doc, [len(doc)])
    builder.finalize(str(path) + ".idx")
    return str(path)


def test_stage1_blend_of_text_and_image_text(corpus, tmp_path):
    """50/30/20 over text indexed datasets and image-text datasets: shares held at every point, items
    of the text part are megatron-core's, image-text items carry their images, one collate for both."""
    import yaml
    from megatron.core.datasets.blended_dataset import BlendedDataset

    root, tok, good, _ = corpus
    assert run_preprocess(root, tok, [good], tmp_path / "caption") == 0
    assert run_preprocess(root, tok, [good], tmp_path / "replay_mm") == 0
    spec = {
        "sources": [
            {"name": "text", "weight": 50, "prefixes": [write_text_prefix(tmp_path / "reasoning", 300, 0)]},
            {"name": "multimodal", "weight": 30, "prefixes": [str(tmp_path / "caption")]},
            {"name": "replay", "weight": 20,
             "prefixes": [write_text_prefix(tmp_path / "web", 300, 1), str(tmp_path / "replay_mm")]},
        ],
        "seq_length": 128, "seed": 5, "split": "100,0,0", "steps": 25, "cache_dir": str(tmp_path / "cache"),
    }
    (tmp_path / "blend.yaml").write_text(yaml.safe_dump(spec))
    ds = ImageTextBlend(str(tmp_path / "blend.yaml"), seq_length=128, global_batch_size=8, eod_token=2)
    assert len(ds) == 200
    for n in (20, 100, 200):
        shares = ds.source_shares(n)
        assert abs(shares["text"] - 0.5) <= 2 / n and abs(shares["multimodal"] - 0.3) <= 2 / n
        assert abs(shares["replay"] - 0.2) <= 2 / n
    # the text part is one megatron-core BlendedDataset of the text prefixes; its items come through as they are
    assert isinstance(ds.children[0], BlendedDataset) and len(ds.children) == 3
    kinds = {"text": 0, "image": 0}
    for i in range(40):
        item = ds[i]
        child = ds.children[int(ds.dataset_index[i])]
        if isinstance(child, mm.MultimodalDataset):
            kinds["image"] += 1
            assert torch.equal(item["tokens"], child[int(ds.dataset_sample_index[i])]["tokens"])
        else:
            kinds["text"] += 1
            ref = child[int(ds.dataset_sample_index[i])]
            assert torch.equal(item["tokens"], ref["tokens"]) and torch.equal(item["loss_mask"], ref["loss_mask"])
            assert item["image_sizes"].shape == (0, 2) and item["pixel_values"] == []
            assert item["cu_seqlens"][:2].tolist() == [0, 128]
    assert kinds["text"] and kinds["image"]
    batch = ds.collate([ds[i] for i in range(8)])
    assert batch["tokens"].shape == (8, 128) and batch["cu_seqlens"].shape[0] == 8
    assert batch["pixel_values"].shape[0] == batch["image_sizes"].shape[0] == int((batch["tokens"] == 13).sum())


def test_hostile_and_odd_images_are_counted_or_normalised(corpus, capsys):
    """A decompression bomb, a truncated file, a non-image, an unsupported mode and an image over the
    pixel budget are counted skips naming file:line; odd but valid images are kept, normalised as
    megatron_apriel.data.images documents; the other records are written intact. (about 5 s)"""
    from PIL import ImageOps
    from transformers.image_transforms import convert_to_rgb
    from wild_images import grey16, scene, wild_folder

    root, tok, _, _ = corpus
    files = wild_folder(root / "wild")
    scene((300, 200), 7).save(root / "wild/big.png")  # 60000 pixels: over the budget below, not a JPEG
    scene((400, 300), 8).save(root / "wild/big.jpg", quality=95)  # 120000: over it, decodable at 1/4 scale
    Image.new("RGB", (200, 3), "blue").save(root / "wild/spacer.gif")  # 3 px high: 0 px at --image-size 64
    names = ["bomb.png", "truncated.png", "not_an_image.jpg", "float.tif", "big.png", "rotated.png", "grey16.png",
             "animated.gif", "alpha.png", "cmyk.jpg", "big.jpg", "spacer.gif"]
    lines = [json.dumps({"images": ["img/a.png"], "prompt": "<image> first", "response": "ok"})]
    lines += [json.dumps({"images": [f"wild/{n}"], "prompt": "<image> What is it?", "response": n}) for n in names]
    lines += [json.dumps({"images": ["img/b.png", "wild/rotated.png"], "text": "<image> and <image>"})]
    (root / "wild.jsonl").write_text("\n".join(lines) + "\n")
    assert run_preprocess(root, tok, [root / "wild.jsonl"], "out/wild", "--max-image-pixels", "50000") == 0
    meta = json.loads((root / "out/wild_multimodal.json").read_text())
    assert meta["read"] == 14 and meta["kept"] == 8 and meta["skipped"] == 6
    assert meta["skipped_by_reason"] == {"image_too_large": 2, "image_truncated": 1, "image_unreadable": 1,
                                         "image_mode_unsupported": 1, "image_too_thin": 1}
    assert any(e.startswith(f"{root / 'wild.jsonl'}:2: image") and "bomb.png" in e for e in meta["skipped_records"])
    assert any("wild.jsonl:6:" in e and "big.png" in e and "budget 50000" in e for e in meta["skipped_records"])
    assert meta["images_normalised"] == {"exif_orientation": 1, "mode_I;16": 1, "first_frame": 1, "mode_P": 1,
                                         "mode_RGBA": 1, "mode_CMYK": 1, "jpeg_draft": 1}
    assert "kept 8, skipped 6" in capsys.readouterr().out

    # the stored pixels are the processor's resize of the documented normalisation, exactly
    ds = mm.MultimodalDataset(str(root / "out/wild"), seq_length=512)
    proc = ds.layout.processor()

    def stored(doc, k=0):
        return ds.load_image(ds.image_rows(doc)[k])

    def resized(im):
        return np.asarray(proc(im, do_rescale=False, do_normalize=False, do_pad=False)["pixel_values"][0],
                          dtype=np.uint8).transpose(1, 2, 0)

    w = root / "wild"
    with Image.open(files["rotated.png"]) as im:
        upright = ImageOps.exif_transpose(im)
    assert upright.size == (40, 64)
    np.testing.assert_array_equal(stored(1), resized(upright))  # docs: 0 a.png, then the kept wild ones in order
    _, raw16 = grey16(root / "g16_again.png")
    want16 = ((raw16.astype(np.int64) * 255 + 32767) // 65535).astype(np.uint8)
    np.testing.assert_array_equal(stored(2), resized(Image.fromarray(want16).convert("RGB")))
    assert stored(2).max() > 200  # not clipped to white as Image.convert would
    with Image.open(files["animated.gif"]) as im:
        assert im.n_frames == 3
        first = convert_to_rgb(im.convert("RGBA"))  # frame 0, transparency over white
    np.testing.assert_array_equal(stored(3), resized(first))
    with Image.open(files["alpha.png"]) as im:
        np.testing.assert_array_equal(stored(4), resized(convert_to_rgb(im)))
    with Image.open(files["cmyk.jpg"]) as im:
        np.testing.assert_array_equal(stored(5), resized(im.convert("RGB")))
    with Image.open(w / "big.jpg") as im:
        im.draft("RGB", (100, 75))
        assert im.size == (100, 75)
        np.testing.assert_array_equal(stored(6), resized(im.convert("RGB")))
    # the interleaved record: its unrotated neighbour intact, the rotated file stored once
    assert meta["images"] == 8 and ds.image_rows(7) == [7, 1]  # rows in first-use order: b.png is the 8th file

    # --strict: stops at the bomb, one line naming file:line, exit 2, nothing written
    assert run_preprocess(root, tok, [root / "wild.jsonl"], "out/wstrict", "--strict") == 2
    err = capsys.readouterr().err
    assert "wild.jsonl:2:" in err and "bomb.png" in err and len(err.strip().splitlines()) == 1
    assert not list((root / "out").glob("wstrict*"))


def test_control_token_text_is_kept_as_text(corpus):
    """Prompt, response and caption text that spell the tokenizer's control tokens ([IMG], </s>, <s>):
    the records are kept and counted, that text encodes as ordinary text (as transformers encodes it
    with split_special_tokens), and only the layout writes BOS, image tokens and the end token."""
    from transformers import PreTrainedTokenizerFast

    root, tok, _, _ = corpus
    spelled = "[IMG] [IMG_BREAK] [IMG_END] </s> <s>"
    records = [
        {"images": ["img/a.png"], "prompt": f"Look <image> {spelled}", "response": f"It is {spelled}"},
        {"images": ["img/a.png"], "text": f"<image>A caption {spelled}"},
        {"images": ["img/a.png"], "prompt": "Look <image> here", "response": "It is"},
    ]
    path = root / "control.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert run_preprocess(root, tok, [path], "out/control") == 0
    meta = json.loads((root / "out/control_multimodal.json").read_text())
    assert (meta["kept"], meta["skipped"], meta["with_control_token_text"],
            meta["control_token_strings"]) == (3, 0, 2, 15)
    hf_tok = PreTrainedTokenizerFast.from_pretrained(tok)
    ds = mm.MultimodalDataset(str(root / "out/control"), seq_length=256)
    image_ids = list(ds.layout.token_ids)
    control = image_ids + [hf_tok.bos_token_id, hf_tok.eos_token_id]
    plain = np.asarray(ds.tokens[2], dtype=np.int64)
    for doc, rec in enumerate(records[:2]):
        toks = np.asarray(ds.tokens[doc], dtype=np.int64)
        mask = np.asarray(ds.masks[doc]).astype(bool)
        # the control tokens are exactly the layout's: BOS, the image's tokens, the end token
        assert toks[np.isin(toks, control)].tolist() == plain[np.isin(plain, control)].tolist()
        text = toks[~np.isin(toks, control)].tolist()
        if "response" in rec:
            want = hf_tok(rec["response"], add_special_tokens=False, split_special_tokens=True)["input_ids"]
            assert toks[mask].tolist() == want + [hf_tok.eos_token_id]
            assert hf_tok.decode(text) == rec["prompt"].replace("<image>", "") + rec["response"]
        else:
            assert hf_tok.decode(text) == rec["text"].replace("<image>", "")
            assert (mask == ~np.isin(toks, image_ids + [hf_tok.bos_token_id])).all()
