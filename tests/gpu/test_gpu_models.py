"""HF parity of the bf16 model, the conversion round trip through a GPU training run, generation and
the throughput benchmark's smallest row, on a GPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO, make_tiny_hf, run_python, run_torchrun
from gpu_common import DEVICE, gpu
from test_convert import assert_same_tensors, make_tokenizer
from test_training import metrics  # noqa: F401  (a fixture)

pytestmark = gpu
HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    path = make_tiny_hf(tmp_path_factory.mktemp("gpu_hf") / "hf", seed=5)
    make_tokenizer(path)
    return path


def test_bf16_logits_match_transformers_within_bf16_error(hf_dir, tmp_path):
    """Both bf16 models are compared with the fp32 HF model: ours may be off by no more than a small
    multiple of HF's own bf16 error, and its top-1 predictions agree with the fp32 reference."""
    out = tmp_path / "parity.json"
    run_torchrun(HERE / "parity_check.py", [hf_dir, out, DEVICE], nproc=1)
    r = json.loads(out.read_text())
    assert r["hf_bf16_vs_fp32"] < 2e-2, r
    assert r["ours_bf16_vs_fp32"] < 3 * r["hf_bf16_vs_fp32"] + 1e-3, r
    assert r["ours_fp32_vs_fp32"] < 1e-4, r  # the layout is right, so only bf16 rounding remains
    assert r["top1_agreement"] > 0.97, r


def test_conversion_round_trip_through_a_gpu_run(hf_dir, tmp_path):
    """HF -> dist checkpoint -> loaded by a bf16 training run on the GPU (0 steps) and saved from
    there -> HF: every tensor comes back bit for bit."""
    run_python(["-m", "megatron_apriel.cli", "convert", "hf-to-mcore", "--hf", hf_dir, "--out", tmp_path / "mcore",
                "--dtype", "bf16"])
    cfg = {"model": {"preset": "tiny", "changes": {"vocab_size": 500}, "device": DEVICE, "bf16": True},
           "data": {"kind": "dataset", "factory": "synthetic",
                    "factory_args": {"vocab": 500}},
           "train": {"seq_length": 32, "micro_batch_size": 1, "global_batch_size": 1, "train_iters": 0},
           "checkpoint": {"load": str(tmp_path / "mcore"), "load_mode": "weights", "save": str(tmp_path / "saved")},
           "logging": {"log_interval": 1, "log_dir": str(tmp_path / "logs")}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    run_python(["-m", "megatron_apriel.train", "--config", tmp_path / "c.yaml"])
    run_python(["-m", "megatron_apriel.cli", "convert", "mcore-to-hf", "--ckpt", tmp_path / "saved",
                "--out", tmp_path / "back", "--tokenizer", hf_dir])
    reference = tmp_path / "ref"
    run_python(["-m", "megatron_apriel.cli", "convert", "mcore-to-hf", "--ckpt", tmp_path / "mcore",
                "--out", reference, "--tokenizer", hf_dir])
    assert_same_tensors(reference, tmp_path / "back")


def test_generate_on_gpu_equals_transformers(hf_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    prompt = "w5 w17 w300 w42"
    proc = run_python(["-m", "megatron_apriel.generate", "--hf", hf_dir, "--prompt", prompt, "--max-new-tokens", "16",
                       "--device", DEVICE, "--dtype", "bf16"])
    text = proc.stdout.split("### prompt: " + prompt + "\n", 1)[1].split("\n### ", 1)[0]
    tok = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.bfloat16).to(DEVICE).eval()
    ids = tok(prompt, return_tensors="pt").input_ids.to(DEVICE)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False,
                             pad_token_id=tok.eos_token_id)
    assert out.shape[1] == ids.shape[1] + 16
    assert text == tok.decode(out[0, ids.shape[1]:], skip_special_tokens=False)
    assert "16 tokens" in proc.stdout


def test_throughput_benchmark_smallest_row(tmp_path):
    """One Nemo-width layer at seq 1024 (on the CPU backend: the tiny preset)."""
    out = tmp_path / "perf.json"
    size = ["--layers", "1", "--seq", "1024"] if DEVICE == "cuda" else ["--tiny", "--seq", "64", "--device", "cpu"]
    run_python([REPO / "benchmarks" / "train_throughput.py", *size, "--steps", "3", "--warmup", "2",
                "--grad-accum", "1", "--paths", "sdpa-bf16", "--recomputes", "none", "--profile", "2", "--json", out])
    record = json.loads(out.read_text())
    (row,) = record["rows"]
    assert "error" not in row, row
    assert len(row["step_times_s"]) == 3 and all(t > 0 for t in row["step_times_s"])
    assert all(x == x for x in row["losses"])  # finite, not NaN
    prof = row["profile"]["classes_ms_per_step"]
    assert prof["gemm"] > 0 and prof["attention"] > 0
    if DEVICE == "cuda":
        assert record["environment"]["gpu"] == torch.cuda.get_device_name(0)
        assert row["mfu"] is None or 0.05 < row["mfu"] < 1.0, row
