"""Shared clusters: every file the project writes gets the mode the user's umask asks for.

- In process: atomic writes (config.atomic_write_text / atomic_path), the streamed safetensors
  shards and the atomic output folders get 0666 / 0777 less the umask, as ``open()`` and ``mkdir``
  would, whatever the umask; a failed atomic write leaves nothing.
- As ordinary users (tests/ordinary_user.py; needs root to switch users, as CI has): in a
  setgid group folder with umask 002, user A preprocesses data and trains the tiny config with a
  checkpoint; user B of the same group resumes A's checkpoint, converts it to HF and reads A's
  preprocessing stats. With umask 077 every file A writes is private (modes asserted) and B's reads
  are refused.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import sys
import tempfile
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ordinary_user as ou  # noqa: E402

from megatron_apriel.checkpoint.hf_io import ShardedSafetensorsWriter, atomic_output_dir  # noqa: E402
from megatron_apriel.config import atomic_path, atomic_write_text, current_umask  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TINY = ["-m", "megatron_apriel.train", "--config", str(REPO / "examples/tiny/cpt.yaml"), "model.device=cpu",
        "logging.eval_interval=0"]


@pytest.fixture
def umask():
    """Set the process umask for one test, then put the old one back."""
    old = os.umask(0o022)
    yield os.umask
    os.umask(old)


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


@pytest.mark.parametrize("mask", [0o002, 0o022, 0o077])
def test_atomic_writes_and_shards_follow_the_umask(umask, tmp_path, mask):
    umask(mask)
    assert current_umask() == mask and current_umask() == mask  # reading it leaves it as it was
    atomic_write_text(tmp_path / "a" / "marker.txt", "40\n")
    assert (tmp_path / "a" / "marker.txt").read_text() == "40\n"
    assert _mode(tmp_path / "a" / "marker.txt") == 0o666 & ~mask
    assert _mode(tmp_path / "a") == 0o777 & ~mask
    with atomic_path(tmp_path / "fig.png", suffix=".png") as tmp:
        Path(tmp).write_bytes(b"png")  # as savefig does: by name, into the file atomic_path made
    assert _mode(tmp_path / "fig.png") == 0o666 & ~mask
    with atomic_output_dir(tmp_path / "hf") as out:
        w = ShardedSafetensorsWriter(out, layout=[("w", (2, 2), torch.float32)])
        w.add("w", torch.ones(2, 2))
        w.close()
    assert _mode(tmp_path / "hf") == 0o777 & ~mask
    assert _mode(tmp_path / "hf" / "model.safetensors") == 0o666 & ~mask


def test_umask_without_proc_is_read_once_and_restored(umask, monkeypatch):
    import megatron_apriel.config as config

    umask(0o027)
    monkeypatch.setattr(config, "_umask_from_proc", lambda: None)
    assert config._umask_at_import() == 0o027
    assert os.umask(0o027) == 0o027  # set back as it was


def test_a_failed_atomic_write_leaves_nothing(tmp_path):
    (tmp_path / "x.txt").write_text("old")
    with pytest.raises(RuntimeError), atomic_path(tmp_path / "x.txt") as tmp:
        Path(tmp).write_text("half")
        raise RuntimeError("stopped")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.txt"]
    assert (tmp_path / "x.txt").read_text() == "old"


def _ok(proc, what: str) -> str:
    assert proc.returncode == 0, f"{what} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc.stdout + proc.stderr


@pytest.fixture
def team():
    """Two teammates (A, B of one group), a scratch folder both can traverse, a group folder in it."""
    a, b = ou.require_teammates()
    base = Path(tempfile.mkdtemp(prefix="apriel-team-"))
    try:
        os.chmod(base, 0o711)
        homes = {u.pw_name: ou.user_env(ou.home(base, u)) for u in (a, b)}
        yield a, b, base, homes
    finally:
        shutil.rmtree(base)


def test_teammates_share_runs_under_umask_002_and_not_under_077(team):
    """Runtime: ~50 s on two idle cores (two short trainings, a resume, a conversion, two preprocessings)."""
    a, b, base, homes = team
    raw = base / "raw.jsonl"
    raw.write_text("".join(json.dumps({"text": f"document {i}: " + "word " * (i % 5 + 1)}) + "\n" for i in range(30)))
    os.chmod(raw, 0o644)
    py = sys.executable

    def run(user, mask, argv, folder):
        return ou.run_as(user, [py, *argv], mask, folder, homes[user.pw_name], base / f"stash-{user.pw_name}")

    def preprocess(user, mask, folder):
        return run(user, mask, [str(REPO / "tools/preprocess_data.py"), "--input", str(raw), "--output-prefix",
                                "data/x", "--tokenizer-type", "TikTokenizer", "--tokenizer-model", "mistral-nemo",
                                "--append-eod", "--workers", "1", "--quiet"], folder)

    def train(user, mask, folder, *overrides):
        return run(user, mask, [*TINY, *overrides], folder)

    # umask 002 in the group folder: A writes, B (same group) resumes, converts and reads.
    shared = ou.group_folder(base / "team", a.pw_gid)
    _ok(preprocess(a, 0o002, shared), "A: preprocess")
    _ok(train(a, 0o002, shared, "checkpoint.save=ckpt", "train.train_iters=4", "checkpoint.save_interval=4"),
        "A: train")
    written_by_a = ou.modes(shared)
    assert "ckpt/latest_checkpointed_iteration.txt" in written_by_a and "ckpt/iter_0000004/run_config.yaml" in \
        written_by_a and "data/x.stats.json" in written_by_a, sorted(written_by_a)
    for path, (mode, owner, group) in written_by_a.items():
        want = 0o2775 if (shared / path).is_dir() else 0o664  # setgid folders pass the bit on
        assert (mode, owner, group) == (want, a.pw_name, a.pw_name), path

    log = _ok(train(b, 0o002, shared, "checkpoint.load=ckpt", "checkpoint.load_mode=full", "checkpoint.save=ckpt-b",
                    "train.train_iters=6", "checkpoint.save_interval=6"), "B: resume A's checkpoint")
    assert "training from iteration 4 to 6" in log, log[-3000:]
    _ok(run(b, 0o002, [str(REPO / "tools/convert_checkpoint.py"), "mcore-to-hf", "--ckpt", "ckpt", "--out", "hf"],
            shared), "B: convert A's checkpoint")
    assert json.loads((shared / "hf" / "config.json").read_text())["num_hidden_layers"] > 0
    out = _ok(run(b, 0o002, ["-c", "import json; print(json.load(open('data/x.stats.json'))['documents'])"], shared),
              "B: read A's stats")
    assert out.split()[-1] == "30"
    by_b = {p: m for p, m in ou.modes(shared).items() if p not in written_by_a}
    assert any(p.startswith("ckpt-b/iter_0000006/") for p in by_b) and "hf/model.safetensors" in by_b, sorted(by_b)
    for path, (mode, owner, group) in by_b.items():
        want = 0o2775 if (shared / path).is_dir() else 0o664
        assert (mode, owner, group) == (want, b.pw_name, a.pw_name), path
    assert ou.modes(shared)["ckpt/latest_checkpointed_iteration.txt"] == written_by_a[
        "ckpt/latest_checkpointed_iteration.txt"]  # B read it, left it as it was

    # umask 077: the same group folder, yet nothing A writes is readable by B.
    private = ou.group_folder(base / "private", a.pw_gid)
    _ok(preprocess(a, 0o077, private), "A: preprocess (umask 077)")
    _ok(train(a, 0o077, private, "checkpoint.save=ckpt", "train.train_iters=2", "checkpoint.save_interval=2"),
        "A: train (umask 077)")
    written = ou.modes(private)
    assert "ckpt/latest_checkpointed_iteration.txt" in written and "data/x.stats.json" in written, sorted(written)
    for path, (mode, owner, _) in written.items():
        want = 0o2700 if (private / path).is_dir() else 0o600
        assert (mode, owner) == (want, a.pw_name), path
    for path in ("data/x.stats.json", "ckpt/latest_checkpointed_iteration.txt", "ckpt/iter_0000002/run_config.yaml"):
        proc = run(b, 0o002, ["-c", f"open({path!r}).read()"], private)
        assert proc.returncode != 0 and "PermissionError" in proc.stderr, (path, proc.stderr[-2000:])
