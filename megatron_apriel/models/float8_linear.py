"""Float8 GEMMs for the local (non-TE) layer spec, through torchao.

For ``model.fp8: torchao-tensorwise | torchao-rowwise`` (:mod:`megatron_apriel.models.float8`) the
builder swaps, through the ModuleSpec, the column- and row-parallel linears of attention (QKV, output
projection) and of the MLP (fc1, fc2) for the subclasses below, whose GEMMs run in float8 the way
torchao's ``Float8Linear`` does (dynamic scaling; e4m3 for inputs and weights, e5m2 for gradients):
the recipes are torchao's own ``Float8LinearConfig.from_recipe_name``.

Why not ``torchao.float8.convert_to_float8_training``: it swaps ``nn.Linear`` modules, and
megatron-core's parallel linears are not ``nn.Linear``; their tensor-parallel communication
(sequence-parallel all-gather, the data-gradient all-reduce or reduce-scatter) and the
gradient-accumulation fusion into ``main_grad`` live inside one autograd function. So
:class:`_Float8LinearFn` is that function (megatron-core's
``LinearWithGradAccumulationAndAsyncCommunication``) with its three GEMMs computed as torchao's
``matmul_with_hp_or_float8_args`` computes them: each operand cast by torchao's
``hp_tensor_to_float8_dynamic`` with the recipe's cast config and axis, multiplied by ``torch.mm`` on
torchao's float8 tensors (``torch._scaled_mm`` on the GPU). Scales are per shard under TP: each rank
scales its own weight shard (and, under sequence parallelism, the gathered input), as torchao's
float8 tensor parallelism does. Master weights, their gradients and the optimizer state stay as
they are; the checkpoint of a float8 run is an ordinary one.

With gradient-accumulation fusion the weight-gradient GEMM writes float32 (its operands are float8
either way) and is added to ``main_grad`` without a bf16 gradient in between.

On the CPU backend the float8 GEMMs are emulated (torchao's ``emulate``: the same casts and scales,
the product of the dequantised operands in float32), which is how the tests check this path.
"""

from __future__ import annotations

import dataclasses

import torch
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.tensor_parallel.mappings import _gather_along_first_dim, _reduce_scatter_along_first_dim


def float8_config(recipe: str, emulate: bool):
    """torchao's ``Float8LinearConfig`` of ``recipe`` (``tensorwise`` / ``rowwise``)."""
    from torchao.float8 import Float8LinearConfig

    return dataclasses.replace(Float8LinearConfig.from_recipe_name(recipe), emulate=emulate)


def _mm_config(config):
    """The ``LinearMMConfig`` ``Float8Linear`` builds from its config (output, grad_input, grad_weight)."""
    from torchao.float8.float8_training_tensor import LinearMMConfig, ScaledMMConfig

    return LinearMMConfig(*(ScaledMMConfig(config.emulate, g.use_fast_accum, False, config.pad_inner_dim)
                            for g in (config.gemm_config_output, config.gemm_config_grad_input,
                                      config.gemm_config_grad_weight)))


def _cast(t, cast_config, role, dim, config, mm_config, orig_dtype=None):
    """``t`` as torchao's float8 tensor, exactly as ``matmul_with_hp_or_float8_args`` casts it;
    ``orig_dtype`` changes the dtype the product comes out in (float32 for the fused wgrad)."""
    from torchao.float8.config import ScalingType
    from torchao.float8.float8_scaling_utils import get_maybe_axiswise_dim, hp_tensor_to_float8_dynamic
    from torchao.float8.float8_training_tensor import Float8TrainingTensor

    if cast_config.scaling_type is ScalingType.DISABLED:
        return t if orig_dtype is None else t.to(orig_dtype)
    f8 = hp_tensor_to_float8_dynamic(
        t, cast_config.target_dtype, mm_config, gemm_input_role=role,
        scaling_granularity=cast_config.scaling_granularity,
        axiswise_dim=get_maybe_axiswise_dim(dim, cast_config.scaling_granularity),
        round_scales_to_power_of_2=config.round_scales_to_power_of_2)
    if orig_dtype is not None and orig_dtype != f8._orig_dtype:
        f8 = Float8TrainingTensor(f8._data, f8._scale, orig_dtype, f8._linear_mm_config, f8._gemm_input_role,
                                  f8._axiswise_dim)
    return f8


class _Float8LinearFn(torch.autograd.Function):
    """``y = x @ w.T`` with float8 GEMMs and megatron-core's tensor-parallel communication."""

    @staticmethod
    def forward(ctx, input, weight, config, mm_config, gradient_accumulation_fusion, allreduce_dgrad,
                sequence_parallel, tp_group):
        from torchao.float8.float8_training_tensor import GemmInputRole

        ctx.save_for_backward(input, weight)
        ctx.config, ctx.mm_config, ctx.tp_group = config, mm_config, tp_group
        ctx.fuse = gradient_accumulation_fusion and hasattr(weight, "main_grad")
        ctx.main_grad = weight.main_grad if ctx.fuse else None
        ctx.allreduce_dgrad, ctx.sequence_parallel = allreduce_dgrad, sequence_parallel
        total = _gather_along_first_dim(input, group=tp_group) if sequence_parallel else input
        x = _cast(total.reshape(-1, total.shape[-1]), config.cast_config_input, GemmInputRole.INPUT, -1, config,
                  mm_config)
        w_t = _cast(weight.t(), config.cast_config_weight, GemmInputRole.WEIGHT, 0, config, mm_config)
        out = torch.mm(x, w_t)
        return out.reshape(*total.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_output):
        from torchao.float8.float8_training_tensor import GemmInputRole

        input, weight = ctx.saved_tensors
        c, mm, group = ctx.config, ctx.mm_config, ctx.tp_group
        go = grad_output.reshape(-1, grad_output.shape[-1])
        go_dim0 = _cast(go, c.cast_config_grad_output, GemmInputRole.GRAD_OUTPUT, -1, c, mm)
        w_t = _cast(weight.t(), c.cast_config_weight_for_grad_input, GemmInputRole.WEIGHT, -1, c, mm)
        grad_input = torch.mm(go_dim0, w_t.t()).reshape(*grad_output.shape[:-1], weight.shape[1])
        if ctx.sequence_parallel:
            grad_input = _reduce_scatter_along_first_dim(grad_input, group=group)
        elif ctx.allreduce_dgrad:
            torch.distributed.all_reduce(grad_input, group=group)

        grad_weight = None
        if ctx.needs_input_grad[1]:
            total = _gather_along_first_dim(input, group=group) if ctx.sequence_parallel else input
            # float32 products when they go straight into the float32 main_grad
            out_dtype = ctx.main_grad.dtype if ctx.fuse else None
            go_dim1 = _cast(go, c.cast_config_grad_output_for_grad_weight, GemmInputRole.GRAD_OUTPUT, 0, c, mm,
                            out_dtype)
            x_dim1 = _cast(total.reshape(-1, total.shape[-1]), c.cast_config_input_for_grad_weight,
                           GemmInputRole.INPUT, 0, c, mm, out_dtype)
            grad_weight = torch.mm(go_dim1.t(), x_dim1)
            if ctx.fuse:
                weight.main_grad = ctx.main_grad
                weight.main_grad.add_(grad_weight)
                # as megatron-core's own linear: a placeholder gradient, and the DDP hook told that
                # main_grad already holds this one
                if hasattr(weight, "grad_added_to_main_grad"):
                    grad_weight = (torch.zeros if getattr(weight, "zero_out_wgrad", False) else torch.empty)(
                        weight.main_grad.shape, dtype=input.dtype, device=input.device)
                    weight.grad_added_to_main_grad = True
                else:
                    grad_weight = None
        return grad_input, grad_weight, None, None, None, None, None, None


def float8_linear(input, weight, bias, config, mm_config, gradient_accumulation_fusion=False, allreduce_dgrad=False,
                  sequence_parallel=False, tp_group=None):
    """The float8 counterpart of megatron-core's ``linear_with_grad_accumulation_and_async_allreduce``."""
    if tp_group is None:
        from megatron.core.parallel_state import get_tensor_model_parallel_group

        tp_group = get_tensor_model_parallel_group() if (allreduce_dgrad or sequence_parallel) else None
    out = _Float8LinearFn.apply(input, weight, config, mm_config, gradient_accumulation_fusion, allreduce_dgrad,
                                sequence_parallel, tp_group)
    return out if bias is None else out + bias


class _Float8Mixin:
    """Replaces the ``_forward_impl`` of a megatron-core parallel linear; everything else (weights,
    sharding, state dict, the row-parallel output reduction) is megatron-core's."""

    def _init_float8(self, recipe: str, emulate: bool):
        self.float8_recipe = recipe
        self.float8_config = float8_config(recipe, emulate)
        self.float8_mm_config = _mm_config(self.float8_config)

    def _forward_impl(self, input, weight, bias=None, gradient_accumulation_fusion=False, allreduce_dgrad=False,
                      sequence_parallel=False, grad_output_buffer=None, wgrad_deferral_limit=None, tp_group=None,
                      **_):
        if grad_output_buffer is not None:
            raise NotImplementedError("float8 linears do not defer the weight gradient")
        return float8_linear(input, weight, bias, self.float8_config, self.float8_mm_config,
                             gradient_accumulation_fusion and weight.requires_grad, allreduce_dgrad,
                             sequence_parallel, tp_group)

    def extra_repr(self):
        return f"float8={self.float8_recipe}{' (emulated)' if self.float8_config.emulate else ''}"


class Float8ColumnParallelLinear(_Float8Mixin, ColumnParallelLinear):
    """megatron-core's ``ColumnParallelLinear`` with its GEMMs in float8 (QKV, fc1)."""

    def __init__(self, *args, float8_recipe: str, float8_emulate: bool, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_float8(float8_recipe, float8_emulate)


class Float8RowParallelLinear(_Float8Mixin, RowParallelLinear):
    """megatron-core's ``RowParallelLinear`` with its GEMMs in float8 (attention output, fc2)."""

    def __init__(self, *args, float8_recipe: str, float8_emulate: bool, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_float8(float8_recipe, float8_emulate)


def apply_to_layer_spec(spec, recipe: str, emulate: bool):
    """``spec`` (a local layer ModuleSpec, changed in place) with its four linears in float8."""
    from megatron.core.transformer.spec_utils import ModuleSpec

    params = {"float8_recipe": recipe, "float8_emulate": emulate}
    attn, mlp = spec.submodules.self_attention.submodules, spec.submodules.mlp.submodules
    attn.linear_qkv = ModuleSpec(module=Float8ColumnParallelLinear, params=params)
    attn.linear_proj = ModuleSpec(module=Float8RowParallelLinear, params=params)
    mlp.linear_fc1 = ModuleSpec(module=Float8ColumnParallelLinear, params=params)
    mlp.linear_fc2 = ModuleSpec(module=Float8RowParallelLinear, params=params)
    return spec


