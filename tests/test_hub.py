"""Hub repo ids as model inputs, offline: models placed in a Hub cache in the Hub's own layout
(``models--org--name/snapshots/<sha>/``, ``refs/main``), found there under ``HF_HUB_OFFLINE=1``;
an absent one is a clear exit 2 naming the repo id; ``--push-to-hub`` is checked before the export
and wired to the upload (which has no network here). About 15 s on 2 CPU cores.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml
from conftest import make_tiny_hf, run_python
from huggingface_hub import ModelCard, constants

from megatron_apriel.hub import resolve_model

SHA = "0123456789abcdef0123456789abcdef01234567"


def put_in_cache(cache: Path, repo: str, seed: int) -> Path:
    """A tiny model where the Hub's cache keeps a download of ``repo`` at revision SHA (main)."""
    folder = cache / ("models--" + repo.replace("/", "--"))
    snapshot = make_tiny_hf(folder / "snapshots" / SHA, seed=seed)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(SHA)
    return snapshot


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    """HF_HUB_CACHE and HF_HUB_OFFLINE as huggingface_hub reads them (for this process and children)."""
    cache = tmp_path / "hub"
    snaps = {repo: put_in_cache(cache, repo, seed) for seed, repo in enumerate(["test-org/tiny", "test-org/tiny-b"])}
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache, snaps


def verb(*args) -> int:
    from megatron_apriel.cli import main

    return main([str(a) for a in args])


def test_repo_ids_resolve_from_the_cache_and_local_folders_win(offline_cache, tmp_path, monkeypatch):
    _, snaps = offline_cache
    snap = str(snaps["test-org/tiny"])
    assert resolve_model("test-org/tiny") == snap
    assert resolve_model("test-org/tiny@main") == snap and resolve_model(f"test-org/tiny@{SHA}") == snap
    monkeypatch.chdir(tmp_path)
    (tmp_path / "test-org" / "tiny").mkdir(parents=True)  # a folder with a repo id's name is that folder
    assert resolve_model("test-org/tiny") == "test-org/tiny"
    assert resolve_model("runs/x/hf") == "runs/x/hf"  # not there: left to the verb's own check


def test_verbs_take_repo_ids(offline_cache, tmp_path):
    _, snaps = offline_cache
    assert verb("average", "test-org/tiny", "test-org/tiny-b@main", "--out", tmp_path / "avg") == 0
    merge = json.loads((tmp_path / "avg" / "merge.json").read_text())
    assert merge["inputs"] == [str(snaps["test-org/tiny"].resolve()), str(snaps["test-org/tiny-b"].resolve())]
    assert ModelCard.load(tmp_path / "avg" / "README.md").data.base_model == ["test-org/tiny", "test-org/tiny-b"]
    cfg = tmp_path / "merge.yaml"  # the merge YAML (average --config, merge-search) names repo ids too
    cfg.write_text("merge_method: linear\nmodels:\n  - model: test-org/tiny\n    parameters: {weight: 0.5}\n"
                   "  - model: test-org/tiny-b@main\n    parameters: {weight: 0.5}\n")
    assert verb("average", "--config", cfg, "--out", tmp_path / "avg_yaml") == 0
    assert json.loads((tmp_path / "avg_yaml" / "merge.json").read_text())["inputs"] == merge["inputs"]
    assert verb("convert", "hf-to-mcore", "--hf", "test-org/tiny", "--out", tmp_path / "mcore") == 0
    meta = yaml.safe_load((tmp_path / "mcore" / "apriel_model.yaml").read_text())
    assert meta["source"] == str(snaps["test-org/tiny"].resolve())


def test_absent_repo_offline_is_exit_2_naming_it(offline_cache, tmp_path, capsys):
    assert verb("average", "test-org/tiny", "test-org/absent", "--out", tmp_path / "avg") == 2
    err = capsys.readouterr().err
    assert "input test-org/absent: no such folder, and the Hub repo test-org/absent is not in the Hub cache" in err
    assert "HF_HUB_OFFLINE=1" in err and not (tmp_path / "avg").exists()
    # the same through the command line, with the environment alone telling huggingface_hub
    proc = run_python(["-m", "megatron_apriel.cli", "generate", "--hf", "test-org/tiny@v9", "--prompt", "hi"],
                      check=False, timeout=300, env={"HF_HUB_CACHE": os.environ["HF_HUB_CACHE"], "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "error: --hf test-org/tiny@v9: no such folder, and the Hub repo test-org/tiny@v9 is not in" in proc.stderr


def test_push_to_hub_is_checked_first_and_uploads_the_written_folder(offline_cache, tmp_path, capsys):
    assert verb("convert", "hf-to-mcore", "--hf", "test-org/tiny", "--out", tmp_path / "mcore") == 0
    capsys.readouterr()
    out = tmp_path / "export"
    assert verb("convert", "mcore-to-hf", "--ckpt", tmp_path / "mcore", "--out", out,
                "--push-to-hub", "not-a-repo") == 2
    assert "--push-to-hub not-a-repo: not a Hub repo id (org/name)" in capsys.readouterr().err
    assert not out.exists()  # checked before any work
    # A valid repo: the export is written, then the upload is attempted (offline here: refused by
    # huggingface_hub itself), and the failure names the repo and says the folder is complete.
    assert verb("convert", "mcore-to-hf", "--ckpt", tmp_path / "mcore", "--out", out,
                "--push-to-hub", "test-org/exported") == 1
    err = capsys.readouterr().err
    assert "--push-to-hub test-org/exported: upload failed" in err and "offline mode is enabled" in err
    assert f"the folder {out} is complete" in err and (out / "model.safetensors").is_file()
    assert ModelCard.load(out / "README.md").data.base_model == "test-org/tiny"
