"""The model-family registry: a third family registered in one place (tests/toy_family.py: its preset,
builder and checkpoint table) is dry-run, converted from HF, trained and converted back, with no
other change to the code. One subprocess (the registration and the process group stay in it).
Runtime: about 40 s on a loaded 2-core machine."""

from __future__ import annotations

import json
import subprocess
import sys

import torch
from conftest import REPO
from safetensors.torch import load_file

SCRIPT = r"""
import json, sys
from pathlib import Path
import torch
from safetensors.torch import save_file
import toy_family
from megatron_apriel.checkpoint.convert import main as convert
from megatron_apriel.config import load_config
from megatron_apriel.models import families, get_preset
from megatron_apriel.training.config import TrainConfig
from megatron_apriel.training.loop import main as train
from megatron_apriel.training.plan import make_plan
from transformers import MistralForCausalLM

tmp, tiny = Path(sys.argv[1]), sys.argv[2]
overrides = ["model.preset=tiny-toy", "model.device=cpu", "train.train_iters=8", "logging.log_interval=1",
             "logging.eval_interval=null", "checkpoint.save_interval=null", f"checkpoint.save={tmp / 'run'}"]
assert train(["--config", tiny, *overrides, "--dry-run", "--no-files"]) == 0

# an HF folder of the family: a Mistral model stored under the toy class and names
preset = get_preset("tiny-toy")
torch.manual_seed(0)
hf_cfg = preset.hf_config()
model = MistralForCausalLM(hf_cfg)
names = {k: k.replace("model.", "transformer.", 1).replace(".layers.", ".blocks.").replace("lm_head.", "head.")
         for k in model.state_dict() if "rotary" not in k}
hf = tmp / "hf"
hf.mkdir()
state = {names[k]: v.contiguous() for k, v in model.state_dict().items() if k in names}
save_file(state, str(hf / "model.safetensors"))
hf_cfg.architectures = [toy_family.ARCH]
hf_cfg.save_pretrained(hf)

assert convert(["hf-to-mcore", "--hf", str(hf), "--out", str(tmp / "mcore")]) == 0
plan = make_plan(load_config(TrainConfig, tiny, [*overrides, f"checkpoint.load={tmp / 'mcore'}"]))
assert plan.family is toy_family.FAMILY, plan.family
assert train(["--config", tiny, *overrides, f"checkpoint.load={tmp / 'mcore'}"]) == 0
assert convert(["mcore-to-hf", "--ckpt", str(tmp / "mcore"), "--out", str(tmp / "back")]) == 0
assert convert(["mcore-to-hf", "--ckpt", str(tmp / "run"), "--out", str(tmp / "trained")]) == 0
print(json.dumps({"family": plan.family.name, "families": [f.name for f in families.FAMILIES]}))
"""


def test_a_third_family_converts_and_trains(tmp_path):
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path), str(REPO / "examples/tiny/cpt.yaml")],
                         cwd=REPO / "tests", capture_output=True, text=True, timeout=600,
                         env={"PYTHONPATH": f"{REPO}:{REPO / 'tests'}", "OMP_NUM_THREADS": "1",
                              "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert out.returncode == 0, out.stderr[-4000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {"family": "toy", "families": ["toy", "llava", "text"]}
    assert "dry run of tiny-toy" in out.stdout
    src = load_file(str(tmp_path / "hf" / "model.safetensors"))
    back = load_file(str(tmp_path / "back" / "model.safetensors"))
    assert sorted(back) == sorted(src) and any(k.startswith("transformer.blocks.") for k in src)
    assert all(torch.equal(back[k], src[k]) for k in src)  # the toy table, both ways: bit-identical
    assert json.loads((tmp_path / "back" / "config.json").read_text())["architectures"] == ["ToyForCausalLM"]
    trained = load_file(str(tmp_path / "trained" / "model.safetensors"))
    assert sorted(trained) == sorted(src)
    up = "transformer.blocks.0.mlp.up_proj.weight"
    assert not torch.equal(trained[up], src[up])
    records = (tmp_path / "run" / "logs" / "metrics.jsonl").read_text().splitlines()
    losses = [json.loads(line)["loss"] for line in records if '"loss"' in line]
    assert len(losses) == 8 and losses[-1] < losses[0], losses
