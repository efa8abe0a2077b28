"""Configs are dataclasses loaded from YAML with dotted command-line overrides.

``load_config(TrainConfig, "examples/tiny/cpt.yaml", ["train.lr=1e-5", "model.preset=tiny"])``
builds the nested dataclasses, coerces scalars to the annotated types (YAML reads ``1e-5`` as a
string), and rejects unknown keys with the full dotted path, so a typo fails at start and not as a
silent default. ``dump_config`` writes the fully resolved config (saved beside every checkpoint).
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import os
import tempfile
import types
import typing
from typing import Any, Iterable, Iterator, Literal, Union

import yaml

from megatron_apriel.errors import InputError


class ConfigError(InputError):
    """A config file or override is invalid; the message names the key."""


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key.path=value")
    key, raw = text.split("=", 1)
    key = key.strip().lstrip("-")
    if not key:
        raise ConfigError(f"override {text!r} has an empty key")
    return key.split("."), yaml.safe_load(raw) if raw.strip() != "" else ""


def apply_overrides(data: dict, overrides: Iterable[str]) -> dict:
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            if node.get(part) is None:
                node[part] = {}
            if not isinstance(node[part], dict):
                raise ConfigError(f"override {text!r}: {part!r} is not a section")
            node = node[part]
        node[path[-1]] = value
    return data


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: cannot be {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {list(args)}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a section (mapping), got {value!r}")
        return from_dict(tp, value, where)
    if origin in (list, tuple):
        if value is None:
            raise ConfigError(f"{where}: expected a list, got null")
        if not isinstance(value, (list, tuple)):
            value = [value]
        inner = args[0] if args else Any
        items = [_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        vt = args[1] if len(args) == 2 else Any
        return {k: _coerce(v, vt, f"{where}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        try:
            f = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected an integer, got {value!r}") from None
        if not f.is_integer():
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return int(f)
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if tp is str:
        if isinstance(value, (dict, list)) or value is None:
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    return value


def from_dict(cls, data: dict, where: str = ""):
    """Build dataclass ``cls`` from a mapping; unknown keys are an error naming the key."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(
            f"unknown key {prefix}{unknown[0]} (known keys{' of ' + where if where else ''}: {', '.join(fields)})"
        )
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(value, hints[name], f"{where}.{name}" if where else name)
    try:
        obj = cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{where or cls.__name__}: {e}") from None
    validate = getattr(obj, "validate", None)
    if callable(validate):
        # A validate() that takes ``where`` names its keys under it, so a section read on its own
        # (a blend file) names them from its top level and one inside a config with its full path.
        if "where" in inspect.signature(validate).parameters:
            validate(where=where)
        else:
            validate()
    return obj


def load_yaml(path: str | os.PathLike) -> dict:
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    return data


def load_config(cls, path: str | os.PathLike | None = None, overrides: Iterable[str] = ()):
    data = load_yaml(path) if path else {}
    data = apply_overrides(data, overrides)
    try:
        return from_dict(cls, data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}" if path else str(e)) from None


def to_dict(obj) -> dict:
    return dataclasses.asdict(obj)


def _umask_from_proc() -> int | None:
    """The process umask as /proc reports it (Linux >= 4.7): reading it changes nothing, unlike
    ``os.umask``, which can only be read by setting it and so races with other threads' files."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return None


def _umask_at_import() -> int:
    mask = _umask_from_proc()
    if mask is None:  # no /proc: set and restore once, while importing, before any thread writes
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


_UMASK_AT_IMPORT = _umask_at_import()


def current_umask() -> int:
    """The umask now (a job may change it after import), without touching it."""
    mask = _umask_from_proc()
    return _UMASK_AT_IMPORT if mask is None else mask


def umask_mode(directory: bool = False) -> int:
    """The mode ``open()`` (0666) or ``mkdir`` (0777) would give a new file or folder here."""
    return (0o777 if directory else 0o666) & ~current_umask()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[str]:
    """Yield a temporary file name in ``path``'s folder; rename it to ``path`` if the block succeeds.

    The temporary file gets the mode the umask asks for, as ``open()`` would give ``path``:
    ``mkstemp`` makes it 0600, and renaming keeps that, so on a shared cluster a teammate of the
    same group could not read a checkpoint's marker file while the tensors beside it are readable.
    On any error the temporary file is removed and ``path`` is untouched.
    """
    path = os.fspath(path)
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=suffix or os.path.basename(path))
    try:
        os.fchmod(fd, umask_mode())
    finally:
        os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a file under a temporary name in the same folder, then rename it into place."""
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        f.write(text)


def dump_config(obj, path: str | os.PathLike) -> None:
    atomic_write_text(path, yaml.safe_dump(to_dict(obj), sort_keys=False))
