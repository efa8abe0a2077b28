"""The run plan: a wrong config stops the real ``apriel train`` with exit 2 and one line naming the
key, before any process group exists, and ``--dry-run`` and the launchers' ``--check`` refuse it in
the same words.

Each case is ``examples/tiny/cpt.yaml`` with dotted overrides, run through the verb's own ``main``
in this process (the real run, then the dry run at the same world of one GPU). Runtime: about 10 s,
most of it the one subprocess that runs the installed command line.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch
import yaml
from conftest import REPO

from megatron_apriel.checkpoint.dcp_io import write_model_meta
from megatron_apriel.models import get_preset
from megatron_apriel.training.loop import main

TINY = str(REPO / "examples/tiny/cpt.yaml")
ONE_GPU = ["--nodes", "1", "--gpus-per-node", "1"]  # the world the real run here has


def _no_data(tmp_path):
    raw = yaml.safe_load(open(TINY))
    del raw["data"]
    path = tmp_path / "no_data.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path), []


def _other_model(tmp_path):
    ckpt = tmp_path / "other"
    ckpt.mkdir()
    write_model_meta(ckpt, get_preset("tiny", rope_theta=1e4), torch.float32)
    return TINY, [f"checkpoint.load={ckpt}"]


# (id, overrides or a function of tmp_path -> (config, overrides), the start of the message after "error: ")
CASES = [
    ("unknown preset", ["model.preset=tiny-typo"], "model.preset: unknown model preset 'tiny-typo'"),
    ("no preset", ["model.preset=null"], "model.preset: not given (known: "),
    ("no data section", _no_data, "data.blend: the config names no training data"),
    ("tp vs heads", ["model.tp=3"], "model.tp: 3 does not divide the attention heads of tiny (4)"),
    ("tp vs world", ["model.tp=2"], "model.tp x model.pp x model.cp: 2 does not divide the world of 1 GPUs"),
    ("pp vs layers", ["model.pp=3"], "model.pp: 3 does not divide the layers of tiny (4)"),
    ("vpp without pp", ["model.vpp=2"], "model.vpp: virtual stages (2) need model.pp > 1"),
    ("missing blend file", ["data.kind=blend", "data.blend={sources: [{name: web, prefixes: [/nonexistent/web]}]}"],
     "data.blend.sources[0].prefixes[0]: missing file /nonexistent/web.bin"),
    ("missing dataset prefix", ["data.factory=sft", "data.factory_args={prefix: /nonexistent/sft}"],
     "data.factory_args.prefix: nothing at '/nonexistent/sft'"),
    ("unknown choice", ["model.recompute=partial"], "model.recompute: 'partial' is not one of ['none', 'selective'"),
    ("unknown schedule", ["train.schedule.decay_style=cosin"], "train.schedule.decay_style: 'cosin' is not one of"),
    ("negative size", ["train.micro_batch_size=-4"], "train.micro_batch_size: must be at least 1, got -4"),
    ("negative lr", ["train.optim.lr=-3e-3"], "train.optim.lr: must not be negative, got -0.003"),
    ("batch vs micro-batches", ["train.global_batch_size=6"],
     "train.global_batch_size: 6 is not divisible by micro_batch_size 4 x data-parallel size 1"),
    ("frozen part that is not there", ["train.freeze=[vision_encoder]"],
     "train.freeze: 'vision_encoder' is not a part of tiny"),
    ("unknown frozen group", ["train.freeze=[lm_head]"], "train.freeze: unknown group 'lm_head'"),
    ("load of another model", _other_model, "checkpoint.load "),
]


def _same_words(line: str) -> str:
    """The message without where the world came from (the launch's processes, or --nodes x --gpus-per-node)."""
    return re.sub(r" \((the processes of this launch|--nodes \d+ x --gpus-per-node \d+)\)$", "", line)


def _error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0][len("error: "):].removeprefix(f"{TINY}: ")


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_real_run_and_dry_run_refuse_alike(case, tmp_path, capsys):
    _, make, expected = case
    config, overrides = make(tmp_path) if callable(make) else (TINY, make)
    started = torch.distributed.is_initialized()
    assert main(["--config", config, *overrides]) == 2
    out, err = capsys.readouterr()
    real = _error_line(err)
    assert real.startswith(expected), real
    assert "distributed:" not in out  # the loop's first line after the rendezvous never came
    assert torch.distributed.is_initialized() == started  # no process group was created
    for mode in ("--dry-run", "--check"):  # --check: the SLURM launchers' pre-flight
        assert main(["--config", config, *overrides, mode, *ONE_GPU]) == 2
        out, err = capsys.readouterr()
        assert _same_words(_error_line(err)) == _same_words(real) and "| rank |" not in out
    if case[0] == "load of another model":
        assert "rope_theta: 10000.0 vs 1000000.0" in real


def test_the_command_line_stops_before_the_rendezvous():
    """The installed command, as a SLURM task runs it: exit 2, one stderr line, nothing logged."""
    out = subprocess.run([sys.executable, "-m", "megatron_apriel", "train", "--config", TINY, "model.tp=2"],
                         cwd=REPO, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONWARNINGS": "ignore"})  # megatron-core's import warnings
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.strip().splitlines() == [
        "error: model.tp x model.pp x model.cp: 2 does not divide the world of 1 GPUs (the processes of this launch)"]
    assert out.stdout == ""
