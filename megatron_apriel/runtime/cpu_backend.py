"""Run megatron-core on a machine without CUDA.

megatron-core assumes CUDA in a few places that are not about compute: it allocates buffers with
``device=torch.cuda.current_device()``, calls ``.cuda()`` on modules and tensors, saves and restores
the CUDA RNG state for its tensor-parallel RNG tracker, calls ``torch.cuda.synchronize()``, and the
optimizer asserts that ``param.type()`` is a ``torch.cuda.*Tensor`` name. Everything else (TP, PP,
DDP, the distributed optimizer, dist_checkpointing) is plain torch.distributed and works with gloo.

This module makes those CUDA assumptions hold on the CPU so the whole project can be built and
tested on CPU-only machines (CI, laptops). It is self-contained and has exactly one entry point,
:func:`activate`, which is called by :func:`megatron_apriel.runtime.init_distributed` only when CUDA
is absent or ``device="cpu"`` is requested explicitly. It never runs on a GPU job: ``activate``
refuses when CUDA is available unless the caller forces the CPU device.

What it does, and why each piece is needed:

* a ``TorchFunctionMode`` that rewrites ``device=cuda`` / integer device arguments to ``cpu``,
  turns ``Tensor.cuda()`` into a no-op, and answers ``Tensor.type()`` with the ``torch.cuda.*``
  name (the mixed-precision optimizer asserts on it);
* ``torch.nn.Module.cuda`` becomes a no-op (megatron calls ``model.cuda()``);
* ``torch.cuda.current_device / synchronize / device_count / get_rng_state / set_rng_state /
  manual_seed`` and megatron's ``_get/_set_cuda_rng_state`` redirect to the CPU generator, so the
  TP RNG tracker forks the CPU generator instead (dropout and init stay reproducible);
* ``torch.cuda.Stream`` / ``Event`` / ``stream()`` / ``current_stream`` become inert stand-ins, used
  by megatron's overlap code paths (which never overlap anything on CPU).
"""

from __future__ import annotations

import contextlib
import threading

import torch
from torch.overrides import TorchFunctionMode

_STATE = {"active": False, "mode": None}
_LOCK = threading.Lock()

_CUDA_TYPE_NAMES = {
    torch.float32: "torch.cuda.FloatTensor",
    torch.float16: "torch.cuda.HalfTensor",
    torch.bfloat16: "torch.cuda.BFloat16Tensor",
    torch.float64: "torch.cuda.DoubleTensor",
    torch.int64: "torch.cuda.LongTensor",
    torch.int32: "torch.cuda.IntTensor",
    torch.uint8: "torch.cuda.ByteTensor",
    torch.bool: "torch.cuda.BoolTensor",
}


def _is_cuda_device(dev) -> bool:
    if dev is None:
        return False
    if isinstance(dev, bool):
        return False
    if isinstance(dev, int):
        return True  # an ordinal means a CUDA device to torch
    if isinstance(dev, str):
        return dev.startswith("cuda")
    if isinstance(dev, torch.device):
        return dev.type == "cuda"
    return False


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA device requests to the CPU for every torch function call."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            return _CUDA_TYPE_NAMES.get(args[0].dtype, func(*args))
        if func is torch.Tensor.is_cuda.__get__:
            return True
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs["device"] = "cpu"
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


class _NullStream:
    """Inert stand-in for torch.cuda.Stream/Event: CPU ops are synchronous already."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, *args, **kwargs):
        pass

    def wait_event(self, *args, **kwargs):
        pass

    def record_event(self, *args, **kwargs):
        return _NullStream()

    def record(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def elapsed_time(self, other):
        return 0.0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _cpu_get_rng_state(device="cuda", *args, **kwargs):
    return torch.get_rng_state()


def _cpu_set_rng_state(new_state, device=-1, *args, **kwargs):
    torch.set_rng_state(new_state)


def is_active() -> bool:
    return _STATE["active"]


def activate(force: bool = False) -> None:
    """Install the CPU shims (idempotent).

    Refuses when CUDA is available unless ``force`` is set (the user asked for ``--device cpu``):
    a GPU job must never run through this path by accident.
    """
    with _LOCK:
        if _STATE["active"]:
            return
        if torch.cuda.is_available() and not force:
            raise RuntimeError(
                "cpu_backend.activate() called on a machine with CUDA; pass device='cpu' to force it"
            )
        cuda = torch.cuda
        cuda.current_device = lambda: 0
        cuda.synchronize = lambda *a, **k: None
        cuda.device_count = lambda: 0
        cuda.get_rng_state = _cpu_get_rng_state
        cuda.set_rng_state = _cpu_set_rng_state
        cuda.random.get_rng_state = _cpu_get_rng_state
        cuda.random.set_rng_state = _cpu_set_rng_state
        # torch.manual_seed itself calls cuda.manual_seed_all, so seed the CPU generator directly
        # and make manual_seed_all a no-op (there are no CUDA generators to seed).
        cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
        cuda.manual_seed_all = lambda seed: None
        cuda.Stream = _NullStream
        cuda.Event = _NullStream
        cuda.current_stream = lambda *a, **k: _NullStream()
        cuda.default_stream = lambda *a, **k: _NullStream()
        cuda.stream = lambda *a, **k: contextlib.nullcontext()
        cuda.empty_cache = lambda: None
        cuda.memory_allocated = lambda *a, **k: 0
        cuda.max_memory_allocated = lambda *a, **k: 0
        cuda.reset_peak_memory_stats = lambda *a, **k: None
        cuda.set_device = lambda *a, **k: None
        torch.nn.Module.cuda = lambda self, *a, **k: self

        # imported once torch.cuda is patched above, and only when the CPU backend is wanted
        from megatron.core.tensor_parallel import random as mc_random

        mc_random._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
        mc_random._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)

        mode = _CudaToCpuMode()
        # Entered once and never exited: the process lifetime is the job lifetime. Torch function
        # modes are per thread, so this covers the main thread, where megatron-core does its work.
        mode.__enter__()
        _STATE["mode"] = mode
        _STATE["active"] = True
