"""The throughput benchmark runs on CPU (smoke), and its FLOP count matches an independent count."""

import json

import torch
from conftest import REPO, run_python
from torch.utils.flop_counter import FlopCounterMode

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
                       "--steps", "2", "--warmup", "1", "--grad-accum", "2",
                       "--paths", "sdpa-bf16,te-bf16,torchao-tensorwise",
                       "--recomputes", "none,full", "--profile", "2", "--json", out], env={"OMP_NUM_THREADS": "1"})
    record = json.loads(out.read_text())
    rows = record["rows"]
    ok = [r for r in rows if "error" not in r]
    assert [(r["path"], r["recompute"]) for r in ok] == [("sdpa-bf16", "none"), ("sdpa-bf16", "full"),
                                                         ("torchao-tensorwise", "none"), ("torchao-tensorwise", "full")]
    tiny_flops = flops_per_token(get_preset("tiny"), 32)
    assert all(r["tokens_per_s_per_gpu"] > 0 and r["flops_per_token"] == tiny_flops for r in ok)
    # recomputation changes speed, not the maths
    assert ok[0]["losses"] == ok[1]["losses"] and ok[2]["losses"] == ok[3]["losses"]
    # the float8 rows (emulated here) computed in float8: near the fp32 losses, not equal to them
    assert ok[2]["losses"] != ok[0]["losses"]
    assert all(abs(a - b) < 0.05 for a, b in zip(ok[2]["losses"], ok[0]["losses"])), (ok[2]["losses"], ok[0]["losses"])
    assert "tok/s/GPU" in proc.stdout and "MFU" in proc.stdout
    # the raw record: every timed step, the stack's versions and the command that made it
    assert all(len(r["step_times_s"]) == 2 and r["step_time_s"] in r["step_times_s"] for r in ok)
    env = record["environment"]
    assert env["torch"] == torch.__version__ and env["megatron-core"] == "0.16.1"
    assert record["command"].startswith("python benchmarks/train_throughput.py --tiny --device cpu")
    # the profile accounts for the step's time by class: GEMMs, attention and the optimizer all show
    for r in ok:
        prof = r["profile"]
        classes = prof["classes_ms_per_step"]
        assert classes["gemm"] > 0 and classes["attention"] > 0 and classes["optimizer"] > 0, classes
        assert abs(sum(classes.values()) - prof["busy_ms_per_step"]) < 1e-6
        assert prof["busy_ms_per_step"] <= prof["step_ms"] * 1.05
    assert "time by op class" in proc.stdout

    # docs/performance.md's tables are made from such records: the numbers in the table are the record's
    doc = tmp_path / "perf.md"
    doc.write_text("# Throughput\n\n<!-- results:begin -->\nold\n<!-- results:end -->\n\nafter\n")
    run_python([REPO / "benchmarks" / "perf_report.py", out, "--update", doc])
    text = doc.read_text()
    assert "old" not in text and text.endswith("after\n")
    for r in ok:
        assert (f"| {r['path']} | {r['recompute']} | none | 4 | 32 | {r['micro_batch']} x {r['grad_accum']} "
                f"| {r['step_time_s']:.3f} | {r['tokens_per_s_per_gpu']:,.0f} |") in text
    assert record["command"] in text


def test_profile_classes():
    """Scopes decide for everything inside them; backward nodes are recognised by their CamelCase names."""
    import sys

    sys.path.insert(0, str(REPO / "benchmarks"))
    from profile_summary import classify

    assert classify(["Optimizer.step#AdamW.step", "aten::mul_"]) == "optimizer"
    assert classify(["aten::rms_norm", "aten::mul"]) == "norm"
    sdpa = ["aten::scaled_dot_product_attention", "aten::_flash_attention_forward", "aten::empty"]
    assert classify(sdpa) == "attention"
    assert classify(["autograd::engine::evaluate_function: ScaledDotProductFlashAttentionBackward0",
                     "aten::_flash_attention_backward"]) == "attention"
    assert classify(["autograd::engine::evaluate_function: MmBackward0", "MmBackward0", "aten::mm"]) == "gemm"
    assert classify(["nccl:all_reduce"]) == "communication"
    assert classify(["aten::silu"]) == "elementwise"
    assert classify(["SomethingElse"]) == "other"

    # CUDA kernels: an enclosing optimizer/communication scope first, then the kernel's own name, then
    # the nearest op that names a class (kernel names of the kinds a CUDA trace of the benchmark shows)
    from profile_summary import classify_kernel

    hook = ["autograd::engine::evaluate_function: torch::autograd::AccumulateGrad", "aten::add_"]
    assert classify_kernel(hook, "void at::native::vectorized_elementwise_kernel<4, CUDAFunctor_add<float>>") \
        == "elementwise"
    assert classify_kernel(["aten::rms_norm", "aten::mul"], "vectorized_elementwise_kernel<4, mul>") == "norm"
    assert classify_kernel(["Optimizer.step#AdamW.step", "aten::_fused_adamw_"], "multi_tensor_apply_kernel") \
        == "optimizer"
    assert classify_kernel(["aten::mm"], "nvjet_tst_256x128_64x4_1x2_h_bz_coopB_TNT") == "gemm"
    assert classify_kernel(["aten::_cudnn_attention_backward"], "cudnn_generated_fort_native_sdpa_sm90_flash_bprop") \
        == "attention"
    assert classify_kernel(["aten::copy_"], "Memcpy DtoD (Device -> Device)") == "memcpy"


def test_docs_tables_are_generated_from_the_committed_records():
    """docs/performance.md's recorded-runs section is exactly what perf_report makes of benchmarks/results/."""
    import sys

    sys.path.insert(0, str(REPO / "benchmarks"))
    from perf_report import BEGIN, END, load_records, render

    records = load_records([str(REPO / "benchmarks" / "results")])
    assert records, "no raw records committed"
    doc = (REPO / "docs" / "performance.md").read_text()
    assert doc.split(BEGIN, 1)[1].split(END, 1)[0].strip() == render(records).strip()
    # the H100 summary quoted above the generated tables is the record's
    h100 = next(rec for _, rec in records if "H100" in (rec["environment"].get("gpu") or ""))
    mfu = {r["fusions"]: f"{100 * r['mfu']:.1f}%" for r in h100["rows"]}
    assert mfu == {"none": "39.6%", "wgrad,adam,gradnorm": "45.1%", "wgrad,adam,gradnorm,rope": "45.9%"}
    assert all(f"| {m} |" in doc or f"**{m}**" in doc for m in mfu.values())
