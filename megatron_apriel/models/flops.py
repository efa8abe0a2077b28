"""Model FLOPs of a training step, counted the standard way (Narayanan et al. 2021; torchtitan).

Per token, a training step costs ``6 * N`` for the dense layers (2 forward + 4 backward FLOPs per
parameter, with N the parameters that take part in matmuls: every decoder weight and the output
layer, not the embedding lookup) plus ``12 * L * (heads * head_dim) * s`` for attention scores and
the weighted sum of values (QK^T and AV, forward and backward, with the full s x s matrix, as
Megatron-LM and torchtitan count it; causal kernels skip about half of that work, so this is the
convention under which published MFU figures are comparable). Activation recomputation is not
counted: MFU measures useful work only.
"""

from __future__ import annotations

import torch

# Dense bf16 peak of common training GPUs (FLOP/s), for MFU.
PEAK_BF16_FLOPS = {
    "H100": 989e12,
    "H200": 989e12,
    "H20": 148e12,
    "A100": 312e12,
    "B200": 2250e12,
    "GH200": 989e12,
}


def matmul_params(preset) -> int:
    """Decoder weights a text token multiplies; the vision encoder runs per image patch, not per token."""
    c = preset.param_counts()
    return c["decoder"] - c["embedding"] - preset.num_layers * 2 * preset.hidden_size - c["final_norm"] + (
        0 if preset.untie_embeddings else c["embedding"]
    )


def flops_per_token(preset, seq_length: int) -> float:
    """Training FLOPs per token (forward + backward) at sequence length ``seq_length``."""
    attention = 12 * preset.num_layers * preset.num_attention_heads * preset.kv_channels * seq_length
    return 6 * matmul_params(preset) + attention


def peak_flops(device_name: str | None = None) -> float | None:
    """Dense bf16 peak of the current (or named) GPU, None when unknown."""
    if device_name is None:
        if not torch.cuda.is_available():
            return None
        device_name = torch.cuda.get_device_name()
    for key in sorted(PEAK_BF16_FLOPS, key=len, reverse=True):
        if key in device_name:
            return PEAK_BF16_FLOPS[key]
    return None


def mfu(tokens_per_second_per_gpu: float, preset, seq_length: int, device_name: str | None = None) -> float | None:
    peak = peak_flops(device_name)
    if peak is None:
        return None
    return tokens_per_second_per_gpu * flops_per_token(preset, seq_length) / peak
