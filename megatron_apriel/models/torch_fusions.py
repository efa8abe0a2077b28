"""torch-native stand-ins for the fused CUDA kernels megatron-core takes from apex or Transformer Engine.

Without apex or TE (the local spec, as on a machine where neither can be built), megatron-core falls
back to slow paths that cost a GPU step real time, all of it outside the GEMMs and attention:

- ``wgrad``: no gradient-accumulation fusion. Each weight gradient is written by its own GEMM in
  bf16 and then added to the fp32 ``main_grad`` buffer by a second kernel (12 bytes moved per
  parameter per micro-batch, and a bf16 gradient allocated). apex's ``wgrad_gemm_accum_fp32`` lets
  the GEMM accumulate into ``main_grad`` itself; torch has the same GEMM as ``addmm`` with
  ``out_dtype=float32`` (bf16 operands, fp32 accumulate and output), which is what cuBLAS runs for
  apex too.
- ``adam``: megatron-core instantiates ``torch.optim.AdamW`` with its defaults, i.e. the ``foreach``
  implementation: about ten passes over the fp32 parameters and states. torch's ``fused=True``
  kernel makes one pass (read p, g, m, v; write p, m, v).
- ``gradnorm``: the fallback gradient norm takes one norm per tensor and builds a host tensor from
  them (one device sync per tensor); the fallback clip scales tensor by tensor through a temporary.
  ``torch._foreach_norm`` / ``torch._foreach_mul_`` do each in a few launches and no sync.
- ``rope``: the rotary embedding of the local spec is about eight elementwise kernels per call;
  compiled with ``torch.compile`` it is one (TE's fused rope is not available without TE).

- ``layer`` (opt-in): each decoder layer compiled whole with ``torch.compile``, so the elementwise
  work between the GEMMs (norms, SwiGLU, residual adds, rope, the float8 casts of ``model.fp8:
  torchao-*``) is fused by Inductor; the profile of the bf16 step shows elementwise work at about a
  fifth of the step. Compiling costs start-up time (a minute or so per distinct layer shape).

Each is installed by patching the name megatron-core looks up at call time, only where megatron-core
is on its fallback (a real apex/TE kernel is never replaced), only on CUDA, and only once per process.
``benchmarks/train_throughput.py --fusions`` measures each one alone and together.
"""

from __future__ import annotations

from typing import Iterable

import torch

# What training on CUDA enables unless the model config says otherwise.
DEFAULT = ("wgrad", "adam", "gradnorm")
KNOWN = ("wgrad", "adam", "gradnorm", "rope", "layer")

_installed: set[str] = set()


def parse(spec) -> tuple[str, ...]:
    """``"wgrad,adam"`` / a list / ``"none"`` / ``"default"`` / ``"default,rope"`` -> the names, checked."""
    if spec is None:
        spec = "default"
    if isinstance(spec, str):
        spec = [] if spec in ("", "none") else [s.strip() for s in spec.split(",")]
    expanded = [n for name in spec for n in (DEFAULT if name == "default" else (name,))]
    names = tuple(dict.fromkeys(expanded))
    unknown = [n for n in names if n not in KNOWN]
    if unknown:
        raise ValueError(f"unknown torch fusion(s) {unknown}; known: {', '.join(KNOWN)}, or none / default")
    return names


class _WgradAccum:
    """The two functions of apex's ``fused_weight_gradient_mlp_cuda`` that megatron-core calls:
    ``main_grad += grad_output^T @ input`` with both operands 2-D ([tokens, out] and [tokens, in])."""

    @staticmethod
    def wgrad_gemm_accum_fp32(total_input: torch.Tensor, grad_output: torch.Tensor, main_grad: torch.Tensor):
        torch.addmm(main_grad, grad_output.t(), total_input, out_dtype=torch.float32, out=main_grad)

    @staticmethod
    def wgrad_gemm_accum_fp16(total_input: torch.Tensor, grad_output: torch.Tensor, main_grad: torch.Tensor):
        main_grad.addmm_(grad_output.t(), total_input)


def _foreach_l2_norm(chunk_size, noop_flag, tensor_lists, per_tensor, *args):
    """Drop-in for ``amp_C.multi_tensor_l2norm`` (the total norm only, as megatron-core asks)."""
    tensors = tensor_lists[0]
    if not tensors:
        return torch.zeros(1, dtype=torch.float32, device="cuda"), None
    norms = torch._foreach_norm(tensors, 2.0)
    return torch.linalg.vector_norm(torch.stack(norms).float()).reshape(1), None


def _foreach_scale(chunk_size, noop_flag, tensor_lists, scale):
    """Drop-in for ``amp_C.multi_tensor_scale``: ``dst = src * scale``."""
    src, dst = tensor_lists
    if src is not dst and any(s is not d for s, d in zip(src, dst)):
        torch._foreach_copy_(dst, src)
    torch._foreach_mul_(dst, scale)


def _wgrad_gemm_works() -> bool:
    """Whether this torch's CUDA ``addmm`` takes bf16 operands into an fp32 ``self``/``out`` (older
    releases insist that ``self`` has the operands' dtype) and computes the right thing."""
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(64, 16, device="cuda", dtype=torch.bfloat16, generator=g)
    dy = torch.randn(64, 8, device="cuda", dtype=torch.bfloat16, generator=g)
    acc = torch.randn(8, 16, device="cuda", generator=g)
    expected = acc + dy.float().t() @ x.float()
    try:
        _WgradAccum.wgrad_gemm_accum_fp32(x, dy, acc)
    except (RuntimeError, TypeError):
        return False
    return bool(torch.allclose(acc, expected, rtol=1e-5, atol=1e-4))


def _install_wgrad() -> bool:
    from megatron.core.tensor_parallel import layers

    if getattr(layers, "_grad_accum_fusion_available", False):
        return True  # apex's own kernel
    if not _wgrad_gemm_works():
        return False
    layers.fused_weight_gradient_mlp_cuda = _WgradAccum
    layers._grad_accum_fusion_available = True
    return True


def _install_gradnorm() -> bool:
    from megatron.core import utils
    from megatron.core.optimizer import clip_grads

    if clip_grads.l2_norm_impl is not utils.local_multi_tensor_l2_norm:
        return False  # TE's or apex's kernels are in use
    clip_grads.l2_norm_impl = _foreach_l2_norm
    clip_grads.multi_tensor_scale_impl = _foreach_scale
    return True


def _install_rope() -> bool:
    from megatron.core.models.common.embeddings import rope_utils

    fn = rope_utils._apply_rotary_pos_emb_bshd
    if not getattr(fn, "_apriel_compiled", False):
        compiled = torch.compile(fn)  # packed (THD) sequences call it per sequence length: let it go dynamic
        compiled._apriel_compiled = True
        rope_utils._apply_rotary_pos_emb_bshd = compiled
    return True


def compile_layers(chunks) -> int:
    """The ``layer`` fusion: every megatron-core ``TransformerLayer`` of ``chunks`` compiled whole
    (``nn.Module.compile``: the module and its parameters stay as they are, so DDP, checkpoints and
    the optimizer see no difference). Returns how many layers."""
    from megatron.core.transformer.transformer_layer import TransformerLayer

    layers = [m for chunk in chunks for m in chunk.modules() if isinstance(m, TransformerLayer)]
    for layer in layers:
        layer.compile()
    return len(layers)


def install(names: Iterable[str], device: str) -> tuple[str, ...]:
    """Install the fusions among ``names`` that patch megatron-core (``adam`` and ``layer`` need no
    patch: the optimizer builder applies ``adam`` with ``fuse_adam``, the model builder ``layer`` with
    :func:`compile_layers`). Returns the names in effect; none off CUDA."""
    if device != "cuda":
        return ()
    patches = {"wgrad": _install_wgrad, "gradnorm": _install_gradnorm, "rope": _install_rope}
    for name in names:
        if name not in _installed and (name not in patches or patches[name]()):
            _installed.add(name)
    return tuple(n for n in names if n in _installed)


def fuse_adam(megatron_optimizer) -> int:
    """Switch each torch Adam/AdamW inside a megatron-core optimizer to torch's fused CUDA kernel.

    Only where megatron-core fell back to torch's optimizer (TE's and apex's FusedAdam are fused
    already) and every parameter is a floating-point CUDA tensor. The update is the same AdamW; the
    fused kernel does it in one pass. Returns how many torch optimizers were switched."""
    inner = getattr(megatron_optimizer, "chained_optimizers", [megatron_optimizer])
    switched = 0
    for opt in inner:
        torch_opt = getattr(opt, "optimizer", None)
        if not isinstance(torch_opt, torch.optim.Adam | torch.optim.AdamW):
            continue
        params = [p for g in torch_opt.param_groups for p in g["params"]]
        if not params or not all(p.is_cuda and p.is_floating_point() for p in params):
            continue
        switch_to_fused(torch_opt)
        switched += 1
    return switched


def switch_to_fused(torch_opt: torch.optim.Optimizer) -> None:
    """Make an already-built torch Adam/AdamW step with its fused kernel (the flags its constructor
    would have set for ``fused=True``; ``step`` reads them from the param groups every time)."""
    for group in [*torch_opt.param_groups, torch_opt.defaults]:
        group["fused"], group["foreach"] = True, False
    torch_opt._step_supports_amp_scaling = True
