"""What every writing verb checks before it works, and how it reports a failed write.

A verb that writes (``preprocess*``, ``convert``, ``upscale``, ``average``, ``mix-report --png``,
``eval --out``, ``merge-search``) calls one of the ``check_output_*`` functions on its output
location before it reads or computes anything, so a long job never runs to completion only to fail
at writing its result. The checks create nothing that stays: the location must not be an existing
thing of the wrong kind (a directory where a file goes, a file where a folder goes or above it), its
folder must be creatable and writable (a probe file is created and removed there, which is what
catches a read-only mount or a full disk even for root), and where the size of the output is known,
the free space must hold it.

While writing, :func:`writing` turns the operating system's "disk full" and "read-only file
system" (and torch's ``inline_container.cc`` wording of the same) into one :class:`OutputError`
line naming the path and the cause, exit 1. Every writer writes under temporary names and renames
only what is complete, so such an error, an interrupt (SIGINT 130, SIGTERM 143, see
:func:`megatron_apriel.errors.cli_main`) or a crash leaves nothing half-written; a rerun removes a
killed run's temporary files (:func:`remove_stale`).

Also here: the argparse types that validate numbers where they are parsed, and the parser whose
errors are one line.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import glob
import os
import shutil
import signal
import threading
from pathlib import Path
from typing import Iterator, Optional

from megatron_apriel.errors import EXIT_BAD_INPUT, AprielError, InputError

# the causes a write fails with that the user must fix on the machine, not in the command line
DISK_ERRNOS = {errno.ENOSPC: "no space left on device", errno.EROFS: "read-only file system",
               errno.EDQUOT: "disk quota exceeded"}
# margin kept free beyond a known output size: file system metadata, the temporary names' copies
SPACE_MARGIN = 1.02


class OutputError(AprielError):
    """The output location cannot take the output: disk full, read-only, quota (exit 1)."""


def _cause(e: OSError) -> str:
    return DISK_ERRNOS.get(e.errno) or (e.strerror or str(e)).lower()


def _probe(folder: Path, what: str) -> None:
    """Create and remove a file in ``folder``: the one test of writability that holds for root, ACLs,
    read-only mounts and full disks alike."""
    probe = folder / f".apriel-write-test-{os.getpid()}"
    try:
        with open(probe, "wb") as f:
            f.write(b"\0" * 4096)  # a full disk refuses data even where it still has an inode
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        if e.errno in DISK_ERRNOS:
            raise OutputError(f"{what}: cannot write in {folder}: {_cause(e)}") from None
        raise InputError(f"{what}: cannot write in {folder}: {_cause(e)}") from None
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()


def _existing_ancestor(path: Path, what: str) -> Path:
    """The deepest existing ancestor of ``path``; a regular file on the way is an error."""
    p = path
    while not p.exists():
        if p.parent == p:
            break
        p = p.parent
    if not p.is_dir():
        raise InputError(f"{what}: {p} is a file, not a folder, so {path} cannot be created")
    return p


def _size(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale / 10:
            return f"{n / scale:,.2f} {unit}"
    return f"{n:,.0f} bytes"


def check_free_space(folder: Path, expected_bytes: Optional[int], what: str) -> None:
    if not expected_bytes:
        return
    free = shutil.disk_usage(folder).free
    if free < expected_bytes * SPACE_MARGIN:
        raise OutputError(f"{what}: {folder} has {_size(free)} free, the output needs about "
                          f"{_size(expected_bytes)}: no space left on device")


def check_output_file(path: str | os.PathLike, what: str, expected_bytes: Optional[int] = None) -> Path:
    """``path`` can be written as a regular file: not a directory, its folder creatable and writable,
    enough free space for ``expected_bytes``. ``what`` names the flag in the message (``--out``)."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{what} {path}: is a directory, not a file")
    if path.exists() and not path.is_file():
        raise InputError(f"{what} {path}: exists and is not a regular file")
    folder = _existing_ancestor(path.parent if str(path.parent) else Path("."), what)
    _probe(folder, f"{what} {path}")
    check_free_space(folder, expected_bytes, f"{what} {path}")
    return path


def check_output_dir(path: str | os.PathLike, what: str, expected_bytes: Optional[int] = None) -> Path:
    """``path`` can be (or is) a folder this process writes in: not a file, creatable, writable, enough
    free space for ``expected_bytes``."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InputError(f"{what} {path}: is a file, not a folder")
    folder = _existing_ancestor(path, what)
    _probe(folder, f"{what} {path}")
    check_free_space(folder, expected_bytes, f"{what} {path}")
    return path


def check_output_prefix(prefix: str, what: str, names: list[str], expected_bytes: Optional[int] = None,
                        stale: tuple[str, ...] = ()) -> None:
    """An output prefix (``<prefix>_<key>_document.bin`` ...): every name in ``names`` can be
    written as a file (none is a directory), and the prefix's folder is creatable and writable.
    Then the temporary files a killed run left (``stale``: glob patterns) are removed."""
    if not prefix or prefix.endswith(os.sep) or Path(prefix).is_dir():
        raise InputError(f"{what} {prefix!r}: is a folder; a prefix names files (e.g. {prefix.rstrip(os.sep) or '.'}"
                         f"{os.sep}data)")
    for name in names:
        if Path(name).is_dir():
            raise InputError(f"{what} {prefix}: {name} is a directory, not a file")
    check_output_file(prefix, what, expected_bytes)
    for pattern in stale:
        remove_stale(pattern)


def remove_stale(pattern: str) -> list[str]:
    """Remove the temporary files (or folders) matching ``pattern`` that a killed run left, those of a
    process that is gone: the pid is the text after the last ``tmp`` in the name."""
    removed = []
    for p in glob.glob(pattern):
        pid = p.rsplit("tmp", 1)[-1].lstrip("-").split(".")[0]
        if pid.isdigit() and int(pid) != os.getpid() and _alive(int(pid)):
            continue
        if os.path.isdir(p) and not os.path.islink(p):
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                os.remove(p)
        removed.append(p)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def disk_error(e: BaseException, path: str | os.PathLike) -> Optional[OutputError]:
    """The :class:`OutputError` an exception raised while writing under ``path`` stands for, if any:
    an OSError of a full or read-only disk, or torch's ``PytorchStreamWriter failed writing file``
    (``inline_container.cc``), which torch.save and dist checkpointing raise on a full disk."""
    if isinstance(e, OSError) and e.errno in DISK_ERRNOS:
        where = e.filename or path
        return OutputError(f"{where}: {_cause(e)}")
    # torch (and torch.distributed.checkpoint, which wraps the error of each rank in its own text)
    text = str(e)
    if "Read-only file system" in text:
        return OutputError(f"{path}: read-only file system")
    if "inline_container" in text or "file write failed" in text or "No space left on device" in text:
        try:
            free = shutil.disk_usage(_existing_ancestor(Path(path), str(path))).free
        except (OSError, InputError):
            free = None
        full = "No space left on device" in text or (free is not None and free < (64 << 20))
        return OutputError(f"{path}: " + ("no space left on device" if full else
                                          "writing failed in torch (inline_container.cc: file write failed)"))
    cause = getattr(e, "__cause__", None) or getattr(e, "__context__", None)
    if cause is not None and cause is not e:
        return disk_error(cause, path)
    return None


@contextlib.contextmanager
def writing(path: str | os.PathLike) -> Iterator[None]:
    """Turn a full or read-only disk met while writing ``path`` into one :class:`OutputError`."""
    try:
        yield
    except Exception as e:
        err = disk_error(e, path)
        if err is None:
            raise
        raise err from None


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """SIGINT and SIGTERM held back (in the main thread) until the block ends: around the renames that
    put finished outputs in place, so an interrupt never lands between two of them."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


# ------------------------------------------------------------------ numbers and choices where parsed


class ArgumentParser(argparse.ArgumentParser):
    """argparse with its errors on one line: ``error: argument --tp: ...``, exit 2 (no usage block;
    ``--help`` shows it)."""

    def error(self, message: str):  # noqa: D401 - argparse's hook
        self.exit(EXIT_BAD_INPUT, f"error: {message} (see {self.prog} --help)\n")


def _number(kind, text: str, ok, need: str):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{need}, got {text!r}") from None
    if not ok(value):
        raise argparse.ArgumentTypeError(f"{need}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    return _number(int, text, lambda v: v > 0, "must be a positive integer")


def nonnegative_int(text: str) -> int:
    return _number(int, text, lambda v: v >= 0, "must be an integer >= 0")


def positive_float(text: str) -> float:
    return _number(float, text, lambda v: v > 0 and v != float("inf"), "must be a positive number")


def nonnegative_float(text: str) -> float:
    return _number(float, text, lambda v: 0 <= v < float("inf"), "must be a number >= 0")


def fraction(text: str) -> float:
    """A number in (0, 1]: a subset fraction, top-p, a memory share."""
    return _number(float, text, lambda v: 0 < v <= 1, "must be in (0, 1]")
