"""``apriel train --dry-run``: every example config built at its real layout on the meta device.

The builds run in one subprocess (torch's fake process group and megatron-core's parallel state are
process-global). Per-rank parameter counts are compared with the shard arithmetic of the preset's
own counts, which are themselves checked against transformers in test_presets.py. Runtime: ~40 s on
a loaded 2-core machine (most of it 16 meta-device builds of 15B models), ~5 s for the rest.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import REPO

from megatron_apriel.config import ConfigError, load_config
from megatron_apriel.models import get_preset
from megatron_apriel.training.config import TrainConfig

TRAIN_CONFIGS = sorted(p.relative_to(REPO).as_posix() for p in REPO.glob("examples/*/*.yaml")
                       if "\ntrain:" in p.read_text())

SCRIPT = r"""
import json, sys
from megatron_apriel.config import load_config
from megatron_apriel.training.config import TrainConfig
from megatron_apriel.training.dry_run import dry_run
for path, nodes, overrides in json.loads(sys.argv[1]):
    r = dry_run(load_config(TrainConfig, path, overrides), nodes, None, files=False, out=lambda line: None)
    print(json.dumps({"path": path, "nodes": nodes, "dp": r["layout"].dp, "rows": r["rows"]}), flush=True)
"""


@pytest.fixture(scope="module")
def dry_runs():
    """Every example training config at its own layout (fewest nodes), the two 15B CPTs on 4 nodes of 8,
    and a TP=2 x PP=2 x VPP=2 variant of the tiny model on 8 ranks."""
    jobs = [[p, None, []] for p in TRAIN_CONFIGS]
    jobs += [["examples/apriel_nemotron_15b/cpt.yaml", 4, []], ["examples/apriel_1p5_15b/cpt_stage1.yaml", 4, []],
             ["examples/tiny/cpt.yaml", None, ["model.tp=2", "model.pp=2", "model.vpp=2", "train.global_batch_size=8",
                                               "train.micro_batch_size=2"]]]
    out = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(jobs)], cwd=REPO, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    results = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert len(results) == len(jobs)
    return results


def _sharded_stage(preset, tp: int, layers: int, first: bool, last: bool) -> int:
    """Parameters of one TP rank of a stage: matrices split over TP, norms replicated."""
    c = preset.param_counts()
    h = preset.hidden_size
    n = layers * ((c["per_layer_attention"] + c["per_layer_mlp"]) // tp + 2 * h)
    if first:
        n += c["embedding"] // tp
    if last:
        n += c["output_layer"] // tp + h
    return n


def test_every_example_config_dry_runs_at_its_layout(dry_runs):
    assert {r["path"] for r in dry_runs} >= set(TRAIN_CONFIGS) and len(TRAIN_CONFIGS) >= 14
    for r in dry_runs:
        cfg = load_config(TrainConfig, REPO / r["path"])
        preset = get_preset(cfg.model.preset)
        if r["path"].startswith("examples/tiny/") and len(r["rows"][0]["chunks"]) > 1:
            continue  # the VPP variant, checked below
        stages = {row["rank"] // (cfg.model.tp * cfg.model.cp * r["dp"]) for row in r["rows"]}
        assert stages == ({0, cfg.model.pp // 2, cfg.model.pp - 1}), r["path"]
        if cfg.model.pp <= 3:  # every stage is one of the positions built
            assert sum(row["layers"] for row in r["rows"]) == preset.num_layers, r["path"]
        for row in r["rows"]:
            assert row["total"] < 80 * 2**30, f"{r['path']} rank {row['rank']}: {row['total'] / 2**30:.1f} GiB"
            if preset.vision is None:
                first = row["position"].startswith(("first", "only"))
                last = row["position"].startswith(("last", "only"))
                assert row["params"] == _sharded_stage(preset, cfg.model.tp, row["layers"], first, last), r["path"]


def test_the_15b_cpt_tables(dry_runs):
    """TP=8 x PP=2 on 4 nodes of 8: DP 2; 25 + 25 layers; the exact shard counts; vision on the first stage only."""
    nemo = next(r for r in dry_runs if r["path"].endswith("nemotron_15b/cpt.yaml") and r["nodes"] == 4)
    assert nemo["dp"] == 2 and [row["rank"] for row in nemo["rows"]] == [0, 16]
    assert [row["params"] for row in nemo["rows"]] == [936_110_080, 936_115_200]
    mm = next(r for r in dry_runs if r["path"].endswith("1p5_15b/cpt_stage1.yaml") and r["nodes"] == 4)
    text = get_preset("apriel-1.5-15b").param_counts()
    first, last = mm["rows"]
    assert (first["layers"], last["layers"]) == (24, 24)
    # the first stage carries the vision encoder (its TP-split matrices, replicated norms and conv) and the projector
    extra = first["params"] - _sharded_stage(get_preset("apriel-1.5-15b"), 8, 24, True, False)
    assert text["vision_encoder"] // 8 < extra < text["vision_encoder"] // 8 + text["projector"] + 5_000_000
    assert last["params"] == _sharded_stage(get_preset("apriel-1.5-15b"), 8, 24, False, True)


def test_virtual_stages_are_built_per_chunk(dry_runs):
    vpp = next(r for r in dry_runs if r["path"] == "examples/tiny/cpt.yaml" and len(r["rows"][0]["chunks"]) == 2)
    assert [[c["layers"] for c in row["chunks"]] for row in vpp["rows"]] == [[1, 1], [1, 1]]
    assert vpp["dp"] == 1 and [row["rank"] for row in vpp["rows"]] == [0, 2]


def test_broken_config_exits_2_naming_the_key():
    """The README's example: tp 3 with 32 heads and 8 query groups."""
    out = subprocess.run([sys.executable, "-m", "megatron_apriel", "train", "--dry-run", "--config",
                          "examples/apriel_nemotron_15b/cpt.yaml", "model.tp=3", "--nodes", "4", "--no-files"],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.strip().splitlines()[-1] == \
        "error: model.tp: 3 does not divide the attention heads of apriel-nemotron-15b (32)"
    assert "| rank |" not in out.stdout


@pytest.mark.parametrize("overrides,nodes,message", [
    (["model.changes={num_attention_heads: 36}", "model.tp=12"], 3,
     "model.tp: 12 does not divide the query groups of apriel-nemotron-15b (8)"),
    (["model.pp=3"], 4, "model.pp: 3 does not divide the layers of apriel-nemotron-15b (50)"),
    (["model.vpp=2"], 4,
     "model.vpp: 4 does not divide the layers of apriel-nemotron-15b (model.pp x model.vpp = 4) (50)"),
    (["train.global_batch_size=255"], 4,
     "train.global_batch_size: 255 is not divisible by micro_batch_size 1 x data-parallel size 2"),
    (["model.pp=5", "model.vpp=2", "train.global_batch_size=12"], 5,
     "train.global_batch_size: 12 micro-batches per step is not a multiple of model.pp 5, as the interleaved "
     "(virtual-stage) schedule needs"),
    (["train.seq_length=16380"], 4, "train.seq_length: 16380 is not divisible by model.tp 8 (sequence parallelism)"),
    (["model.cp=2", "train.seq_length=16386"], 4,
     "train.seq_length: 16386 is not divisible by model.tp 8 (sequence parallelism)"),
    (["model.cp=3", "model.sequence_parallel=false"], 6,
     "train.seq_length: 16384 is not divisible by 2 x model.cp = 6"),
    ([], 3, "model.tp x model.pp x model.cp: 16 does not divide the world of 24 GPUs (--nodes 3 x --gpus-per-node 8)"),
])
def test_layout_checks_name_the_key(overrides, nodes, message):
    from megatron_apriel.training.plan import check_layout, preset_of

    cfg = load_config(TrainConfig, REPO / "examples/apriel_nemotron_15b/cpt.yaml", overrides)
    with pytest.raises(ConfigError) as e:
        check_layout(cfg, preset_of(cfg), nodes, None)
    assert str(e.value) == message


def test_files_are_checked_as_training_reads_them(tmp_path, monkeypatch):
    from test_blends import write_prefix

    from megatron_apriel.training.plan import make_plan

    def check_files(cfg):
        return make_plan(cfg, device="cuda").data_lines

    monkeypatch.chdir(REPO)
    cfg = load_config(TrainConfig, "examples/apriel_nemotron_15b/cpt.yaml")
    with pytest.raises(ConfigError, match=r"^data\.blend\.sources\[0\]\.prefixes\[0\]: missing file data/"):
        check_files(cfg)
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    tokens_a, tokens_b = write_prefix(a, 0, 50, 40, 0), write_prefix(b, 1, 50, 40, 1)
    blend = {"sources": [{"name": "A", "weight": 75, "prefixes": [a]}, {"name": "B", "weight": 25, "prefixes": [b]}],
             "seq_length": 64, "steps": 10}
    cfg = load_config(TrainConfig, "examples/tiny/cpt.yaml",
                      ["data.kind=blend", f"data.blend={json.dumps(blend)}", f"checkpoint.load={tmp_path / 'none'}"])
    with pytest.raises(ConfigError, match=r"^checkpoint\.load: .*none does not exist"):
        check_files(cfg)
    cfg.checkpoint.load = None
    lines = check_files(cfg)
    need = 10 * 8 * 64
    epochs = need * 0.75 / tokens_a
    assert lines[0] == (f"data: source 'A': {tokens_a:,d} tokens on disk, 75.0% of {need:,d} -> "
                        f"{epochs:.2f} epochs" + ("  (above data.blend.repeat_warning 4)" if epochs > 4 else ""))
    assert lines[1].startswith(f"data: source 'B': {tokens_b:,d} tokens on disk, 25.0%")
