"""Verified checkpoints: a manifest of every file of a checkpoint, written before the tracker moves.

``iter_*/manifest.json`` lists each file of the checkpoint folder with its size, and a CRC32 of the
files up to ``CRC_MAX_BYTES`` (megatron-core's ``metadata.json``, ``common.pt``, the run config:
the small files a load reads first) or of every file with ``checksum_all``. Sizes are the
documented cheaper check for the large shard files: what kills a checkpoint in practice is a file
missing or cut short (a job killed mid-write, a quota, a node that died before its file system
flushed), which a size catches at the cost of a ``stat``; hashing hundreds of GB of optimizer state
on every save would cost minutes of a run's time. Bit rot inside a shard is left to the file
system's own checksums unless ``checksum_all`` is set.

:func:`write_manifest` runs on one rank after every rank's files are written and verifies what it
wrote, so the tracker (``latest_checkpointed_iteration.txt``) only ever names a checkpoint that was
complete on disk. :func:`newest_verified` walks back from the tracker on load.
"""

from __future__ import annotations

import json
import os
import zlib
from typing import Callable, Optional

from megatron_apriel.checkpoint.dcp_io import iter_dir, list_iterations, read_latest
from megatron_apriel.config import atomic_write_text
from megatron_apriel.errors import RunError

MANIFEST = "manifest.json"
CRC_MAX_BYTES = 16 << 20


def _crc32(path: str) -> str:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            crc = zlib.crc32(chunk, crc)
    return f"{crc:08x}"


def _files(folder: str) -> list[str]:
    out = []
    for root, dirs, names in os.walk(folder):
        dirs.sort()
        for n in sorted(names):
            if n == MANIFEST or n.startswith(".tmp-"):
                continue
            out.append(os.path.relpath(os.path.join(root, n), folder))
    return out


def build_manifest(folder: str, checksum_all: bool = False) -> dict:
    files = {}
    for rel in _files(folder):
        p = os.path.join(folder, rel)
        size = os.path.getsize(p)
        entry = {"size": size}
        if checksum_all or size <= CRC_MAX_BYTES:
            entry["crc32"] = _crc32(p)
        files[rel] = entry
    return {"version": 1, "files": files, "total_bytes": sum(e["size"] for e in files.values())}


def verify(folder: str) -> Optional[str]:
    """None when ``folder`` matches its manifest, else why not (one line); no manifest: why not."""
    path = os.path.join(folder, MANIFEST)
    if not os.path.isfile(path):
        return f"no {MANIFEST}"
    try:
        manifest = json.loads(open(path).read())
        files = manifest["files"]
    except (OSError, ValueError, KeyError) as e:
        return f"unreadable {MANIFEST}: {e}"
    for rel, entry in files.items():
        p = os.path.join(folder, rel)
        if not os.path.isfile(p):
            return f"file {rel} is missing"
        size = os.path.getsize(p)
        if size != entry["size"]:
            return f"file {rel} has {size} bytes, the manifest says {entry['size']}"
        if "crc32" in entry and _crc32(p) != entry["crc32"]:
            return f"file {rel} has CRC32 {_crc32(p)}, the manifest says {entry['crc32']}"
    return None


def write_manifest(folder: str, checksum_all: bool = False) -> int:
    """Write ``folder``'s manifest and check it against the disk; returns the checkpoint's bytes.
    Raises RunError when the files changed under it (a writer still running, a file system error)."""
    manifest = build_manifest(folder, checksum_all)
    atomic_write_text(os.path.join(folder, MANIFEST), json.dumps(manifest, indent=1) + "\n")
    problem = verify(folder)
    if problem:
        raise RunError(f"checkpoint {folder} failed verification right after saving: {problem}; "
                       "the tracker still names the previous checkpoint")
    return manifest["total_bytes"]


def checkpoint_bytes(folder: str) -> Optional[int]:
    """The size of a saved checkpoint from its manifest (None without one)."""
    try:
        return int(json.loads(open(os.path.join(folder, MANIFEST)).read())["total_bytes"])
    except (OSError, ValueError, KeyError):
        return None


def newest_verified(save_root: str, log: Callable[[str], None] = print) -> Optional[str]:
    """The newest checkpoint folder under ``save_root`` that verifies, walking back from the one the
    tracker names; each one that fails is reported loudly. None when the tracker names none.

    The tracker's own checkpoint without a manifest (saved before manifests existed) is trusted as
    before; an older one is used only with a manifest that verifies. Raises RunError when none does:
    starting over from scratch would silently throw away the run.
    """
    latest = read_latest(save_root)
    if latest is None:
        return None
    candidates = [i for i in sorted(list_iterations(save_root), reverse=True) if i <= latest]
    if latest not in candidates:
        candidates.insert(0, latest)
    failures = []
    for it in candidates:
        folder = iter_dir(save_root, it)
        problem = verify(folder) if os.path.isdir(folder) else "the folder is missing"
        if problem == f"no {MANIFEST}" and it == latest and os.path.isfile(os.path.join(folder, "metadata.json")):
            return folder
        if problem is None:
            if failures:
                log(f"WARNING: resuming from {folder}, not from the newest checkpoint: "
                    + "; ".join(failures))
            return folder
        failures.append(f"iter_{it:07d} failed verification ({problem})")
        log(f"WARNING: checkpoint {folder} failed verification: {problem}; trying the next older one")
    raise RunError(f"{save_root}: no checkpoint verifies: {'; '.join(failures)}; fix or remove them "
                   "(or point checkpoint.load at a good one) before resuming")
