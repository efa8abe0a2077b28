"""Streaming reads and writes of Hugging Face safetensors checkpoints, with atomic output folders.

Every checkpoint tool (conversion, upscaling, averaging, merging) reads tensors one at a time from
memory-mapped safetensors and writes them into size-bounded shards, so peak memory stays near one
shard plus the tensors in flight rather than the model size. safetensors has no writer that appends
tensor by tensor to a sharded folder, hence :class:`ShardedSafetensorsWriter`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file

WEIGHTS_INDEX = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# Files copied with a checkpoint folder besides the weights.
SIDE_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "tekken.json",
    "chat_template.jinja",
    "chat_template.json",
    "preprocessor_config.json",
    "processor_config.json",
)


class SafetensorsReader:
    """Lazy access to every tensor of an HF checkpoint folder (single file or sharded with index)."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        index = self.folder / WEIGHTS_INDEX
        if index.exists():
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        elif (self.folder / SINGLE_FILE).exists():
            with safe_open(self.folder / SINGLE_FILE, "pt") as f:
                weight_map = {k: SINGLE_FILE for k in f.keys()}
        else:
            raise FileNotFoundError(f"{self.folder}: no {SINGLE_FILE} or {WEIGHTS_INDEX}")
        self.weight_map: dict[str, str] = weight_map
        self._handles: dict[str, object] = {}
        self._stack = contextlib.ExitStack()

    def _handle(self, filename: str):
        if filename not in self._handles:
            path = self.folder / filename
            if not path.exists():
                raise FileNotFoundError(f"{path}: listed in {WEIGHTS_INDEX} but missing")
            self._handles[filename] = self._stack.enter_context(safe_open(path, "pt"))
        return self._handles[filename]

    def keys(self) -> list[str]:
        return list(self.weight_map)

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def get(self, name: str) -> torch.Tensor:
        if name not in self.weight_map:
            raise KeyError(f"{self.folder}: tensor {name!r} not in checkpoint")
        return self._handle(self.weight_map[name]).get_tensor(name)

    __getitem__ = get

    def shape(self, name: str) -> list[int]:
        return list(self._handle(self.weight_map[name]).get_slice(name).get_shape())

    def dtype(self, name: str) -> str:
        return self._handle(self.weight_map[name]).get_slice(name).get_dtype()

    def close(self) -> None:
        self._stack.close()
        self._handles.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


class ShardedSafetensorsWriter:
    """Write tensors one by one into shards of at most ``max_shard_bytes`` plus the HF index.

    Shards are named ``model-00001-of-0000N.safetensors`` once N is known (renamed in ``close``),
    as ``save_pretrained`` does. A single shard is written as ``model.safetensors`` without index.
    """

    def __init__(self, folder: str | os.PathLike, max_shard_bytes: int = 5 * 1024**3, metadata: dict | None = None):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.max_shard_bytes = max_shard_bytes
        self.metadata = {"format": "pt", **(metadata or {})}
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[list[str]] = []
        self.total_bytes = 0
        self.num_tensors = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._pending or any(name in s for s in self._shards):
            raise ValueError(f"tensor {name!r} written twice")
        nbytes = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        self._pending[name] = tensor.contiguous()
        self._pending_bytes += nbytes
        self.total_bytes += nbytes
        self.num_tensors += 1

    def _flush(self) -> None:
        if not self._pending:
            return
        idx = len(self._shards)
        save_file(self._pending, str(self.folder / f".shard-{idx:05d}.safetensors"), metadata=self.metadata)
        self._shards.append(list(self._pending))
        self._pending = {}
        self._pending_bytes = 0

    def close(self) -> None:
        self._flush()
        n = len(self._shards)
        if n == 1:
            os.replace(self.folder / ".shard-00000.safetensors", self.folder / SINGLE_FILE)
            return
        weight_map = {}
        for i, names in enumerate(self._shards):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(self.folder / f".shard-{i:05d}.safetensors", self.folder / final)
            weight_map.update({name: final for name in names})
        with open(self.folder / WEIGHTS_INDEX, "w") as f:
            json.dump({"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}, f, indent=2)


@contextlib.contextmanager
def atomic_output_dir(out: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``out``; rename it to ``out`` only if the block succeeds.

    A non-empty ``out`` is refused unless ``force`` (then it is replaced only after the new one is
    complete). On any error the temporary folder is removed and ``out`` is untouched.
    """
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not force:
        raise FileExistsError(f"{out} exists and is not empty (use --force to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def copy_side_files(src: str | os.PathLike, dst: str | os.PathLike, skip: tuple[str, ...] = ()) -> list[str]:
    """Copy config/tokenizer/chat-template files of an HF folder (weights excluded)."""
    copied = []
    for name in SIDE_FILES:
        if name in skip:
            continue
        path = Path(src) / name
        if path.exists():
            shutil.copy2(path, Path(dst) / name)
            copied.append(name)
    return copied
