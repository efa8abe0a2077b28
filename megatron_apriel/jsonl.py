"""Reading JSON Lines files record by record, with the line number every error message names.

Task files, prompt files, chat SFT files and image-text files are all JSONL; each reader either
stops at the first bad line (``path:line: ...``, exit 2) or counts and reports what it skipped.
Corpus preprocessing (``apriel preprocess``) reads raw byte blocks in worker processes and has its
own faster path.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from megatron_apriel.errors import InputError


class JsonlError(InputError):
    """A JSONL line that is not a JSON object; the message starts with ``path:line:``."""


def iter_jsonl(path: str | Path, on_bad: Optional[Callable[[int, ValueError], None]] = None,
               error: type[InputError] = JsonlError) -> Iterator[tuple[int, dict]]:
    """Yield ``(line_number, record)`` for each non-blank line of ``path`` (numbered from 1).

    A line that is not JSON, or not a JSON object, raises ``error`` (a config's file raises the
    config's error) with a message starting ``path:line:``; with ``on_bad`` it is instead passed to
    ``on_bad(line_number, exception)`` (the caller counts and reports it) and skipped. A missing
    file raises ``error`` too.
    """
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: no such file")
    with open(path, "rb") as f:  # each line decoded alone: a byte that is not UTF-8 is that line's error
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record: Any = json.loads(line.decode("utf-8"))
                if not isinstance(record, dict):
                    raise ValueError("not a JSON object")
            except ValueError as e:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
                if on_bad is None:
                    why = (f"invalid JSON ({e.msg})" if isinstance(e, json.JSONDecodeError) else
                           f"not UTF-8 ({e.reason} at byte {e.start})" if isinstance(e, UnicodeDecodeError) else str(e))
                    raise error(f"{path}:{lineno}: {why}") from None
                on_bad(lineno, e)
                continue
            yield lineno, record
