"""Where a training step's time goes: a torch.profiler trace summarised by op class.

The classes are the ones an MFU investigation needs: GEMMs and attention (the useful work), norms,
elementwise ops (activations, rotary, residual adds, casts), memory copies, communication and the
optimizer. Each profiled op is classified by its own name and by the scopes it runs inside, the
outermost deciding: every kernel launched under ``Optimizer.step`` is optimizer time, every kernel
under ``aten::scaled_dot_product_attention`` is attention, whatever the kernel is called, and a
multiply inside ``aten::rms_norm`` is norm time, not elementwise.

On CUDA every kernel (and device copy) is counted once, with its own duration, and classified by
the scopes of the op that launched it, then by the kernel's own name (a cuBLAS/CUTLASS GEMM, a
flash/cuDNN attention kernel, a norm kernel), then by the nearest enclosing op that names a class;
the classes add up to the time the GPU was busy, and the rest of the step is reported as ``idle``
(launch gaps, host-side Python, synchronisation), the share that CUDA graphs or fewer, larger
kernels would reclaim. CUPTI's own bookkeeping records ("Command Buffer Full": the launch queue
was full, i.e. the host was ahead of the GPU) are not GPU work and are left out. On a CPU the
summed time is each op's self CPU time.

    from profile_summary import profile_steps, format_breakdown
    summary = profile_steps(lambda: train_step(...), steps=3, device="cuda")
    print(format_breakdown(summary))
"""

from __future__ import annotations

import time
from typing import Callable

# (class, substrings of a scope name that put everything inside it in the class), outermost wins.
SCOPE_CLASSES: list[tuple[str, tuple[str, ...]]] = [
    ("optimizer", ("optimizer.step", "multi_tensor", "fused_adam", "_fused_adamw", "clip_grad")),
    ("communication", ("nccl", "gloo", "c10d::", "all_reduce", "allreduce", "reduce_scatter", "all_gather",
                       "allgather", "broadcast", "record_param_comms")),
    # autograd names its backward nodes in CamelCase (ScaledDotProductFlashAttentionBackward0), hence
    # the spellings without underscores
    ("attention", ("scaled_dot_product", "scaleddotproduct", "flash_attention", "flashattention", "flash_attn",
                   "efficient_attention", "efficientattention", "cudnn_attention", "cudnnattention", "fmha",
                   "flash_fwd", "flash_bwd")),
    ("norm", ("rms_norm", "layer_norm", "rmsnorm", "layernorm")),
    ("gemm", ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear",
              "gemm", "cublas", "cutlass", "nvjet", "xmma", "sm90_", "sm80_", "ampere_", "hopper_")),
    ("memcpy", ("memcpy", "memset", "aten::copy_", "aten::to", "aten::_to_copy", "aten::contiguous",
                "aten::clone", "aten::cat", "aten::stack", "aten::index", "aten::gather", "aten::scatter")),
]
CLASSES = [c for c, _ in SCOPE_CLASSES] + ["elementwise", "other"]
ELEMENTWISE_HINTS = ("aten::", "elementwise", "vectorized", "unrolled", "reduce_kernel", "triton", "silu", "gelu",
                     "softmax", "cross_entropy", "crossentropy", "nll_loss", "swiglu", "rotary", "rope")


# records CUPTI adds to a trace about itself, with durations that are not kernel time
CUPTI_OVERHEAD = ("command buffer full", "activity buffer request", "activity buffer flush", "buffer flush")
# the scopes that decide for every kernel inside them, however the kernel is named
OUTER_CLASSES = ("optimizer", "communication")
KERNEL_CLASSES: list[tuple[str, tuple[str, ...]]] = [  # first match wins: cuDNN's attention names carry sm90_
    ("attention", ("flash", "fmha", "attention", "sdpa", "cudnn_generated")),
    ("gemm", ("gemm", "cutlass", "nvjet", "xmma", "cublas", "sm90_", "sm80_", "ampere_", "hopper_")),
    ("norm", ("norm",)),
    ("memcpy", ("memcpy", "memset")),
]


def classify_kernel(names: list[str], kernel: str) -> str:
    """Class of a GPU kernel given the scope chain of the op that launched it (outermost first)."""
    lowered = [n.lower() for n in names]
    for name in lowered:
        for cls, keys in SCOPE_CLASSES:
            if cls in OUTER_CLASSES and any(k in name for k in keys):
                return cls
    k = kernel.lower()
    for cls, keys in KERNEL_CLASSES:
        if any(key in k for key in keys):
            return cls
    for name in reversed(lowered):  # the nearest enclosing op that names a class
        for cls, keys in SCOPE_CLASSES:
            if any(key in name for key in keys):
                return cls
    if any(h in k for h in ("elementwise", "vectorized", "unrolled", "reduce", "triton", "foreach")) or any(
            h in lowered[-1] for h in ELEMENTWISE_HINTS):
        return "elementwise"
    return "other"


def classify(names: list[str]) -> str:
    """Class of an op given its scope chain, outermost first, the op's own name last."""
    lowered = [n.lower() for n in names]
    for name in lowered:  # outermost first: a scope decides for everything inside it
        for cls, keys in SCOPE_CLASSES:
            if any(k in name for k in keys):
                return cls
    if any(k in lowered[-1] for k in ELEMENTWISE_HINTS):
        return "elementwise"
    return "other"


def _scope_chain(event) -> list[str]:
    chain = []
    e = event
    while e is not None:
        chain.append(e.name)
        e = e.cpu_parent
    return chain[::-1]


def summarize(prof, device: str, steps: int, wall_s: float) -> dict:
    """Per-class milliseconds per step from a finished ``torch.profiler.profile``."""
    from torch.autograd import DeviceType

    per_class = {c: 0.0 for c in CLASSES}
    top: dict[tuple[str, str], list] = {}

    def count(cls: str, name: str, chain: list[str], us: float) -> None:
        per_class[cls] += us
        entry = top.setdefault((cls, name), [0.0, " > ".join(c[:48] for c in chain[-4:])])
        entry[0] += us

    for ev in prof.events():
        if ev.device_type != DeviceType.CPU:
            continue  # device-side events are counted through the CPU op that launched them
        if ev.name.lower().startswith(CUPTI_OVERHEAD):
            continue
        chain = _scope_chain(ev)
        if device == "cuda":
            for k in ev.kernels:
                if k.duration > 0:
                    count(classify_kernel(chain, k.name), ev.name, chain, k.duration)
        elif ev.self_cpu_time_total > 0:
            count(classify(chain), ev.name, chain, ev.self_cpu_time_total)
    busy_us = sum(per_class.values())
    step_ms = 1e3 * wall_s / steps
    out = {
        "device": device,
        "steps": steps,
        "step_ms": step_ms,
        "busy_ms_per_step": busy_us / 1e3 / steps,
        "classes_ms_per_step": {c: v / 1e3 / steps for c, v in per_class.items()},
        "top_ops": [{"name": name, "class": cls, "ms_per_step": us / 1e3 / steps, "scopes": scopes}
                    for (cls, name), (us, scopes) in sorted(top.items(), key=lambda kv: -kv[1][0])[:25]],
    }
    if device == "cuda":  # time the GPU sat idle within the step
        out["classes_ms_per_step"]["idle"] = max(0.0, step_ms - out["busy_ms_per_step"])
    return out


def profile_steps(step: Callable[[], object], steps: int, device: str, trace_path: str | None = None) -> dict:
    """Run ``step`` ``steps`` times under torch.profiler and summarise the trace by op class."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    with profile(activities=activities, record_shapes=False) as prof:
        sync()
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        sync()
        wall = time.perf_counter() - t0
    if trace_path:
        prof.export_chrome_trace(trace_path)
    return summarize(prof, device, steps, wall)


def format_breakdown(summary: dict) -> str:
    """A table: class, ms per step, share of the step."""
    step = summary["step_ms"]
    lines = [f"{'op class':<14} {'ms/step':>9} {'share':>7}", "-" * 32]
    for cls, ms in sorted(summary["classes_ms_per_step"].items(), key=lambda kv: -kv[1]):
        if ms > 0:
            lines.append(f"{cls:<14} {ms:>9.2f} {100 * ms / step:>6.1f}%")
    lines.append(f"{'step (wall)':<14} {step:>9.2f} {100.0:>6.1f}%")
    return "\n".join(lines)
