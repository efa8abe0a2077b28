"""``apriel mix-report`` on a blend of text indexed datasets and image-text prefixes (CPT stage 1):
the report's numbers against what ``ImageTextBlend`` itself draws, sample by sample."""

from __future__ import annotations

import json
import os

import pytest
import yaml
from PIL import Image
from test_multimodal_data import corpus, run_preprocess, write_text_prefix  # noqa: F401  (corpus: fixture)

from megatron_apriel.data import multimodal as mm
from megatron_apriel.data import multimodal_format as fmt
from megatron_apriel.data.image_text_blend import ImageTextBlend
from megatron_apriel.training import mix_report

SEQ, GBS, STEPS, FIRST = 128, 8, 250, 300


@pytest.fixture(scope="module")
def data(corpus, tmp_path_factory):  # noqa: F811
    root, tok, good, records = corpus
    out = tmp_path_factory.mktemp("mixmm")
    many = out / "many.jsonl"  # image paths are relative to the JSONL file's folder
    many.write_text("".join(json.dumps(r) + "\n" for r in records * 10))
    (out / "img").symlink_to(root / "img")
    assert run_preprocess(root, tok, [many], out / "caption") == 0
    assert run_preprocess(root, tok, [good], out / "replay_mm") == 0
    return {"out": out, "caption": str(out / "caption"), "replay_mm": str(out / "replay_mm"),
            "reasoning": write_text_prefix(out / "reasoning", 300, 0), "web": write_text_prefix(out / "web", 300, 1)}


def write_spec(path, sources, cache):
    spec = {"sources": sources, "seq_length": SEQ, "seed": 5, "split": "98,2,0", "steps": STEPS,
            "cache_dir": str(cache)}
    path.write_text(yaml.safe_dump(spec))
    return str(path)


def drawn_by_blend(ds: ImageTextBlend, n: int) -> dict:
    """Samples per prefix among the first n, read from the items megatron-core's text blend returns
    (their dataset_id names the GPTDataset) and from the image-text children's positions."""
    counts: dict = {}
    text = ds.children[0]
    for c, j in zip(ds.dataset_index[:n], ds.dataset_sample_index[:n]):
        child = ds.children[int(c)]
        if isinstance(child, mm.MultimodalDataset):
            prefix = child.prefix
        elif hasattr(text, "datasets"):
            prefix = text.datasets[int(text[int(j)]["dataset_id"])].dataset_path
        else:
            prefix = text.dataset_path
        counts[prefix] = counts.get(prefix, 0) + 1
    return counts


def test_mix_report_of_text_and_image_text_blend(data, tmp_path, capsys):
    d = data
    spec = write_spec(tmp_path / "stage1.yaml", [
        {"name": "text", "weight": 50, "prefixes": [d["reasoning"]]},
        {"name": "multimodal", "weight": 30, "prefixes": [d["caption"]]},
        {"name": "replay", "weight": 20, "prefixes": [d["web"], d["replay_mm"]]},
    ], tmp_path / "cache")
    png, js = tmp_path / "mix.png", tmp_path / "mix.json"
    rc = mix_report.main([spec, "--global-batch-size", str(GBS), "--first", str(FIRST), "--json", str(js),
                          "--png", str(png)])
    out = capsys.readouterr().out
    assert rc == 0
    assert Image.open(png).size[0] > 100
    rep = json.loads(js.read_text())
    assert rep["train_samples"] == STEPS * GBS and rep["first"] == FIRST
    sources = {r["source"]: r for r in rep["sources"]}
    for name, target in (("text", 0.5), ("multimodal", 0.3), ("replay", 0.2)):
        assert sources[name]["target"] == pytest.approx(target)
        assert abs(sources[name]["share_stage"] - target) <= 0.005, (name, sources[name])
    prefixes = {r["prefix"]: r for r in rep["prefixes"]}
    assert set(prefixes) == {d["reasoning"], d["caption"], d["web"], d["replay_mm"]}
    for name, row in sources.items():
        rows = [r for r in rep["prefixes"] if r["source"] == name]
        assert sum(r["share_stage"] for r in rows) == pytest.approx(row["share_stage"])
        assert sum(r["share_first"] for r in rows) == pytest.approx(row["share_first"])
        assert sum(r["tokens_drawn"] for r in rows) == row["tokens_drawn"]
    assert sum(r["share_stage"] for r in rep["sources"]) == pytest.approx(1.0)

    # the counts are the draws of the blend training builds from this spec
    ds = ImageTextBlend(spec, seq_length=SEQ, global_batch_size=GBS)
    for n, key in ((STEPS * GBS, "share_stage"), (FIRST, "share_first")):
        expected = drawn_by_blend(ds, n)
        assert {p: round(r[key] * n) for p, r in prefixes.items()} == expected
    stage = drawn_by_blend(ds, STEPS * GBS)
    for p, row in prefixes.items():
        assert row["tokens_drawn"] == stage[p] * SEQ
        assert row["epochs"] == pytest.approx(row["tokens_drawn"] / row["tokens_available"])

    # available: every image-text sample (all fit in SEQ), the 98% train split of the text documents
    for p in (d["caption"], d["replay_mm"]):
        meta = json.loads(open(fmt.meta_path(p)).read())
        assert prefixes[p]["tokens_available"] == meta["tokens"] > 0
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    web = IndexedDataset(d["web"])  # held: its lengths are a view of the mmap it closes when collected
    total = int(web.sequence_lengths.sum())
    assert 0.9 * total < prefixes[d["web"]]["tokens_available"] < total
    # 30% of 256k tokens from ~40 small samples
    assert "WARNING: source 'multimodal' is seen" in out and d["caption"][-37:] in out


def test_single_text_prefix(data, tmp_path, capsys):
    """One text prefix (the text child blends a single GPTDataset) beside two image-text prefixes of one source."""
    d = data
    spec = write_spec(tmp_path / "two.yaml", [
        {"name": "text", "weight": 70, "prefixes": [d["reasoning"]]},
        {"name": "multimodal", "weight": 30, "prefixes": [d["caption"], d["replay_mm"]]},
    ], tmp_path / "cache")
    js = tmp_path / "mix.json"
    assert mix_report.main([spec, "--global-batch-size", str(GBS), "--json", str(js),
                            "--png", str(tmp_path / "m.png")]) == 0
    rep = json.loads(js.read_text())
    ds = ImageTextBlend(spec, seq_length=SEQ, global_batch_size=GBS)
    assert len(getattr(ds.children[0], "datasets", [ds.children[0]])) == 1
    stage = drawn_by_blend(ds, STEPS * GBS)
    assert {r["prefix"]: r["tokens_drawn"] // SEQ for r in rep["prefixes"]} == stage
    sources = {r["source"]: r["share_stage"] for r in rep["sources"]}
    assert abs(sources["text"] - 0.7) <= 0.005 and abs(sources["multimodal"] - 0.3) <= 0.005
    assert ds.source_shares() == pytest.approx(sources)

    # the training config of the stage (data from the factory ImageTextBlend) reports the same numbers
    config = {"data": {"kind": "dataset", "factory": "image-text-blend",
                       "factory_args": {"blend": spec, "global_batch_size": GBS, "pack": True}},
              "train": {"seq_length": SEQ, "global_batch_size": 2 * GBS, "train_iters": 7}}
    (tmp_path / "cpt1.yaml").write_text(yaml.safe_dump(config))
    js2 = tmp_path / "mix2.json"
    assert mix_report.main([str(tmp_path / "cpt1.yaml"), "--json", str(js2), "--png", str(tmp_path / "m2.png")]) == 0
    assert json.loads(js2.read_text()) == rep
    assert mix_report.main([str(tmp_path / "cpt1.yaml"), "train.seq_length=64"]) == 2
    assert capsys.readouterr().err.strip().endswith(
        f"{spec}: seq_length: {SEQ} != train.seq_length 64 of {tmp_path / 'cpt1.yaml'}")


def test_missing_image_text_prefix_is_named(data, corpus, tmp_path, capsys):  # noqa: F811
    d = data
    root, tok, good, _ = corpus
    png, js = tmp_path / "mix.png", tmp_path / "mix.json"
    spec = write_spec(tmp_path / "gone.yaml", [
        {"name": "text", "weight": 50, "prefixes": [d["reasoning"]]},
        {"name": "multimodal", "weight": 50, "prefixes": [d["caption"], str(tmp_path / "nope")]},
    ], tmp_path / "cache")
    assert mix_report.main([spec, "--json", str(js), "--png", str(png)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress line
    assert err.startswith(f"error: {spec}: sources[1].prefixes[1]: ") and "nope_multimodal.json" in err

    # the settings file is there, its tokens dataset is not
    assert run_preprocess(root, tok, [good], tmp_path / "broken") == 0
    os.remove(fmt.dataset_path(str(tmp_path / "broken"), fmt.TOKENS_KEY) + ".bin")
    spec = write_spec(tmp_path / "broken.yaml", [
        {"name": "text", "weight": 50, "prefixes": [d["reasoning"]]},
        {"name": "multimodal", "weight": 50, "prefixes": [d["caption"], str(tmp_path / "broken")]},
    ], tmp_path / "cache")
    assert mix_report.main([spec, "--json", str(js), "--png", str(png)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"error: {spec}: sources[1].prefixes[1]: ")
    assert "broken_tokens_document.bin/.idx: missing" in err
    assert not png.exists() and not js.exists()
