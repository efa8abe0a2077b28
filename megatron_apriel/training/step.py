"""One training (or evaluation) step over micro-batches, through megatron-core's pipeline schedules.

A batch is a dict with ``tokens``, ``labels``, ``loss_mask`` and ``position_ids`` ([b, s] tensors),
plus ``packed_seq_params`` for packed sequences and, for the multimodal model, ``pixel_values`` /
``image_sizes`` (the batch contract of :mod:`megatron_apriel.models.llava`). The loss is the mean
cross-entropy over the tokens whose ``loss_mask`` is 1, taken over the whole global batch
(``calculate_per_token_loss``), so the same data gives the same loss and gradient at any TP/PP/DP
layout and micro-batch split.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region


@dataclass
class StepResult:
    loss: float  # mean loss over loss-bearing tokens of the global batch
    num_tokens: int  # loss-bearing tokens in the global batch
    grad_norm: Optional[float] = None
    update_successful: bool = True
    skipped_iter: bool = False
    nonfinite: Optional[str] = None  # "loss", "gradients" or both: the update was not applied


def gpt_forward_step(data_iterator: Iterator[dict], model: torch.nn.Module):
    """The forward_step_func handed to megatron-core's schedules."""
    batch = next(data_iterator)
    # Images only for the multimodal model (models/llava.py); a text GPTModel takes no such argument.
    images = {k: batch[k] for k in ("pixel_values", "image_sizes") if batch.get(k) is not None and batch[k].numel()}
    output = model(
        batch["tokens"],
        batch["position_ids"],
        None,
        labels=batch["labels"],
        packed_seq_params=batch.get("packed_seq_params"),
        **images,
    )
    loss_mask = batch["loss_mask"]

    def loss_func(output_tensor: torch.Tensor):
        losses = output_tensor.float().reshape(-1)
        mask = loss_mask.reshape(-1).to(losses.device, torch.float32)
        loss_sum = torch.sum(losses * mask)
        num_tokens = mask.sum().to(torch.int)
        report = torch.stack([loss_sum.detach().clone(), mask.sum().detach()])
        return loss_sum, num_tokens, {"lm loss": report}

    return output, loss_func


def _reduce_losses(losses: list[dict]) -> tuple[float, int]:
    """Sum (loss, tokens) over micro-batches, then over DP, and share from the last PP stage."""
    total = torch.zeros(2, dtype=torch.float64)
    for item in losses:
        total += item["lm loss"].detach().to("cpu", torch.float64)
    if torch.distributed.is_initialized():
        device = "cuda" if torch.cuda.is_available() and torch.distributed.get_backend() == "nccl" else "cpu"
        t = total.to(device)
        torch.distributed.all_reduce(t, group=parallel_state.get_data_parallel_group(with_context_parallel=True))
        pp_group = parallel_state.get_pipeline_model_parallel_group()
        if parallel_state.get_pipeline_model_parallel_world_size() > 1:
            last = parallel_state.get_pipeline_model_parallel_last_rank()
            torch.distributed.broadcast(t, src=last, group=pp_group)
        total = t.cpu()
    loss_sum, n = float(total[0]), int(round(float(total[1])))
    return (loss_sum / max(n, 1)), n


def _nonfinite(loss: float, chunks) -> Optional[str]:
    """What was NaN/Inf on any rank: the reduced loss, this rank's gradient buffers (one flag
    all-reduced over the world, so every rank skips or stops together). Replaces megatron-core's
    ``check_for_nan_in_grad``, which raises from inside the gradient reduction with no step number
    and no way to skip the update."""
    buffers = [b for c in chunks for b in getattr(c, "buffers", []) + getattr(c, "expert_parallel_buffers", [])]
    device = buffers[0].grad_data.device if buffers else torch.device("cpu")
    if torch.distributed.is_initialized() and torch.distributed.get_backend() != "nccl":
        device = torch.device("cpu")  # gloo reduces host tensors
    # one flag tensor built on the buffers' device: no host sync per buffer on the hot path, one for all
    grads = torch.zeros((), dtype=torch.int32, device=device)
    for buf in buffers:
        grads = torch.maximum(grads, (~torch.isfinite(buf.grad_data).all()).to(device, torch.int32))
    flags = torch.stack([torch.tensor(int(not math.isfinite(loss)), dtype=torch.int32, device=device), grads])
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
    bad = [name for name, f in zip(("loss", "gradients"), flags.tolist()) if f]
    return " and ".join(bad) or None


def _iterators(data_iterator, n_chunks):
    if n_chunks == 1:
        return data_iterator
    return data_iterator if isinstance(data_iterator, list) else [data_iterator] * n_chunks


def _schedule(chunks, forward_step: Callable, data_iterator, num_microbatches: int, seq_length: int,
              micro_batch_size: int, forward_only: bool) -> list:
    """megatron-core's pipeline schedule over the chunks: the one call every step makes. A
    forward-only pass runs with the chunks in eval mode and leaves them in train mode."""
    run = functools.partial(
        get_forward_backward_func(), forward_step_func=forward_step, data_iterator=data_iterator,
        model=chunks if len(chunks) > 1 else chunks[0], num_microbatches=num_microbatches, seq_length=seq_length,
        micro_batch_size=micro_batch_size, decoder_seq_length=seq_length, forward_only=forward_only)
    if not forward_only:
        return run()
    for chunk in chunks:
        chunk.eval()
    try:
        return run()
    finally:
        for chunk in chunks:
            chunk.train()


def train_step(
    chunks,
    optimizer,
    data_iterator,
    num_microbatches: int,
    seq_length: int,
    micro_batch_size: int,
    forward_step: Callable = gpt_forward_step,
    after_backward: Optional[Callable] = None,
) -> StepResult:
    """Forward, backward and optimizer step over ``num_microbatches`` micro-batches.

    A non-finite loss or gradient on any rank skips the optimizer step (``nonfinite`` says what);
    the caller decides whether to stop. ``after_backward(chunks)`` runs before that check (drills)."""
    for chunk in chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    losses = _schedule(chunks, forward_step, _iterators(data_iterator, len(chunks)), num_microbatches, seq_length,
                       micro_batch_size, forward_only=False)
    if after_backward is not None:
        after_backward(chunks)
    loss, n = _reduce_losses(losses)
    bad = _nonfinite(loss, chunks)
    if bad:
        return StepResult(loss=loss, num_tokens=n, update_successful=False, skipped_iter=True, nonfinite=bad)
    update_successful, grad_norm, _ = optimizer.step()
    return StepResult(
        loss=loss,
        num_tokens=n,
        grad_norm=float(grad_norm) if grad_norm is not None else None,
        update_successful=bool(update_successful),
        skipped_iter=not update_successful,
    )


@torch.no_grad()
def eval_step(chunks, data_iterator, num_microbatches: int, seq_length: int, micro_batch_size: int,
              forward_step: Callable = gpt_forward_step) -> StepResult:
    """Forward only: the mean loss over ``num_microbatches`` micro-batches (validation)."""
    losses = _schedule(chunks, forward_step, _iterators(data_iterator, len(chunks)), num_microbatches, seq_length,
                       micro_batch_size, forward_only=True)
    loss, n = _reduce_losses(losses)
    return StepResult(loss=loss, num_tokens=n)


@torch.no_grad()
def forward_logits(chunks, tokens: torch.Tensor, position_ids: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
    """Full-vocabulary logits [b, s, v] of one batch at any TP/PP layout.

    Returned on the last pipeline stage (None elsewhere); TP shards of the vocabulary are gathered.
    Used by parity tests and quick evaluations, not by training.
    """
    b, s = tokens.shape
    if position_ids is None:
        position_ids = torch.arange(s, device=tokens.device).unsqueeze(0).expand(b, -1)
    # The interleaved schedule needs at least PP micro-batches: use one sequence per micro-batch.
    mbs = 1 if len(chunks) > 1 else b
    batches = [
        {"tokens": tokens[i : i + mbs], "position_ids": position_ids[i : i + mbs]} for i in range(0, b, mbs)
    ]
    store = []

    def step(data_iterator, model):
        item = next(data_iterator)
        out = model(item["tokens"], item["position_ids"], None)

        def keep(output_tensor):
            store.append(gather_from_tensor_model_parallel_region(output_tensor))
            return torch.zeros((), device=output_tensor.device), {}

        return out, keep

    _schedule(chunks, step, iter(batches) if len(chunks) == 1 else [iter(batches) for _ in chunks], len(batches), s,
              mbs, forward_only=True)
    if not parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        return None
    return torch.cat(store, dim=0)
