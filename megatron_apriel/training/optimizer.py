"""DDP wrapping and the megatron-core optimizer (AdamW, optionally distributed) for model chunks."""

from __future__ import annotations

from dataclasses import dataclass

from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

from megatron_apriel.config import ConfigError
from megatron_apriel.models import torch_fusions


@dataclass
class OptimConfig:
    """Optimizer settings (``train.optim.*`` in the YAML configs)."""

    lr: float = 3e-4
    min_lr: float = 0.0
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    use_distributed_optimizer: bool = True
    overlap_grad_reduce: bool = False
    overlap_param_gather: bool = False
    grad_reduce_in_fp32: bool = True

    def validate(self):
        # checked at load, so the dry run refuses them too (torch's Adam would refuse some only
        # once the model is built, with a traceback)
        for key in ("lr", "min_lr", "weight_decay", "clip_grad"):
            if getattr(self, key) < 0:
                raise ConfigError(f"train.optim.{key}: must not be negative, got {getattr(self, key)}")
        if self.min_lr > self.lr:
            raise ConfigError(f"train.optim.min_lr: {self.min_lr} is above train.optim.lr {self.lr}")
        for key in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, key) < 1:
                raise ConfigError(f"train.optim.{key}: must be in [0, 1), got {getattr(self, key)}")
        if self.adam_eps <= 0:
            raise ConfigError(f"train.optim.adam_eps: must be positive, got {self.adam_eps}")


def wrap_ddp(chunks, transformer_config, optim: OptimConfig):
    """Wrap each model chunk in megatron-core's DistributedDataParallel.

    Only the first chunk uses bucketing (as in Megatron-LM): with virtual pipeline stages the other
    chunks' gradients are reduced at the end of the step.
    """
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=optim.grad_reduce_in_fp32,
        overlap_grad_reduce=optim.overlap_grad_reduce,
        overlap_param_gather=optim.overlap_param_gather,
        use_distributed_optimizer=optim.use_distributed_optimizer,
        check_for_nan_in_grad=False,  # training/step.py checks loss and gradients, names the step
        bucket_size=None,
    )
    return [
        DistributedDataParallel(
            config=transformer_config,
            ddp_config=ddp_config,
            module=chunk,
            disable_bucketing=(i > 0),
        )
        for i, chunk in enumerate(chunks)
    ]


def build_optimizer(ddp_chunks, transformer_config, optim: OptimConfig, fused_adam: bool = False):
    """megatron-core's AdamW (mixed precision when bf16) over the chunks' trainable parameters.

    ``fused_adam``: where megatron-core fell back to torch's AdamW (no TE/apex), run torch's fused
    CUDA kernel instead of its foreach one (``models.torch_fusions.fuse_adam``).

    Also installs on the TransformerConfig the hooks the pipeline schedules call: gradient
    finalisation (DP/TP/embedding all-reduces, per-token scaling), loss scaling and no_sync.
    """
    opt_config = OptimizerConfig(
        optimizer="adam",
        lr=optim.lr,
        min_lr=optim.min_lr,
        weight_decay=optim.weight_decay,
        adam_beta1=optim.adam_beta1,
        adam_beta2=optim.adam_beta2,
        adam_eps=optim.adam_eps,
        clip_grad=optim.clip_grad,
        bf16=transformer_config.bf16,
        fp16=transformer_config.fp16,
        params_dtype=transformer_config.params_dtype,
        use_distributed_optimizer=optim.use_distributed_optimizer,
        overlap_param_gather_with_optimizer_step=False,
    )
    optimizer = get_megatron_optimizer(opt_config, ddp_chunks)
    if fused_adam:
        torch_fusions.fuse_adam(optimizer)
    transformer_config.finalize_model_grads_func = finalize_model_grads
    transformer_config.grad_scale_func = optimizer.scale_loss
    no_sync = [c.no_sync for c in ddp_chunks]
    transformer_config.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync
    if optim.overlap_grad_reduce:
        grad_sync = [c.start_grad_sync for c in ddp_chunks]
        transformer_config.grad_sync_func = grad_sync[0] if len(grad_sync) == 1 else grad_sync
    if optim.overlap_param_gather and optim.use_distributed_optimizer:
        param_sync = [c.start_param_sync for c in ddp_chunks]
        transformer_config.param_sync_func = param_sync[0] if len(param_sync) == 1 else param_sync
    return optimizer
