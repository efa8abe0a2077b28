"""How a training config names its data: registered dataset names, ``module:callable`` for a user's
own dataset, a clear error for an unknown name, and one blend resolver that training, the mix
report and the image-text blend all read a config's blend through (~6 s on 2 CPU cores)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import yaml
from test_multimodal_data import write_text_prefix

from megatron_apriel.config import ConfigError, load_config
from megatron_apriel.data.blends import resolve_stage
from megatron_apriel.data.image_text_blend import ImageTextBlend
from megatron_apriel.data.multimodal import MultimodalDataset
from megatron_apriel.data.registry import DATASETS, resolve_dataset
from megatron_apriel.data.sft import SFTDataset
from megatron_apriel.data.synthetic import SyntheticDataset, SyntheticImageTextDataset
from megatron_apriel.training import mix_report
from megatron_apriel.training.config import TrainConfig, blend_spec_of
from megatron_apriel.training.loop import build_datasets_from_config, main

REPO = Path(__file__).resolve().parents[1]


def test_registered_names_resolve_to_the_datasets():
    expected = {"synthetic": SyntheticDataset, "synthetic-image-text": SyntheticImageTextDataset, "sft": SFTDataset,
                "multimodal": MultimodalDataset, "image-text-blend": ImageTextBlend}
    assert {name: resolve_dataset(name) for name in DATASETS} == expected
    # the spellings of older configs still name the same classes
    assert resolve_dataset("megatron_apriel.training.loop:SyntheticDataset") is SyntheticDataset
    assert resolve_dataset("megatron_apriel.data.multimodal:ImageTextBlend") is ImageTextBlend


def test_example_config_by_name_builds_the_same_data_as_by_import_path():
    cfg = load_config(TrainConfig, REPO / "examples/tiny/cpt.yaml")
    assert cfg.data.factory == "synthetic"
    by_name, valid = build_datasets_from_config(cfg, 8, 8)
    by_path = load_config(TrainConfig, REPO / "examples/tiny/cpt.yaml",
                          ["data.factory=megatron_apriel.data.synthetic:SyntheticDataset"])
    other, _ = build_datasets_from_config(by_path, 8, 8)
    assert isinstance(by_name, SyntheticDataset) and isinstance(valid, SyntheticDataset)
    for i in (0, 5, 2047):
        for key in ("tokens", "labels", "loss_mask", "position_ids"):
            assert torch.equal(by_name[i][key], other[i][key])
    assert not torch.equal(by_name[0]["tokens"], valid[0]["tokens"])  # valid_factory_args: another seed


def test_users_own_dataset_by_module_callable(tmp_path, monkeypatch):
    (tmp_path / "my_data.py").write_text(
        "def make(seq_length, n):\n    return [{'n': n, 'seq_length': seq_length}] * n\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "my_data", raising=False)
    cfg = load_config(TrainConfig, REPO / "examples/tiny/cpt.yaml",
                      ["data.factory=my_data:make", "data.factory_args={n: 3}", "data.valid_factory_args={}"])
    train, valid = build_datasets_from_config(cfg, 3, 0)
    assert train == [{"n": 3, "seq_length": 64}] * 3 and valid is None
    bad = load_config(TrainConfig, REPO / "examples/tiny/cpt.yaml", ["data.factory=my_data:nope"])
    with pytest.raises(ConfigError, match=r"^data.factory: cannot import 'my_data:nope'"):
        build_datasets_from_config(bad, 3, 0)


def test_unknown_dataset_name_is_a_config_error(capsys):
    with pytest.raises(ConfigError) as e:
        load_config(TrainConfig, REPO / "examples/tiny/cpt.yaml", ["data.factory=synthtic"])
    msg = str(e.value)
    assert msg.startswith(f"{REPO / 'examples/tiny/cpt.yaml'}: data.factory: unknown dataset 'synthtic'")
    assert all(name in msg for name in DATASETS) and "module:callable" in msg
    # the CLI: exit code 2 and the message, before any distributed start-up
    assert main(["--config", str(REPO / "examples/tiny/cpt.yaml"), "data.factory=synthtic"]) == 2
    assert "cpt.yaml: data.factory: unknown dataset 'synthtic'" in capsys.readouterr().err


def test_one_blend_resolver(tmp_path):
    """A blend YAML named by a training config (data.kind blend) and by the image-text blend's factory
    args: training, the mix report and ImageTextBlend read the same spec from it."""
    a = write_text_prefix(tmp_path / "a_text_document", 40, seed=1)
    b = write_text_prefix(tmp_path / "b_text_document", 40, seed=2)
    blend = {"sources": [{"name": "a", "prefixes": [a], "weight": 0.7}, {"name": "b", "prefixes": [b], "weight": 0.3}],
             "seed": 3, "split": "100,0,0", "steps": 5, "cache_dir": str(tmp_path / "cache"),
             "stages": [{"name": "two", "weights": {"a": 0.4}}], "stage": "two"}
    (tmp_path / "blend.yaml").write_text(yaml.safe_dump(blend))
    base = {"model": {"preset": "tiny", "changes": {"vocab_size": 500}, "device": "cpu"},
            "train": {"seq_length": 32, "micro_batch_size": 2, "global_batch_size": 4, "train_iters": 6}}
    as_blend = dict(base, data={"kind": "blend", "blend": str(tmp_path / "blend.yaml")})
    as_image_text = dict(base, data={"kind": "dataset", "factory": "image-text-blend",
                                     "factory_args": {"blend": str(tmp_path / "blend.yaml"), "global_batch_size": 4}})
    for name, cfg in (("blend", as_blend), ("image_text", as_image_text)):
        (tmp_path / f"cfg_{name}.yaml").write_text(yaml.safe_dump(cfg))

    training = blend_spec_of(load_config(TrainConfig, tmp_path / "cfg_blend.yaml"))
    report, gbs, key = mix_report.load_spec(str(tmp_path / "cfg_blend.yaml"))
    assert training == report and gbs == 4 and key == "data.blend"
    assert training.seq_length == 32 and training.steps == 5  # seq_length from the train section
    assert training.sources[0].prefixes == [a] and training.stage == "two"

    report_it, gbs_it, _ = mix_report.load_spec(str(tmp_path / "cfg_image_text.yaml"))
    itb = ImageTextBlend(str(tmp_path / "blend.yaml"), seq_length=32, global_batch_size=4)
    assert gbs_it == 4 and report_it == training
    assert itb.spec == resolve_stage(report_it)
    assert itb.spec.sources[0].weight == 0.4  # the stage's weights
    assert itb.prefix_weights == pytest.approx([0.4 / 0.7, 0.3 / 0.7], abs=1e-12)

    # and all three refuse a blend whose sequence length is not the training's
    blend["seq_length"] = 16
    (tmp_path / "blend.yaml").write_text(yaml.safe_dump(blend))
    with pytest.raises(ConfigError, match=r"^data.blend.seq_length 16 != train.seq_length 32$"):
        blend_spec_of(load_config(TrainConfig, tmp_path / "cfg_blend.yaml"))
    with pytest.raises(ConfigError, match=r"^data.factory_args.blend.seq_length 16 != train.seq_length 32$"):
        ImageTextBlend(str(tmp_path / "blend.yaml"), seq_length=32, global_batch_size=4)
    with pytest.raises(ConfigError, match=r"seq_length 16 != train.seq_length 32"):
        mix_report.load_spec(str(tmp_path / "cfg_blend.yaml"))
