"""Training checkpoints with megatron-core ``dist_checkpointing``, in Megatron-LM's folder layout.

``<save>/iter_0000100/`` holds one distributed checkpoint (model, optimizer, scheduler, RNG,
iteration, consumed samples) plus ``run_config.yaml``; ``<save>/latest_checkpointed_iteration.txt``
names the newest *complete* one. The marker is written (atomically) only after every rank has
finished writing and the folder's manifest (:mod:`megatron_apriel.checkpoint.manifest`: every
file's size, CRC32 of the small ones) was written and verified, so a save interrupted by a crash or
a kill is never picked up by a resume, and retention never removes the last verified checkpoint
before the new one verifies.
Retention keeps the last K checkpoints plus every M-th, so equispaced ones survive for averaging.

What is hand-written here is only the bookkeeping around megatron-core's save/load: the marker,
retention, and the choice between a full resume and a weights-only start. The folder helpers
(``iter_dir``, ``read_latest``, ``resolve_load_dir``) live in :mod:`megatron_apriel.checkpoint.dcp_io`,
which the converters and the averaging tool share.
"""

from __future__ import annotations

import os
import random
import shutil
from typing import Callable, Optional

import numpy as np
import torch
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core import parallel_state as ps
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy, load_common_state_dict
from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

from megatron_apriel.checkpoint.dcp_io import (  # noqa: F401  (the folder helpers, re-exported for the loop)
    TRACKER,
    iter_dir,
    list_iterations,
    read_latest,
    resolve_load_dir,
)
from megatron_apriel.checkpoint.manifest import write_manifest
from megatron_apriel.config import ConfigError, atomic_write_text
from megatron_apriel.runtime.log import is_rank0 as _is_rank0

CONFIG_NAME = "run_config.yaml"


def retained(iterations: list[int], keep_last: Optional[int], keep_every: Optional[int]) -> set[int]:
    """The iterations kept: the last ``keep_last`` plus every multiple of ``keep_every``."""
    if keep_last is None:
        return set(iterations)
    keep = set(sorted(iterations)[-keep_last:]) if keep_last > 0 else set()
    if keep_every:
        keep |= {i for i in iterations if i % keep_every == 0}
    return keep


def _unwrap(chunk):
    return chunk.module if hasattr(chunk, "module") else chunk


def _model_keys(n: int) -> list[str]:
    return ["model"] if n == 1 else [f"model{i}" for i in range(n)]


def _rng_object():
    """This rank's RNG states as a ShardedObject (one per TP/PP rank, replicated over DP)."""

    state = {
        "random_rng_state": random.getstate(),
        "np_rng_state": np.random.get_state(),
        "torch_rng_state": torch.get_rng_state(),
        "cuda_rng_state": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "rng_tracker_states": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    pp_size = parallel_state.get_pipeline_model_parallel_world_size()
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    return ShardedObject("rng_state", [state], (pp_size, tp_size), (pp_rank, tp_rank),
                         replica_id=parallel_state.get_data_parallel_rank(with_context_parallel=True))


def _restore_rng(state: dict) -> None:

    random.setstate(state["random_rng_state"])
    np.random.set_state(state["np_rng_state"])
    torch.set_rng_state(state["torch_rng_state"])
    if state.get("cuda_rng_state") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda_rng_state"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["rng_tracker_states"])


def _ensure_optimizer_state(optimizer) -> None:
    """Give an optimizer that has not stepped torch AdamW's initial state (``step`` 0, zero moments).

    Without Apex/TE, megatron-core's DistributedOptimizer.state_dict() reads ``step`` from every
    param state, but its init_state_fn creates only exp_avg/exp_avg_sq, so saving before the first
    step, or loading into a fresh optimizer, fails. The values are exactly what AdamW's lazy
    initialisation would create, and a load overwrites them.
    """
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if inner is None:
            continue
        for group in inner.param_groups:
            for p in group["params"]:
                if len(inner.state[p]) == 0:
                    inner.state[p]["step"] = torch.tensor(0.0)
                    inner.state[p]["exp_avg"] = torch.zeros_like(p.data)
                    inner.state[p]["exp_avg_sq"] = torch.zeros_like(p.data)


def _unshare_adam_steps(optimizer) -> None:
    """Restore torch AdamW's per-parameter ``step`` after a load.

    Without Apex/TE, megatron-core 0.16 keeps the step of a DistributedOptimizer in its param
    groups, but the per-parameter state it loads ends up with step 0 (and one tensor shared by all
    parameters, which AdamW increments in place once per parameter). The bias correction after a
    resume would then differ from the uninterrupted run; this puts the saved step back, one tensor
    per parameter.
    """
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if inner is None:
            continue
        for group in inner.param_groups:
            step = group.get("step")
            for p in group["params"]:
                state = inner.state.get(p)
                if state and torch.is_tensor(state.get("step")):
                    value = float(step) if step is not None else float(state["step"])
                    state["step"] = torch.tensor(value, dtype=state["step"].dtype)


OPTIMIZER_FORMATS = ("dp_reshardable", "fully_reshardable")


def _optimizer_sharded(optimizer, model_sd, is_loading: bool, distributed: bool, fmt: str = "dp_reshardable"):
    """The optimizer's sharded state dict in megatron-core's format ``fmt``.

    ``dp_reshardable`` (Megatron-LM's default) stores each rank's flat buffer shard: cheap, but a
    full resume needs the same TP/PP. ``fully_reshardable`` gathers every parameter's state in model
    space on DP rank 0 when saving, so a resume may change TP, PP and DP.
    """
    _ensure_optimizer_state(optimizer)
    if distributed:
        return optimizer.sharded_state_dict(model_sd, is_loading=is_loading,
                                           metadata={"distrib_optim_sharding_type": fmt})
    return optimizer.sharded_state_dict(model_sd, is_loading=is_loading)


def _load_optimizer(optimizer, state_dict) -> None:
    """``optimizer.load_state_dict`` that also works for ``fully_reshardable`` without Apex/TE.

    megatron-core 0.16's fully-reshardable load copies every key of the live per-parameter state
    into place, but the saved state has no torch-AdamW ``step`` (it is kept in the param groups),
    so it fails with KeyError 'step'. The common part is loaded first, then the parameter state
    with ``step`` set aside for the duration of the copy; :func:`_unshare_adam_steps` restores it.
    """
    opts = list(getattr(optimizer, "chained_optimizers", [optimizer]))
    parts = [state_dict] if len(opts) == 1 else [v for _, v in sorted(state_dict.items())]
    for opt, sd in zip(opts, parts):
        if sd.get("param_state_sharding_type") != "fully_reshardable" or not hasattr(opt, "optimizer"):
            opt.load_state_dict(sd)
            continue
        sd = dict(sd)
        param_state = sd.pop("param_state")
        sd.pop("param_state_sharding_type")
        opt.load_state_dict(sd)
        inner = opt.optimizer.state
        steps = {p: st.pop("step") for p, st in inner.items() if "step" in st}
        try:
            opt.load_parameter_state_from_fully_reshardable(param_state)
        finally:
            for p, step in steps.items():
                inner[p]["step"] = step
    if len(opts) > 1:
        optimizer._synchronize_steps()


def _layout() -> dict:
    return {"tp": ps.get_tensor_model_parallel_world_size(), "pp": ps.get_pipeline_model_parallel_world_size(),
            "dp": ps.get_data_parallel_world_size()}


def _barrier():
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


class Checkpointer:
    """Saves (sync or async) and loads training checkpoints under one ``save`` root."""

    def __init__(self, save: Optional[str], keep_last: Optional[int] = None, keep_every: Optional[int] = None,
                 async_save: bool = False, distributed_optimizer: bool = False,
                 optimizer_format: str = "dp_reshardable",
                 write_config: Optional[Callable[[str], None]] = None, log=print, checksum_all: bool = False):
        self.save_root = save
        self.keep_last = keep_last
        self.keep_every = keep_every
        self.async_save = async_save
        self.distributed_optimizer = distributed_optimizer
        if optimizer_format not in OPTIMIZER_FORMATS:
            raise ValueError(f"checkpoint.optimizer_format: {optimizer_format!r} is not one of "
                             f"{', '.join(OPTIMIZER_FORMATS)}")
        self.optimizer_format = optimizer_format
        self.write_config = write_config
        self.log = log
        self.checksum_all = checksum_all
        self.last_bytes: Optional[int] = None  # size of the newest checkpoint saved (rank 0)
        self._queue = None
        if async_save:
            self._queue = AsyncCallsQueue(persistent=False)

    # ------------------------------------------------------------------ save
    def save(self, iteration: int, chunks, optimizer, scheduler, consumed_samples: int, extra: Optional[dict] = None):
        if not self.save_root:
            return
        self.finalize(blocking=True)  # one save in flight at a time
        path = iter_dir(self.save_root, iteration)
        if _is_rank0():
            # A folder left by an interrupted save of the same iteration: start it afresh.
            if os.path.exists(path):
                shutil.rmtree(path)
            os.makedirs(path)
        _barrier()
        state = self._state(chunks, optimizer, scheduler, is_loading=False)
        state.update(iteration=iteration, consumed_samples=consumed_samples, layout=_layout(),
                     checkpoint_version=3.0, optimizer_format=self.optimizer_format, **(extra or {}))
        strategy = get_default_save_sharded_strategy("torch_dist")
        request = dist_checkpointing.save(state, path, strategy, async_sharded_save=self.async_save)

        def finalize_fn():
            # Runs after every rank's shards are written (the async queue all-reduces completion).
            _barrier()
            if _is_rank0():
                if self.write_config is not None:
                    self.write_config(os.path.join(path, CONFIG_NAME))
                self.last_bytes = write_manifest(path, self.checksum_all)
                atomic_write_text(os.path.join(self.save_root, TRACKER), f"{iteration}\n")
                self._prune(iteration)
            _barrier()
            self.log(f"saved checkpoint {path}")

        if self.async_save:
            request.add_finalize_fn(finalize_fn)
            self._queue.schedule_async_request(request)
        else:
            finalize_fn()

    def finalize(self, blocking: bool = False) -> None:
        if self._queue is not None:
            self._queue.maybe_finalize_async_calls(blocking=blocking)

    def close(self) -> None:
        if self._queue is not None:
            self._queue.maybe_finalize_async_calls(blocking=True)
            self._queue.close()
            self._queue = None

    def _prune(self, newest: int) -> None:
        its = list_iterations(self.save_root)
        keep = retained(its, self.keep_last, self.keep_every) | {newest}
        for it in its:
            if it not in keep and it < newest:
                shutil.rmtree(iter_dir(self.save_root, it), ignore_errors=True)

    def _state(self, chunks, optimizer, scheduler, is_loading: bool, weights_only: bool = False,
               with_rng: bool = True, optimizer_format: Optional[str] = None) -> dict:
        state = {key: _unwrap(chunk).sharded_state_dict() for key, chunk in zip(_model_keys(len(chunks)), chunks)}
        if weights_only:
            return state
        if optimizer is not None:
            merged = state["model"] if len(chunks) == 1 else _merge(state, len(chunks))
            state["optimizer"] = _optimizer_sharded(optimizer, merged, is_loading, self.distributed_optimizer,
                                                    optimizer_format or self.optimizer_format)
        if scheduler is not None:
            state["opt_param_scheduler"] = scheduler.state_dict()
        if with_rng:
            state["rng_state"] = _rng_object()
        return state

    # ------------------------------------------------------------------ load
    def load(self, path: str, chunks, optimizer, scheduler, mode: str = "full") -> tuple[int, int]:
        """Load ``path`` into the chunks (and optimizer/scheduler/RNG for ``mode='full'``).

        Returns (iteration, consumed_samples): (0, 0) for a weights-only start. The model is
        resharded by megatron-core when the saving run had another TP/PP; the RNG state is skipped
        then (it is per TP/PP rank), the optimizer state is resharded.
        """
        ckpt, _ = resolve_load_dir(path)
        common = load_common_state_dict(ckpt)
        saved_layout = common.get("layout", {})
        now = _layout()
        full = mode == "full"
        if full and "iteration" not in common:
            raise ValueError(f"{ckpt}: not a training checkpoint (no iteration); load it with "
                             "checkpoint.load_mode=weights")
        same_mp = saved_layout.get("tp") == now["tp"] and saved_layout.get("pp") == now["pp"]
        saved_format = common.get("optimizer_format", "dp_reshardable")
        resharded = not same_mp and saved_format != "fully_reshardable"
        if full and optimizer is not None and self.distributed_optimizer and resharded:
            raise ConfigError(
                f"{ckpt}: saved at tp={saved_layout.get('tp')} pp={saved_layout.get('pp')} with optimizer format "
                f"{saved_format}; a full resume at tp={now['tp']} pp={now['pp']} needs a checkpoint saved with "
                "checkpoint.optimizer_format=fully_reshardable (or load the weights only: "
                "checkpoint.load_mode=weights)")
        state = self._state(chunks, optimizer, scheduler, is_loading=True, weights_only=not full,
                            with_rng=full and same_mp, optimizer_format=saved_format)
        loaded = dist_checkpointing.load(state, ckpt)
        for key, chunk in zip(_model_keys(len(chunks)), chunks):
            _unwrap(chunk).load_state_dict(loaded[key], strict=True)
        if not full:
            self.log(f"loaded weights from {ckpt} (saved at tp={saved_layout.get('tp')} pp={saved_layout.get('pp')})")
            return 0, 0
        if optimizer is not None:
            with torch.no_grad():  # fp32 main params are views of the model's leaf parameters
                _load_optimizer(optimizer, loaded["optimizer"])
            _unshare_adam_steps(optimizer)
        if scheduler is not None:
            scheduler.load_state_dict(loaded["opt_param_scheduler"])
        if "rng_state" in loaded:
            _restore_rng(loaded["rng_state"][0])
        it, consumed = int(loaded["iteration"]), int(loaded["consumed_samples"])
        self.log(f"resumed from {ckpt}: iteration {it}, consumed samples {consumed}")
        return it, consumed


def _merge(state: dict, n: int) -> dict:
    out = {}
    for key in _model_keys(n):
        out.update({f"{key}.{k}": v for k, v in state[key].items()})
    return out
