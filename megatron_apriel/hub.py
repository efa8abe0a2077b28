"""Hugging Face Hub repo ids wherever a verb takes a model folder (``--hf``, ``--tokenizer``, inputs).

``org/name`` or ``org/name@revision`` is resolved through ``huggingface_hub`` to a folder in the
Hub cache: the cache first (``HF_HUB_CACHE`` / ``HF_HOME``), a download otherwise, nothing but the
cache under ``HF_HUB_OFFLINE=1``; the token comes from the environment (``HF_TOKEN``) or
``hf auth login``. A path that exists on disk always wins, so ``runs/sft/hf`` and a folder named
like a repo keep meaning the folder. Only what a model folder needs is fetched: configs, safetensors
weights, tokenizer files and chat templates (not ``consolidated.safetensors``, Mistral's own copy of
the same weights, nor PyTorch ``.bin`` duplicates).

``--push-to-hub REPO`` on export uploads the written folder with ``HfApi.upload_folder``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Optional

from megatron_apriel.errors import InputError, RunError

REPO_ID = re.compile(r"(?P<repo>[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*)(?:@(?P<rev>[^\s@]+))?")
ALLOW = ["*.json", "*.safetensors", "*.jinja", "tokenizer*", "*.model", "*.tiktoken", "*.txt", "README.md"]
IGNORE = ["consolidated*", "original/*"]


def parse_repo_id(text: str) -> Optional[tuple[str, Optional[str]]]:
    """(repo id, revision or None) for ``org/name[@revision]``; None for anything else."""
    m = REPO_ID.fullmatch(text)
    return (m.group("repo"), m.group("rev")) if m else None


def resolve_model(ref: str | os.PathLike, flag: str = "--hf") -> str:
    """A local folder for ``ref``: the path itself when it exists (or is not a repo id), else the
    Hub snapshot of the repo id. Errors name ``flag`` and the repo id (exit 2)."""
    text = str(ref)
    parsed = parse_repo_id(text)
    if parsed is None or Path(text).exists():
        return text
    repo, revision = parsed
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = f"the Hub cache {constants.HF_HUB_CACHE}"
    try:
        return snapshot_download(repo_id=repo, revision=revision, allow_patterns=ALLOW, ignore_patterns=IGNORE)
    except LocalEntryNotFoundError:
        if constants.HF_HUB_OFFLINE:
            raise InputError(f"{flag} {text}: no such folder, and the Hub repo {repo}"
                             f"{'@' + revision if revision else ''} is not in {where} (HF_HUB_OFFLINE=1: "
                             "nothing is downloaded)") from None
        raise InputError(f"{flag} {text}: no such folder, and the Hub repo {repo} could not be reached "
                         f"nor found in {where}") from None
    except GatedRepoError:
        raise InputError(f"{flag} {text}: the Hub repo {repo} is gated: accept its terms on the Hub and set "
                         "HF_TOKEN") from None
    except RepositoryNotFoundError:
        raise InputError(f"{flag} {text}: no such folder, and no Hub repo {repo} (or it is private: set "
                         "HF_TOKEN)") from None
    except RevisionNotFoundError:
        raise InputError(f"{flag} {text}: the Hub repo {repo} has no revision {revision}") from None


def check_push_target(repo: Optional[str]) -> None:
    """``--push-to-hub REPO``: checked before any work (a repo id without a revision)."""
    if repo is None:
        return
    parsed = parse_repo_id(repo)
    if parsed is None or parsed[1] is not None:
        raise InputError(f"--push-to-hub {repo}: not a Hub repo id (org/name)")


def push_folder(folder: str | os.PathLike, repo: str, private: bool = True, log=print) -> str:
    """Upload an exported folder to the Hub model repo ``repo`` (created, private, if missing);
    returns the commit URL. Network and permission failures are run errors naming the repo."""
    import httpx
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi()
    try:
        api.create_repo(repo, repo_type="model", private=private, exist_ok=True)
        info = api.upload_folder(folder_path=str(folder), repo_id=repo, repo_type="model",
                                 commit_message=f"Upload {Path(folder).name} (megatron-apriel export)")
    except (HfHubHTTPError, OSError, httpx.HTTPError) as e:  # offline mode is a ConnectionError
        raise RunError(f"--push-to-hub {repo}: upload failed ({e}); the folder {folder} is complete") from None
    log(f"pushed {folder} -> https://huggingface.co/{repo} ({info.commit_url})")
    return info.commit_url
