"""Streaming reads and writes of Hugging Face safetensors checkpoints, with atomic output folders.

Every checkpoint tool (conversion, upscaling, averaging, merging) reads tensors one at a time from
memory-mapped safetensors and writes them straight into size-bounded shards, so peak memory stays
near the tensors in flight rather than the model or a shard. safetensors can only serialise a whole
dict of tensors held in memory (``save_file``), hence :class:`ShardedSafetensorsWriter`: given the
names, shapes and dtypes up front, it writes each shard's header first and then every tensor's
bytes at its final offset as the tensor is produced, in exactly the byte layout ``save_file``
would write (tensors ordered by dtype, then name; header padded with spaces to 8 bytes).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import struct
import sys
from pathlib import Path
from typing import Iterable, Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from megatron_apriel.errors import InputError

WEIGHTS_INDEX = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# The files of an HF tokenizer (and a Llava image processor): copied on export from --tokenizer and
# carried, with the config, through upscaling and averaging.
TOKENIZER_FILES = (
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
# Those whose bytes define the token ids; tokenizer_config.json is not one because SFT often only
# adds a chat template there, which does not change the ids (averaging compares these).
VOCAB_FILES = ("tokenizer.json", "tokenizer.model", "tekken.json")
# Files copied with a checkpoint folder besides the weights.
SIDE_FILES = ("config.json", "generation_config.json", *TOKENIZER_FILES)


# safetensors orders tensors by dtype (its Rust enum order, largest first) then name.
_ST_NAME = {torch.bool: "BOOL", torch.uint8: "U8", torch.int8: "I8", torch.float8_e5m2: "F8_E5M2",
            torch.float8_e4m3fn: "F8_E4M3", torch.int16: "I16", torch.uint16: "U16", torch.float16: "F16",
            torch.bfloat16: "BF16", torch.int32: "I32", torch.uint32: "U32", torch.float32: "F32",
            torch.float64: "F64", torch.int64: "I64", torch.uint64: "U64"}
ST_TORCH_DTYPES = {v: k for k, v in _ST_NAME.items()}
_ST_RANK = {name: i for i, name in enumerate(
    ("BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "F64", "I64", "U64"))}


class SafetensorsFileError(InputError):
    """An HF checkpoint file that cannot be read as it claims (the message names the file)."""


# HF weight files of a folder; Mistral's native ``consolidated*.safetensors`` beside them is another
# format of the same weights and not part of the index.
_HF_SHARD = re.compile(r"model(-\d+-of-\d+)?\.safetensors")


class SafetensorsReader:
    """Lazy access to every tensor of an HF checkpoint folder (single file or sharded with index).

    Opening checks the whole folder before anything reads a tensor, so a tool fails before it
    writes anything: the index parses, every shard it names exists and is a complete safetensors
    file (header and data: safetensors refuses a file its header does not exactly cover), each shard
    holds exactly the tensors the index puts in it, and no HF weight file lies beside the index
    unnamed. Every error names the file.
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        index = self.folder / WEIGHTS_INDEX
        if index.exists():
            try:
                with open(index) as f:
                    weight_map = json.load(f)["weight_map"]
                if not isinstance(weight_map, dict):
                    raise TypeError("weight_map is not a mapping")
            except (ValueError, KeyError, TypeError) as e:
                raise SafetensorsFileError(f"{index}: not a safetensors index ({type(e).__name__}: {e})") from None
        elif (self.folder / SINGLE_FILE).exists():
            with self._open_checked(SINGLE_FILE) as f:
                weight_map = {k: SINGLE_FILE for k in f.keys()}
        else:
            raise FileNotFoundError(f"{self.folder}: no {SINGLE_FILE} or {WEIGHTS_INDEX}")
        self.weight_map: dict[str, str] = weight_map
        self._handles: dict[str, object] = {}
        self._stack = contextlib.ExitStack()
        if index.exists():
            self._check_index(index)

    def _open_checked(self, filename: str):
        path = self.folder / filename
        try:
            return safe_open(path, "pt")
        except Exception as e:  # safetensors' Rust errors have no common Python base class
            raise SafetensorsFileError(f"{path}: not a complete safetensors file ({e})") from None

    def _check_index(self, index: Path) -> None:
        by_file: dict[str, set[str]] = {}
        for name, filename in self.weight_map.items():
            by_file.setdefault(filename, set()).add(name)
        for filename, names in sorted(by_file.items()):
            if not (self.folder / filename).is_file():
                raise FileNotFoundError(f"{self.folder / filename}: listed in {index.name} but missing")
            with self._open_checked(filename) as f:
                stored = set(f.keys())
            if stored != names:
                diff = sorted(names - stored)[:3] or sorted(stored - names)[:3]
                where = "missing from the file" if names - stored else "in the file but not in the index"
                raise SafetensorsFileError(f"{self.folder / filename}: tensors {', '.join(diff)} {where} ({index.name} "
                                           f"lists {len(names)}, the file holds {len(stored)})")
        stray = sorted(p.name for p in self.folder.iterdir() if _HF_SHARD.fullmatch(p.name) and p.name not in by_file)
        if stray:
            raise SafetensorsFileError(f"{self.folder / stray[0]}: a weight file {index.name} does not name")

    def _handle(self, filename: str):
        if filename not in self._handles:
            path = self.folder / filename
            if not path.exists():
                raise FileNotFoundError(f"{path}: listed in {WEIGHTS_INDEX} but missing")
            self._handles[filename] = self._stack.enter_context(self._open_checked(filename))
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

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` of a tensor, copied out of the mapping (only those pages are read)."""
        if name not in self.weight_map:
            raise KeyError(f"{self.folder}: tensor {name!r} not in checkpoint")
        return self._handle(self.weight_map[name]).get_slice(name)[start:stop]

    def shape(self, name: str) -> list[int]:
        return list(self._handle(self.weight_map[name]).get_slice(name).get_shape())

    def dtype(self, name: str) -> str:
        return self._handle(self.weight_map[name]).get_slice(name).get_dtype()

    def torch_dtype(self, name: str) -> torch.dtype:
        st = self.dtype(name)
        if st not in ST_TORCH_DTYPES:
            raise ValueError(f"{self.folder}: tensor {name!r} has dtype {st}, which torch cannot hold")
        return ST_TORCH_DTYPES[st]

    def close(self) -> None:
        self._stack.close()
        self._handles.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


def _nbytes(shape, dtype: torch.dtype) -> int:
    n = dtype.itemsize
    for s in shape:
        n *= int(s)
    return n


def safetensors_header(entries: list[tuple[str, tuple[int, ...], torch.dtype]], metadata: dict
                       ) -> tuple[bytes, dict[str, int]]:
    """The bytes ``save_file`` writes before the data, and each tensor's offset in the file."""
    ordered = sorted(entries, key=lambda e: (-_ST_RANK[_ST_NAME[e[2]]], e[0]))
    body, offsets, pos = {"__metadata__": metadata} if metadata else {}, {}, 0
    for name, shape, dtype in ordered:
        size = _nbytes(shape, dtype)
        body[name] = {"dtype": _ST_NAME[dtype], "shape": [int(s) for s in shape], "data_offsets": [pos, pos + size]}
        offsets[name] = pos
        pos += size
    text = json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    header = struct.pack("<Q", len(text)) + text
    return header, {name: len(header) + off for name, off in offsets.items()}


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while len(data):
        n = os.pwrite(fd, data, offset)
        data, offset = data[n:], offset + n


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    return memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy())


class ShardedSafetensorsWriter:
    """Write tensors one by one into shards of at most ``max_shard_bytes`` plus the HF index.

    With ``layout`` (every ``(name, shape, dtype)`` in the order they will be added) shard
    boundaries and offsets are known before any data: a shard's file is created with its header on
    its first tensor and each tensor is written at its place as it arrives (:meth:`add`, or
    :meth:`add_parts` for a tensor produced in row blocks), so nothing is held back. Without a
    layout, tensors are held until their shard is full and written with ``save_file``. Both give
    the same bytes. Shards are named ``model-00001-of-0000N.safetensors`` once N is known (renamed
    in ``close``), as ``save_pretrained`` does; a single shard is written as ``model.safetensors``
    without index.
    """

    def __init__(self, folder: str | os.PathLike, max_shard_bytes: int = 5 * 1024**3, metadata: dict | None = None,
                 layout: list[tuple[str, tuple[int, ...], torch.dtype]] | None = None):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.max_shard_bytes = max_shard_bytes
        self.metadata = {"format": "pt", **(metadata or {})}
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[list[str]] = []
        self.total_bytes = 0
        self.num_tensors = 0
        self._layout: dict[str, tuple[int, tuple[int, ...], torch.dtype]] | None = None
        if layout is not None:
            self._plan(layout)

    # ----------------------------------------------------------------- streaming (layout given)
    def _plan(self, layout) -> None:
        self._layout, shard, size = {}, [], 0
        for name, shape, dtype in layout:
            if name in self._layout:
                raise ValueError(f"tensor {name!r} listed twice in the layout")
            if dtype not in _ST_NAME:
                raise ValueError(f"tensor {name!r}: dtype {dtype} has no safetensors name")
            nbytes = _nbytes(shape, dtype)
            if shard and size + nbytes > self.max_shard_bytes:
                self._shards.append(shard)
                shard, size = [], 0
            self._layout[name] = (len(self._shards), tuple(int(s) for s in shape), dtype)
            shard.append(name)
            size += nbytes
        if shard:
            self._shards.append(shard)
        self._fds: dict[int, int] = {}
        self._left = [len(names) for names in self._shards]
        self._offsets: dict[str, int] = {}
        self._written: set[str] = set()

    def _open_shard(self, idx: int) -> int:
        if idx not in self._fds:
            names = self._shards[idx]
            header, offsets = safetensors_header([(n, *self._layout[n][1:]) for n in names], self.metadata)
            self._offsets.update(offsets)
            path = self.folder / f".shard-{idx:05d}.safetensors"
            # 0666 less the umask, as open() gives (not a fixed 0644: a group-shared run asks 0664)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
            self._fds[idx] = fd
            _pwrite_all(fd, memoryview(header), 0)
            os.ftruncate(fd, len(header) + sum(_nbytes(*self._layout[n][1:]) for n in names))
        return self._fds[idx]

    def _stream(self, name: str, parts: Iterable[torch.Tensor]) -> None:
        if name not in self._layout:
            raise ValueError(f"tensor {name!r} is not in the writer's layout")
        if name in self._written:
            raise ValueError(f"tensor {name!r} written twice")
        idx, shape, dtype = self._layout[name]
        fd = self._open_shard(idx)
        pos, end = self._offsets[name], self._offsets[name] + _nbytes(shape, dtype)
        for part in parts:
            if part.dtype != dtype or tuple(part.shape[1:]) != shape[1:]:
                raise ValueError(f"tensor {name!r}: got a {part.dtype} block of shape {tuple(part.shape)} "
                                 f"for a {dtype} tensor of shape {shape}")
            data = _tensor_bytes(part)
            if pos + len(data) > end:
                raise ValueError(f"tensor {name!r}: more data than its shape {shape}")
            _pwrite_all(fd, data, pos)
            pos += len(data)
            del data, part  # the caller's generator can free this block before making the next
        if pos != end:
            raise ValueError(f"tensor {name!r}: {end - pos} bytes short of its shape {shape}")
        self._written.add(name)
        self.total_bytes += _nbytes(shape, dtype)
        self.num_tensors += 1
        self._left[idx] -= 1
        if self._left[idx] == 0:
            os.close(self._fds.pop(idx))

    def add_parts(self, name: str, parts: Iterable[torch.Tensor]) -> None:
        """Write one tensor given as consecutive row blocks (dim 0) of its full shape; needs a layout."""
        if self._layout is None:
            raise ValueError("add_parts needs a writer built with a layout")
        self._stream(name, parts)

    # ----------------------------------------------------------------------------------- common
    def add(self, name: str, tensor: torch.Tensor) -> None:
        if self._layout is not None:
            if name in self._layout and tuple(tensor.shape) != self._layout[name][1]:
                raise ValueError(f"tensor {name!r}: shape {tuple(tensor.shape)} but the layout says "
                                 f"{self._layout[name][1]}")
            self._stream(name, [tensor.reshape(-1)] if tensor.dim() == 0 else [tensor])
            return
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

    def abort(self) -> None:
        """Close any open shard file (the caller removes the folder)."""
        for fd in getattr(self, "_fds", {}).values():
            os.close(fd)
        if self._layout is not None:
            self._fds = {}

    def close(self) -> None:
        if self._layout is not None:
            missing = [n for n in self._layout if n not in self._written]
            if missing:
                self.abort()
                more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
                raise ValueError(f"{len(missing)} tensors of the layout were never written: "
                                 f"{', '.join(missing[:5])}{more}")
        else:
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


def write_output_dir(out: str | os.PathLike, write, force: bool = False) -> None:
    """``write(folder)`` on every rank into one temporary folder that becomes ``out`` when all are done.

    One process: :func:`atomic_output_dir`. Under torch.distributed, rank 0 owns the temporary folder
    (its name is broadcast), every rank writes its part, and rank 0 renames it after a barrier; an
    error on rank 0 removes it and leaves ``out`` untouched.
    """
    dist = torch.distributed
    if not dist.is_initialized() or dist.get_world_size() == 1:
        with atomic_output_dir(out, force=force) as tmp:
            write(tmp)
        return
    box = [None]
    ctx = atomic_output_dir(out, force=force) if dist.get_rank() == 0 else None
    if ctx is not None:
        box[0] = str(ctx.__enter__())
    dist.broadcast_object_list(box, src=0)
    try:
        write(Path(box[0]))
        dist.barrier()
    except BaseException:
        if ctx is not None:
            ctx.__exit__(*sys.exc_info())
        raise
    if ctx is not None:
        ctx.__exit__(None, None, None)
    dist.barrier()


def copy_side_files(src: str | os.PathLike, dst: str | os.PathLike, skip: tuple[str, ...] = ()) -> list[str]:
    """Copy config/tokenizer/chat-template files of an HF folder (weights excluded)."""
    copied = []
    for name in SIDE_FILES:
        if name in skip:
            continue
        path = Path(src) / name
        if path.exists():
            shutil.copyfile(path, Path(dst) / name)  # the mode from the umask, not the source's
            copied.append(name)
    return copied


def copy_vocab_files(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Make ``dst``'s vocabulary files (:data:`VOCAB_FILES`) byte copies of ``src``'s: a file ``src``
    lacks is removed from ``dst``. Averaging compares these bytes ("same tokenizer")."""
    for name in VOCAB_FILES:
        if (Path(dst) / name).exists() and not (Path(src) / name).exists():
            (Path(dst) / name).unlink()
        if (Path(src) / name).exists():
            shutil.copyfile(Path(src) / name, Path(dst) / name)
