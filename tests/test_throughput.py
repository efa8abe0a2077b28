"""The throughput benchmark runs on CPU (smoke), and its FLOP count matches an independent count."""

import json

import torch
from torch.utils.flop_counter import FlopCounterMode

from conftest import REPO, run_python
from megatron_apriel.models import get_preset
from megatron_apriel.models.flops import flops_per_token, matmul_params


def test_flop_formula_matches_counted_flops(dist_world_of_one):
    from megatron_apriel.models.builder import build_gpt_model

    p, s = get_preset("tiny"), 64
    model = build_gpt_model(p, p.transformer_config())
    ids = torch.randint(0, p.vocab_size, (1, s))
    with FlopCounterMode(display=False) as counter:
        model(ids, torch.arange(s).unsqueeze(0), None)
    dense = counter.get_flop_counts()["Global"][torch.ops.aten.mm] * 3 / s  # forward x3 = fwd + bwd
    assert dense == 6 * matmul_params(p)

    # attention scores and values, counted on explicit matmuls of the same shapes (full s x s)
    q = torch.randn(1, p.num_attention_heads, s, p.kv_channels)
    with FlopCounterMode(display=False) as counter:
        torch.matmul(torch.softmax(q @ q.transpose(-1, -2), -1), q)
    attention = counter.get_total_flops() * 3 * p.num_layers / s
    assert flops_per_token(p, s) == dense + attention


def test_benchmark_smoke_on_cpu(tmp_path):
    out = tmp_path / "perf.json"
    proc = run_python([REPO / "benchmarks" / "train_throughput.py", "--tiny", "--device", "cpu", "--seq", "32",
                       "--steps", "2", "--warmup", "1", "--grad-accum", "2", "--paths", "sdpa-bf16,te-bf16",
                       "--recomputes", "none,full", "--json", out], env={"OMP_NUM_THREADS": "1"})
    rows = json.loads(out.read_text())
    ok = [r for r in rows if "error" not in r]
    assert [(r["path"], r["recompute"]) for r in ok] == [("sdpa-bf16", "none"), ("sdpa-bf16", "full")]
    assert all(r["tokens_per_s_per_gpu"] > 0 and r["flops_per_token"] == flops_per_token(get_preset("tiny"), 32) for r in ok)
    # recomputation changes speed, not the maths
    assert ok[0]["losses"] == ok[1]["losses"]
    assert "tok/s/GPU" in proc.stdout and "MFU" in proc.stdout
