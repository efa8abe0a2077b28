"""Faults of a long run on CPU: a frozen rank ends the job with its stacks and its name, a slow rank is
named as a straggler, a damaged newest checkpoint falls back to the previous one with the same
losses, NaN stops or skips, a full disk says so, and a killed trainer leaves no process behind.
Drills go through ``fault.inject``, the same switch a user rehearses with on a cluster."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
from conftest import REPO, REPO_PYTHONPATH
from test_training import make_config, metrics, train, write_corpus

from megatron_apriel.checkpoint.manifest import build_manifest, verify
from megatron_apriel.runtime.watchdog import Heartbeat, Watchdog, culprit_report
from megatron_apriel.training.fault import FaultConfig, process_group_timeout_minutes

# the learning-rate schedule fixed at 10 steps, so runs of different lengths agree step for step
SCHED = {"warmup_iters": 2, "decay_style": "cosine", "decay_iters": 10}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    return write_corpus(tmp_path_factory.mktemp("corpus") / "syn_text_document")


@pytest.fixture(scope="module")
def saved_run(corpus, tmp_path_factory) -> tuple[Path, dict]:
    """An uninterrupted 8-step run saving every 2 steps: its save folder and its losses."""
    d = tmp_path_factory.mktemp("saved")
    train(make_config(d / "c.yaml", corpus, train={"train_iters": 8, "schedule": SCHED},
                      checkpoint={"save": str(d / "ckpt"), "save_interval": 2}))
    return d / "ckpt", metrics(d / "logs")


def _inject(*specs) -> str:
    return "fault.inject=" + json.dumps([dict(zip(("rank", "step", "kind"), s[:3]), **(s[3] if len(s) > 3 else {}))
                                         for s in specs])


# ---------------------------------------------------------------- the parts, in process


def test_culprit_report_names_the_silent_and_the_behind():
    now = 1000.0
    beats = {0: Heartbeat(0, "n1", "step", 18, now - 61, now - 1),
             1: Heartbeat(1, "n2", "step", 17, now - 120, now - 95),
             2: Heartbeat(2, "n3", "step", 18, now - 60, now - 1),
             3: Heartbeat(3, "n4", "data", 18, now - 62, now - 1)}
    line = culprit_report(beats, 5, now, stale_s=6)
    assert "rank 1 on n2: last heartbeat 95 s ago in step of step 17" in line
    assert "ranks 4: no heartbeat at all" in line
    assert "rank 3 on n4: behind, in data of step 18 for 62 s" in line
    assert "ranks 0, 2 waiting in step of step 18 for 61 s" in line


def test_watchdog_fires_with_stacks_and_code(capfd):
    codes = []
    done = threading.Event()

    def fake_exit(code):
        codes.append(code)
        done.set()

    w = Watchdog({"step": 0.5, "save": 0}, exit_fn=fake_exit)
    w.phase("save", 3)
    time.sleep(1.0)  # the save budget is off: no fire
    assert not codes
    w.phase("step", 4)
    assert done.wait(10)
    err = capfd.readouterr().err
    assert codes == [4]
    assert "fault: rank 0 on" in err and "step of step 4 has run" in err and "> its budget of 0.5 s" in err
    assert "test_watchdog_fires_with_stacks_and_code" in err  # the main thread's stack, from faulthandler
    assert "hang detected: rank 0 on" in err


def test_process_group_timeout_follows_the_budgets():
    assert process_group_timeout_minutes(FaultConfig(0, 0, 0)) == 30
    assert process_group_timeout_minutes(FaultConfig(60, 10, 20)) == pytest.approx((60 * 1.25 + 60) / 60)


def test_manifest_catches_truncated_and_missing_files(tmp_path):
    (tmp_path / "a.distcp").write_bytes(b"x" * 1000)
    (tmp_path / "metadata.json").write_text("{}")
    (tmp_path / "manifest.json").write_text(json.dumps(build_manifest(str(tmp_path))))
    assert verify(str(tmp_path)) is None
    (tmp_path / "a.distcp").write_bytes(b"x" * 999)
    assert verify(str(tmp_path)) == "file a.distcp has 999 bytes, the manifest says 1000"
    (tmp_path / "a.distcp").unlink()
    assert verify(str(tmp_path)) == "file a.distcp is missing"


def test_bad_drill_is_one_line_error(corpus, tmp_path):
    cfg = make_config(tmp_path / "c.yaml", corpus)
    proc = train(cfg, _inject((0, 2, "meltdown")), check=False)
    assert proc.returncode == 2
    assert "fault.inject.kind: 'meltdown' is not one of hang, slow, crash, nan, corrupt-checkpoint" in proc.stderr


# ---------------------------------------------------------------- whole runs


def test_damaged_newest_checkpoints_fall_back_with_same_losses(corpus, saved_run, tmp_path):
    ref_save, reference = saved_run
    save = tmp_path / "ckpt"
    shutil.copytree(ref_save, save)
    m = json.loads((save / "iter_0000008" / "manifest.json").read_text())
    assert m["files"]["metadata.json"]["size"] > 0 and "crc32" in m["files"]["metadata.json"]
    # iter 8: a shard file missing; iter 6: a shard cut short (both still named complete by the tracker)
    shard8 = max((save / "iter_0000008").glob("*.distcp"), key=lambda p: p.stat().st_size)
    shard8.unlink()
    shard6 = max((save / "iter_0000006").glob("*.distcp"), key=lambda p: p.stat().st_size)
    shard6.write_bytes(shard6.read_bytes()[:1000])
    cfg = make_config(tmp_path / "c.yaml", corpus, train={"train_iters": 8, "schedule": SCHED},
                      checkpoint={"save": str(save), "save_interval": 2})
    out = train(cfg).stdout
    assert f"WARNING: checkpoint {save}/iter_0000008 failed verification: file {shard8.name} is missing" in out
    assert f"WARNING: checkpoint {save}/iter_0000006 failed verification: file {shard6.name} has 1000 bytes" in out
    assert f"resumed from {save}/iter_0000004: iteration 4" in out
    got = metrics(tmp_path / "logs")
    assert sorted(got) == [5, 6, 7, 8]
    for it in got:  # exact: the fallback recomputed steps 5-8 from the same state
        assert got[it]["loss"] == reference[it]["loss"], it
    assert verify(str(save / "iter_0000008")) is None  # redone and verified


def test_nan_is_skipped_then_stops_without_saving(corpus, saved_run, tmp_path):
    reference = saved_run[1]
    save = tmp_path / "ckpt"
    cfg = make_config(tmp_path / "c.yaml", corpus, train={"train_iters": 10, "schedule": SCHED,
                                                            "nan_policy": "skip", "nan_skip_limit": 1},
                      checkpoint={"save": str(save), "save_interval": 2})
    proc = train(cfg, _inject((0, 3, "nan"), (0, 5, "nan")), check=False)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "WARNING: non-finite gradients at step 3: update skipped (1 of train.nan_skip_limit 1)" in proc.stdout
    assert ("error: non-finite gradients at step 5 after skipping 1 steps (train.nan_skip_limit 1: steps 3): "
            "stopping without saving; the last checkpoint is iteration 4") in proc.stderr
    assert (save / "latest_checkpointed_iteration.txt").read_text().strip() == "4"
    assert sorted(p.name for p in save.glob("iter_*")) == ["iter_0000002", "iter_0000004"]
    got = metrics(tmp_path / "logs")
    assert [got[i]["loss"] for i in (1, 2, 3)] == [reference[i]["loss"] for i in (1, 2, 3)]
    assert got[3]["skipped"] is True and got[4]["loss"] != reference[4]["loss"]  # the step-3 update was dropped
    # the default policy stops at the first one (a drill that fired is not repeated: step 6 here)
    proc = train(cfg, "train.nan_policy=stop", _inject((0, 5, "nan"), (0, 6, "nan")), check=False)
    assert proc.returncode == 1
    assert "resumed from" in proc.stdout and "iteration 4" in proc.stdout
    assert ("error: non-finite gradients at step 6 (train.nan_policy: stop): stopping without saving; "
            "the last checkpoint is iteration 4") in proc.stderr
    assert (save / "latest_checkpointed_iteration.txt").read_text().strip() == "4"


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def test_sigkilled_trainer_leaves_no_process(corpus, tmp_path):
    cfg = make_config(tmp_path / "c.yaml", corpus, train={"train_iters": 200},
                      data={"num_workers": 2},
                      checkpoint={"save": str(tmp_path / "ckpt"), "save_interval": 1, "async_save": True})
    env = {**os.environ, "PYTHONPATH": REPO_PYTHONPATH, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "megatron_apriel.train", "--config", str(cfg)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO)
    seen: dict[int, psutil.Process] = {}
    for line in proc.stdout:
        for p in _descendants(proc.pid):
            seen.setdefault(p.pid, p)
        if line.startswith("step 4/"):
            break
    for p in _descendants(proc.pid):
        seen.setdefault(p.pid, p)
    names = sorted({" ".join(p.cmdline()[-2:]) for p in seen.values() if p.is_running()})
    assert len(seen) >= 3, names  # the guardian, data workers, the async writer / resource tracker
    proc.kill()
    proc.wait()
    time.sleep(5)
    left = [p for p in seen.values() if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not left, [(p.pid, p.cmdline()) for p in left]


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    return r.returncode == 0


def test_disk_full_names_space_and_intact_iteration(corpus, tmp_path):
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "9m"):
        pytest.skip("mounting a small tmpfs needs root (mount -t tmpfs was refused)")
    try:
        save = disk / "ckpt"
        cfg = make_config(tmp_path / "c.yaml", corpus, train={"train_iters": 6, "schedule": SCHED},
                          checkpoint={"save": str(save), "save_interval": 2})
        proc = train(cfg, check=False)  # one checkpoint (~5.3 MB) fits, the second does not
        assert proc.returncode == 1, proc.stderr[-2000:]
        assert "the save of iteration 4 will likely not fit" in proc.stdout
        line = [x for x in proc.stderr.splitlines() if x.startswith("error: ")][-1]
        assert line.startswith(f"error: disk full while saving iteration 4 to {save}: a checkpoint needs about "
                               "5."), line
        assert " MiB (the last one's size), " in line and " MiB free after removing the partial iter_0000004" in line
        assert f"the last intact checkpoint is iteration 2 ({save}/iter_0000002)" in line
        assert not (save / "iter_0000004").exists()
        subprocess.run(["mount", "-o", "remount,size=40m", str(disk)], check=True)
        out = train(cfg).stdout
        assert f"resumed from {save}/iter_0000002: iteration 2" in out
        assert (save / "latest_checkpointed_iteration.txt").read_text().strip() == "6"
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def test_frozen_rank_is_named_with_stacks_and_slow_rank_is_a_straggler(corpus, tmp_path):
    """Two gloo ranks; rank 1 is slowed by a drill (named as a straggler), then frozen with SIGSTOP:
    rank 0's watchdog ends its process after the step timeout, with its stacks and rank 1 named
    (the launcher then ends the rest: torchrun after 30 s, slurm/*.sh at once)."""
    step_timeout = 10
    cfg = make_config(tmp_path / "c.yaml", corpus, train={"train_iters": 50, "micro_batch_size": 1},
                      logging={"log_interval": 2, "log_dir": str(tmp_path / "logs")})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--standalone",
           "-m", "megatron_apriel.train", "--config", str(cfg), f"fault.step_timeout={step_timeout}",
           "fault.straggler_factor=1.5", _inject((1, 1, "slow", {"seconds": 0.5}))]
    env = {**os.environ, "PYTHONPATH": REPO_PYTHONPATH, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO,
                            start_new_session=True)
    out, stopped_at, rank1, detected = [], None, None, None
    try:
        for line in proc.stdout:
            out.append(line)
            if line.startswith("step 6/") and stopped_at is None:
                rank1 = next(p for p in psutil.Process(proc.pid).children()
                             if p.environ().get("RANK") == "1")
                rank1.send_signal(signal.SIGSTOP)
                stopped_at = time.monotonic()
            if "exits with code 4" in line:
                # rank 0 is done; torchrun would wait 30 s for the stopped rank to take SIGTERM
                detected = time.monotonic() - stopped_at
                break
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        if rank1 is not None and rank1.is_running():
            rank1.kill()
    text = "".join(out)
    assert stopped_at is not None, text[-3000:]
    assert "stragglers at step 2 (compute > 1.5x the median" in text and "rank 1 on " in text
    assert detected is not None and detected < step_timeout + 15, (detected, text[-3000:])
    assert f"> its budget of {step_timeout} s" in text
    assert "Current thread" in text or "Thread 0x" in text  # faulthandler's dump
    report = next(x for x in out if "fault: hang detected:" in x)
    assert "rank 1 on " in report and "last heartbeat" in report, report
    assert "ranks 0 waiting in " in report, report
    assert "exits with code 4" in text
