"""The blend spec on megatron-core: realised shares, order, resume, cache reuse and bad specs.

The data are small indexed datasets written with megatron-core's IndexedDatasetBuilder; every
prefix k uses token ids in [100k+1, 100k+99], so the realised shares are read from the tokens the
dataset returns, not from the blending index under test.
"""

from __future__ import annotations

import os

import numpy
import pytest
import torch
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

from megatron_apriel.config import ConfigError, from_dict
from megatron_apriel.data.blends import (
    BlendSpec,
    blend_weights,
    build_datasets,
    resolve_stage,
    stage_checkpoint,
    train_samples_for,
)
from megatron_apriel.training import mix_report

SEQ = 32


def write_prefix(prefix: str, k: int, ndocs: int, mean_len: int, seed: int) -> int:
    rng = numpy.random.default_rng(seed)
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=numpy.int32)
    total = 0
    for _ in range(ndocs):
        n = int(rng.integers(1, 2 * mean_len))
        builder.add_item(torch.from_numpy(rng.integers(100 * k + 1, 100 * k + 100, n)))
        builder.end_document()
        total += n
    builder.finalize(prefix + ".idx")
    return total


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Five prefixes in three sources of different sizes (tokens per prefix returned)."""
    root = tmp_path_factory.mktemp("corpus")
    sizes = {}
    for k, (name, ndocs) in enumerate([("r0", 300), ("r1", 100), ("c0", 200), ("x0", 150), ("x1", 150)]):
        sizes[name] = write_prefix(str(root / name), k, ndocs, 60, seed=k)
    return root, sizes


def spec_dict(root, **changes):
    d = {
        "sources": [
            {"name": "reasoning", "prefixes": [str(root / "r0"), str(root / "r1")], "weight": 60},
            {"name": "cot", "prefixes": [str(root / "c0")], "weight": 25},
            {"name": "replay", "prefixes": [str(root / "x0"), str(root / "x1")], "weight": 15,
             "prefix_weights": [3, 1]},
        ],
        "seq_length": SEQ,
        "tokens": SEQ * 20000,
        "seed": 1234,
        "split": "98,2,0",
    }
    d.update(changes)
    return d


def prefix_of_samples(ds, start, stop):
    tokens = torch.stack([ds[i]["tokens"] for i in range(start, stop)])
    return (tokens // 100).flatten().numpy()


def test_realised_shares_match_targets(corpus, tmp_path):
    root, sizes = corpus
    spec = from_dict(BlendSpec, spec_dict(root, cache_dir=str(tmp_path / "cache")))
    train, valid = build_datasets(spec, global_batch_size=16, valid_samples=64)
    n = train_samples_for(spec, 16)
    assert n == 20000 and len(train) >= n and len(valid) >= 64

    r0_share = 0.6 * sizes["r0"] / (sizes["r0"] + sizes["r1"])  # inside a source: by tokens
    target_prefix = numpy.array([r0_share, 0.6 - r0_share, 0.25, 0.15 * 0.75, 0.15 * 0.25])
    assert numpy.allclose([i.weight for i in blend_weights(spec)], target_prefix)
    target_source = numpy.array([0.6, 0.25, 0.15])

    def source_shares(prefix_ids):
        counts = numpy.bincount(prefix_ids, minlength=5) / len(prefix_ids)
        return counts, numpy.array([counts[0] + counts[1], counts[2], counts[3] + counts[4]])

    p_first, s_first = source_shares(prefix_of_samples(train, 0, 1000))
    assert numpy.abs(s_first - target_source).max() < 0.005
    assert numpy.abs(p_first - target_prefix).max() < 0.005

    # the whole stage, read from the blending index (the tokens agree with it on the first 1000)
    index = numpy.asarray(train.dataset_index[:n])
    assert (numpy.repeat(index[:1000], SEQ) == prefix_of_samples(train, 0, 1000)).all()
    p_all, s_all = source_shares(index)
    assert numpy.abs(s_all - target_source).max() < 0.001
    assert numpy.abs(p_all - target_prefix).max() < 0.001

    item = train[5]
    assert set(item) >= {"tokens", "labels", "loss_mask", "position_ids"}
    assert item["tokens"].shape == (SEQ,) and torch.equal(item["tokens"][1:], item["labels"][:-1])
    assert set(valid[0]) >= {"tokens", "labels"} and valid[0]["tokens"].shape == (SEQ,)


def test_same_seed_same_order_and_resume(corpus, tmp_path):
    root, _ = corpus
    spec = from_dict(BlendSpec, spec_dict(root, tokens=SEQ * 3000, cache_dir=str(tmp_path / "a")))
    first, _ = build_datasets(spec, 8)
    order = torch.stack([first[i]["tokens"] for i in range(400)])

    # a fresh build in an empty cache: the order is a function of the spec and data only
    again, _ = build_datasets(from_dict(BlendSpec, spec_dict(root, tokens=SEQ * 3000, cache_dir=str(tmp_path / "b"))),
                              8)
    assert torch.equal(order, torch.stack([again[i]["tokens"] for i in range(400)]))

    # resume: consume k samples, rebuild from the cache, skip k: the remaining order is unchanged
    k = 137
    consumed = [first[i]["tokens"] for i in range(k)]
    del first
    resumed, _ = build_datasets(spec, 8)
    rest = torch.stack([resumed[i]["tokens"] for i in range(k, 400)])
    assert torch.equal(torch.stack(consumed), order[:k])
    assert torch.equal(rest, order[k:])

    other, _ = build_datasets(from_dict(BlendSpec, spec_dict(root, tokens=SEQ * 3000, seed=99)), 8)
    assert not torch.equal(order, torch.stack([other[i]["tokens"] for i in range(400)]))


def index_files(folder):
    out = {}
    for dirpath, _, names in os.walk(folder):
        for n in names:
            p = os.path.join(dirpath, n)
            out[os.path.relpath(p, folder)] = os.stat(p).st_mtime_ns
    return out


def test_cache_reused_and_rebuilt(corpus, tmp_path):
    root, _ = corpus
    data = tmp_path / "data"
    data.mkdir()
    for k, name in enumerate(["a", "b"]):
        write_prefix(str(data / name), k, 80, 50, seed=k)
    d = {
        "sources": [{"name": "a", "prefixes": [str(data / "a")], "weight": 2},
                    {"name": "b", "prefixes": [str(data / "b")], "weight": 1}],
        "seq_length": SEQ, "steps": 50, "cache_dir": str(tmp_path / "cache"),
    }
    ds, _ = build_datasets(from_dict(BlendSpec, d), 4)
    before = index_files(tmp_path / "cache")
    assert any(n.endswith("BlendedDataset-train-dataset_index.npy") for n in before)

    ds2, _ = build_datasets(from_dict(BlendSpec, d), 4)  # nothing changed: same files, untouched
    assert index_files(tmp_path / "cache") == before
    assert torch.equal(ds[3]["tokens"], ds2[3]["tokens"])

    build_datasets(from_dict(BlendSpec, dict(d, seed=7)), 4)  # spec changed: new indices
    after_seed = index_files(tmp_path / "cache")
    assert set(before) < set(after_seed)

    write_prefix(str(data / "a"), 5, 90, 50, seed=11)  # data rewritten under the same prefix
    ds3, _ = build_datasets(from_dict(BlendSpec, d), 4)
    assert len(index_files(tmp_path / "cache")) > len(after_seed)
    ids = numpy.concatenate([ds3[i]["tokens"].numpy() // 100 for i in range(len(ds3))])
    assert 5 in ids and 0 not in ids  # samples come from the new data, not stale indices


def test_stages(corpus):
    root, _ = corpus
    d = spec_dict(root, stages=[
        {"name": "s1", "tokens": SEQ * 1000, "load": "ckpt/upscaled"},
        {"name": "s2", "weights": {"reasoning": 1, "cot": 1}, "steps": 10, "load": "ckpt/s1-avg", "seed": 5},
    ], stage="s2")
    spec = from_dict(BlendSpec, d)
    s2 = resolve_stage(spec)
    assert [s.weight for s in s2.sources] == [1, 1, 15] and s2.seed == 5
    assert train_samples_for(spec, 8) == 80 and stage_checkpoint(spec) == "ckpt/s1-avg"
    s1 = resolve_stage(spec, "s1")
    assert train_samples_for(s1, 8) == 1000
    w = [i.weight for i in blend_weights(spec)]
    assert numpy.isclose(w[2], 1 / 17) and numpy.isclose(sum(w), 1.0)


@pytest.mark.parametrize(
    "change, key",
    [
        (lambda d: d["sources"][1].update(weight=0), "data.blend.sources[1].weight"),
        (lambda d: d["sources"][1].update(weight=-2), "data.blend.sources[1].weight"),
        (lambda d: d["sources"][2].pop("weight"), "data.blend.sources[2].weight"),
        (lambda d: d["sources"][0].update(prefixes=[]), "data.blend.sources[0].prefixes"),
        (lambda d: d["sources"][2].update(prefix_weights=[1]), "data.blend.sources[2].prefix_weights"),
        (lambda d: d["sources"][2].update(prefix_weights=[1, 0]), "data.blend.sources[2].prefix_weights[1]"),
        (lambda d: d["sources"][1].update(name="reasoning"), "data.blend.sources[1].name"),
        (lambda d: d["sources"][1].update(prefixes=[d["sources"][0]["prefixes"][0]]),
         "data.blend.sources[1].prefixes[0]"),
        (lambda d: d.update(steps=10), "data.blend.tokens / data.blend.steps"),
        (lambda d: d.update(split="1,2,x"), "data.blend.split"),
        (lambda d: d.update(seq_length=0), "data.blend.seq_length"),
        (lambda d: d.update(stages=[{"name": "s", "weights": {"code": 1}}]), "data.blend.stages[0].weights.code"),
        (lambda d: d.update(stage="nope"), "data.blend.stage"),
        (lambda d: d.update(seqlen=4), "seqlen"),
    ],
)
def test_invalid_spec_names_the_key(corpus, change, key):
    root, _ = corpus
    d = spec_dict(root)
    change(d)
    with pytest.raises(ConfigError) as e:
        from_dict(BlendSpec, d, "data.blend")
    assert key in str(e.value)
    with pytest.raises(ConfigError) as e:  # a blend file of its own: keys from its top level
        from_dict(BlendSpec, d)
    assert key.replace("data.blend.", "") in str(e.value) and "data.blend" not in str(e.value)


def test_bad_data_names_the_key(corpus, tmp_path):
    root, _ = corpus
    d = spec_dict(root)
    d["sources"][0]["prefixes"][1] = str(tmp_path / "missing")
    with pytest.raises(ConfigError, match=r"data.blend.sources\[0\].prefixes\[1\]: missing file .*missing.bin"):
        build_datasets(from_dict(BlendSpec, d), 8)

    empty = str(tmp_path / "empty")
    IndexedDatasetBuilder(empty + ".bin", dtype=numpy.int32).finalize(empty + ".idx")
    d = spec_dict(root)
    d["sources"][1]["prefixes"] = [empty]
    with pytest.raises(ConfigError, match=r"data.blend.sources\[1\]: source 'cot' has no tokens"):
        build_datasets(from_dict(BlendSpec, d), 8)


def test_mix_report_cli(corpus, tmp_path, capsys):
    import yaml
    from PIL import Image

    root, sizes = corpus
    d = spec_dict(root, cache_dir=str(tmp_path / "cache"), repeat_warning=3.0)
    d.pop("seq_length")  # filled from train.seq_length, as the training loop does
    config = {"model": {"preset": "tiny"}, "data": {"kind": "blend", "blend": d},
              "train": {"seq_length": SEQ, "global_batch_size": 16}}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(config))
    png, js = tmp_path / "mix.png", tmp_path / "mix.json"
    rc = mix_report.main([str(tmp_path / "spec.yaml"), "--png", str(png), "--json", str(js)])
    out = capsys.readouterr().out
    assert rc == 0
    assert Image.open(png).size[0] > 100
    import json

    rep = json.loads(js.read_text())
    rows = {r["source"]: r for r in rep["sources"]}
    assert abs(rows["reasoning"]["share_stage"] - 0.6) < 0.001
    available = rows["cot"]["tokens_available"]
    assert 0.9 * sizes["c0"] < available < sizes["c0"]  # the 98% train split of the documents
    assert rows["cot"]["epochs"] == pytest.approx(rows["cot"]["tokens_drawn"] / available)
    # 0.25 * 640k tokens from ~12k available: far more than 3 epochs
    assert "WARNING: source 'cot' is seen" in out

    rc = mix_report.main([str(tmp_path / "spec.yaml"), "data.blend.seq_length=0"])
    err = capsys.readouterr().err
    assert rc == 2 and "spec.yaml: data.blend.seq_length: must be positive" in err

    # a blend file of its own: keys are named from its top level
    bare = spec_dict(root)
    bare["sources"][2]["weight"] = 0
    (tmp_path / "blend.yaml").write_text(yaml.safe_dump(bare))
    assert mix_report.main([str(tmp_path / "blend.yaml")]) == 2
    assert "blend.yaml: sources[2].weight: a weight must be a positive number" in capsys.readouterr().err
