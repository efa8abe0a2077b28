"""The training loop in bf16 on a GPU: NCCL, learning, and save/resume bit for bit."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from gpu_common import DEVICE, gpu
from test_training import make_config, metrics, train, write_corpus

pytestmark = gpu


def gpu_config(path: Path, corpus: str, **sections) -> Path:
    """The CPU tests' config on the GPU device in bf16, a wider model and longer sequences."""
    model = {"preset": "tiny", "changes": {"vocab_size": 500, "hidden_size": 256, "ffn_hidden_size": 768,
                                           "num_attention_heads": 8, "num_query_groups": 2, "kv_channels": 32},
             "device": DEVICE, "bf16": True, **sections.pop("model", {})}
    train_section = {"seq_length": 128, "micro_batch_size": 4, "global_batch_size": 16, **sections.pop("train", {})}
    make_config(path, corpus, train=train_section, **sections)
    import yaml

    cfg = yaml.safe_load(path.read_text())
    cfg["model"] = model
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_bf16_training_learns_with_nccl(tmp_path):
    corpus = write_corpus(tmp_path / "syn_text_document", docs=200, length=200)
    cfg = gpu_config(tmp_path / "c.yaml", corpus, train={"train_iters": 40})
    proc = train(cfg)
    if DEVICE == "cuda":
        assert "backend nccl" in proc.stdout, proc.stdout[-2000:]
    losses = [r["loss"] for _, r in sorted(metrics(tmp_path / "logs").items())]
    assert len(losses) == 40 and all(math.isfinite(x) for x in losses), losses
    assert np.mean(losses[:5]) > 6.0  # ln(500) = 6.21 at the start
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 1.0, losses


def test_bf16_save_and_resume_are_bit_identical(tmp_path):
    """An uninterrupted run and one stopped at step 6 and resumed log the same numbers exactly.

    ``model.deterministic`` makes the GPU kernels reproducible (attention backward and cuBLAS
    otherwise differ in the last bits from run to run, resumed or not)."""
    corpus = write_corpus(tmp_path / "syn_text_document", docs=200, length=200)
    n = 12
    runs = {}
    for name, extra in (("full", {}), ("cut", {"exit_interval": 6})):
        d = tmp_path / name
        d.mkdir()
        cfg = gpu_config(d / "c.yaml", corpus, model={"deterministic": True},
                         train={"train_iters": n, **extra}, checkpoint={"save": str(d / "ckpt")},
                         logging={"log_interval": 1, "log_dir": str(d / "logs")})
        proc = train(cfg, check=not extra)
        if extra:
            assert proc.returncode == 3, proc.stdout[-3000:] + proc.stderr[-3000:]
            assert (d / "ckpt" / "latest_checkpointed_iteration.txt").read_text().strip() == "6"
            resumed = train(cfg)
            assert "resumed from" in resumed.stdout and "iteration 6" in resumed.stdout
        runs[name] = metrics(d / "logs")
    assert sorted(runs["cut"]) == sorted(runs["full"]) == list(range(1, n + 1))
    for it in range(1, n + 1):
        for key in ("loss", "grad_norm", "lr"):
            assert runs["cut"][it][key] == runs["full"][it][key], (it, key, runs["cut"][it], runs["full"][it])


def test_wgrad_accumulation_gemm_adds_into_fp32_main_grad():
    """The stand-in for apex's ``wgrad_gemm_accum_fp32``: main_grad += dy^T x, in place, accumulated
    in fp32 (bf16 products are exact in fp32, so only the summation order differs)."""
    import pytest
    import torch

    from megatron_apriel.models import torch_fusions

    if DEVICE != "cuda":
        pytest.skip("addmm with out_dtype is a CUDA kernel")
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(4096, 640, device="cuda", dtype=torch.bfloat16, generator=g)
    dy = torch.randn(4096, 384, device="cuda", dtype=torch.bfloat16, generator=g)
    main = torch.randn(384, 640, device="cuda", generator=g)
    before = main.clone()
    expected = main.double() + dy.double().t() @ x.double()
    ptr = main.data_ptr()
    torch_fusions._WgradAccum.wgrad_gemm_accum_fp32(x, dy, main)
    assert main.data_ptr() == ptr and main.dtype == torch.float32
    err = ((main.double() - expected).norm() / expected.norm()).item()
    assert err < 1e-6, err
    # the unfused path (a bf16 GEMM, then an add) rounds the product to bf16 first: far less precise
    unfused = before + (dy.t() @ x).float()
    assert ((unfused.double() - expected).norm() / expected.norm()).item() > 10 * err


def test_torch_fusions_train_like_the_unfused_step(tmp_path):
    """Training with the default fusions (fp32 wgrad accumulation, fused AdamW, foreach grad norm)
    follows the unfused run's losses within bf16 noise, and says which fusions it used."""
    corpus = write_corpus(tmp_path / "syn_text_document", docs=200, length=200)
    runs = {}
    for name in ("none", "default"):
        d = tmp_path / name
        d.mkdir()
        cfg = gpu_config(d / "c.yaml", corpus, model={"torch_fusions": name}, train={"train_iters": 30},
                         logging={"log_interval": 1, "log_dir": str(d / "logs")})
        proc = train(cfg)
        if DEVICE == "cuda" and name == "default":
            assert "torch fusions (no TE/apex): wgrad, adam, gradnorm" in proc.stdout, proc.stdout[-3000:]
        runs[name] = [r["loss"] for _, r in sorted(metrics(d / "logs").items())]
    a, b = np.array(runs["none"]), np.array(runs["default"])
    assert len(a) == len(b) == 30
    assert np.mean(b[-5:]) < np.mean(b[:5]) - 1.0, b  # it learns
    assert np.max(np.abs(a - b) / a) < 0.03, (a, b)


def _losses(tmp_path: Path, corpus: str, name: str, steps: int, **model) -> tuple[list[float], str]:
    d = tmp_path / name
    d.mkdir()
    cfg = gpu_config(d / "c.yaml", corpus, model=model, train={"train_iters": steps},
                     logging={"log_interval": 1, "log_dir": str(d / "logs")})
    proc = train(cfg)
    return [r["loss"] for _, r in sorted(metrics(d / "logs").items())], proc.stdout + proc.stderr


def write_markov_corpus(prefix: Path, docs: int = 400, length: int = 200, vocab: int = 500, successors: int = 16,
                        seed: int = 0) -> str:
    """Documents from a fixed random Markov chain: each token is followed by one of ``successors``
    tokens, uniformly. The loss falls smoothly towards the chain's entropy, ln(16) = 2.77, without the
    sudden drop of the arithmetic progressions (whose timing a small perturbation shifts), so two
    precisions can be compared by their level after a fixed number of steps."""
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    rng = np.random.default_rng(seed)
    table = rng.integers(3, vocab, size=(vocab, successors))
    builder = IndexedDatasetBuilder(str(prefix) + ".bin", dtype=np.uint16)
    for _ in range(docs):
        tokens = np.empty(length, dtype=np.int64)
        tokens[0] = rng.integers(3, vocab)
        for i in range(1, length):
            tokens[i] = table[tokens[i - 1], rng.integers(successors)]
        builder.add_document(torch.from_numpy(tokens), [length])
    builder.finalize(str(prefix) + ".idx")
    return str(prefix)


def test_torchao_float8_tracks_bf16_over_200_steps(tmp_path):
    """200 steps in float8 (tensorwise and rowwise, torch._scaled_mm on the GPU) against bf16 from the
    same initial weights and data: the mean loss of the last 20 steps within 1% of bf16's."""
    import pytest

    pytest.importorskip("torchao.float8")
    corpus = write_markov_corpus(tmp_path / "syn_text_document")
    ref, _ = _losses(tmp_path, corpus, "bf16", 200)
    assert np.mean(ref[-20:]) < np.mean(ref[:5]) - 1.0, ref  # it learns (from ln(500) = 6.2 towards 2.77)
    for recipe in ("torchao-tensorwise", "torchao-rowwise"):
        got, log = _losses(tmp_path, corpus, recipe, 200, fp8=recipe)
        assert f"float8 ({recipe}" in log and ("emulated" in log) == (DEVICE != "cuda"), log[-3000:]
        assert len(got) == 200 and all(math.isfinite(x) for x in got), got
        rel = abs(np.mean(got[-20:]) - np.mean(ref[-20:])) / np.mean(ref[-20:])
        print(f"{recipe}: last-20 mean loss {np.mean(got[-20:]):.4f} vs bf16 {np.mean(ref[-20:]):.4f} ({rel:.2%})")
        assert rel < 0.01, (recipe, rel, got[-20:], ref[-20:])


def test_compiled_layer_trains_like_the_eager_layer(tmp_path):
    """The ``layer`` fusion (each decoder layer under torch.compile), with float8 linears, follows the
    eager run's losses within bf16 noise."""
    import pytest

    pytest.importorskip("torchao.float8")
    corpus = write_corpus(tmp_path / "syn_text_document", docs=200, length=200)
    eager, _ = _losses(tmp_path, corpus, "eager", 30, fp8="torchao-tensorwise")
    compiled, log = _losses(tmp_path, corpus, "compiled", 30, fp8="torchao-tensorwise", torch_fusions="default,layer")
    if DEVICE == "cuda":
        assert "torch fusions (no TE/apex): wgrad, adam, gradnorm, layer" in log, log[-3000:]
    a, b = np.array(eager), np.array(compiled)
    assert len(a) == len(b) == 30 and np.mean(b[-5:]) < np.mean(b[:5]) - 1.0, b
    assert np.max(np.abs(a - b) / a) < 0.03, (a, b)
