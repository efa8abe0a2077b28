"""TP=2, PP=2 (with and without virtual stages) and DP=2 with the distributed optimizer, two
processes under torchrun with gloo, against the same weights at TP=1 in one process."""

from pathlib import Path

import pytest
import torch
from conftest import run_python, run_torchrun

SCRIPT = Path(__file__).parent / "dist" / "parallel_check.py"


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def rel_all(a: dict, b: dict) -> float:
    """Relative difference of two whole models (all tensors as one vector)."""
    assert set(a) == set(b)
    num = sum(((a[k].double() - b[k].double()) ** 2).sum() for k in b)
    den = sum((b[k].double() ** 2).sum() for k in b)
    return float((num / den).sqrt())


@pytest.fixture(scope="module")
def reference(tiny_hf_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "tp1.pt"
    run_python([SCRIPT, "--hf", tiny_hf_dir, "--out", out])
    return torch.load(out)


LAYOUTS = {
    "tp2": ["--tp", "2"],
    "pp2": ["--pp", "2"],
    "pp2_vpp2": ["--pp", "2", "--vpp", "2"],
    "dp2_distopt": ["--distributed-optimizer"],
    "tp2_seq_mb2": ["--tp", "2", "--micro-batch-size", "2", "--distributed-optimizer"],
    # sequence parallelism: norm weights see half the sequence per rank, their grads all-reduced over TP
    "tp2_sp": ["--tp", "2", "--sequence-parallel", "--micro-batch-size", "2"],
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_matches_tp1(layout, reference, tiny_hf_dir, tmp_path):
    out = tmp_path / f"{layout}.pt"
    run_torchrun(SCRIPT, ["--hf", tiny_hf_dir, "--out", out, *LAYOUTS[layout]])
    got = torch.load(out)
    assert rel(got["logits"], reference["logits"]) < 1e-5
    assert got["loss"] == pytest.approx(reference["loss"], rel=1e-5)
    assert got["grad_norm"] == pytest.approx(reference["grad_norm"], rel=1e-5)
    # the step really moved the weights, and moved them the same way
    assert rel_all(got["weights"], reference["initial"]) > 1e-3
    assert rel_all(got["weights"], reference["weights"]) < 1e-5
