"""The sbatch launchers on a real one-node SLURM (tests/slurm_cluster.py) with the tiny CPT config.

- `sbatch slurm/cpt.sh` finishes, leaves a checkpoint and a log whose loss falls;
- a job whose time limit is shorter than its work gets USR1, checkpoints, is requeued, resumes and
  completes, and its per-step losses equal the uninterrupted job's bit for bit;
- two srun tasks form a TP=2 group and train the same model (same losses as TP=1 up to reduction
  order);
- a hung rank is found by the watchdog and named, the job requeued, and it ends with the same losses;
- ordinary users: one trains, a teammate converts the checkpoint; each job runs as its user and
  writes files owned by that user with the modes its umask asks for.

Skipped only where Debian's slurm packages are absent or not root (.ci/run installs them as root).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ordinary_user as ou  # noqa: E402
from conftest import INSTALL_HINT  # noqa: E402
from slurm_cluster import SlurmCluster, missing_binaries  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CPT = REPO / "slurm" / "cpt.sh"
TINY = "examples/tiny/cpt.yaml"
# One CPU task on the 2-CPU test node; the script's GPU defaults overridden as a user would.
CPU_ALLOC = ["--nodes=1", "--gpus-per-node=0", "--cpus-per-task=1"]

pytestmark = pytest.mark.slurm


def require_slurm(missing_tools: list[str] = ()) -> None:
    """Skip where the SLURM packages (or other ``missing_tools``) are absent or we are not root."""
    missing = missing_binaries() + list(missing_tools)
    if missing:
        pytest.skip(f"missing {', '.join(missing)}: {INSTALL_HINT} "
                    "(apt-get install slurmctld slurmd slurm-client munge iproute2)")
    if os.geteuid() != 0:
        pytest.skip("the local SLURM cluster needs root")


@pytest.fixture(scope="module")
def cluster():
    require_slurm()
    # Not under pytest's tmp folders, which only root may enter: ordinary users' clients read the
    # config and talk to munged here too.
    base = Path(tempfile.mkdtemp(prefix="apriel-slurm-"))
    os.chmod(base, 0o755)
    try:
        with SlurmCluster(base / "slurm", for_users=True) as c:
            yield c
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _env(**extra) -> dict:
    return {"DEVICE": "cpu", "PYTHON": sys.executable, "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")]), **extra}


def _submit(cluster, workdir: Path, sbatch_args: list[str], overrides: list[str], **env) -> tuple[int, Path]:
    (workdir / "logs").mkdir(parents=True, exist_ok=True)
    job = cluster.sbatch([*sbatch_args, str(CPT), TINY, *overrides], cwd=workdir, env=_env(**env))
    return job, workdir / "logs" / f"apriel-cpt-{job}.out"


def _losses(save: Path) -> dict[int, float]:
    """Per-step training loss from metrics.jsonl; a step written twice would be a resume bug."""
    out = {}
    for line in (save / "logs" / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            assert rec["iteration"] not in out, f"step {rec['iteration']} logged twice"
            out[rec["iteration"]] = rec["loss"]
    return out


def _finished(cluster, job: int, log: Path, timeout: float = 240) -> dict:
    info = cluster.wait(job, timeout=timeout)
    text = log.read_text() if log.exists() else "(no log)"
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", f"{info}\n{text[-6000:]}"
    return info


@pytest.fixture(scope="module")
def cpt_run(cluster, tmp_path_factory):
    """The uninterrupted tiny CPT job: `sbatch slurm/cpt.sh examples/tiny/cpt.yaml` on one CPU task."""
    work = tmp_path_factory.mktemp("cpt")
    job, log = _submit(cluster, work, [*CPU_ALLOC, "--ntasks-per-node=1", "--time=30"],
                       [f"checkpoint.save={work / 'ckpt'}"])
    _finished(cluster, job, log)
    return work, log


def test_sbatch_cpt_finishes_with_checkpoint_and_falling_loss(cpt_run):
    work, log = cpt_run
    ckpt = work / "ckpt"
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == "40"
    assert (ckpt / "iter_0000040" / "metadata.json").exists()
    text = log.read_text()
    assert "training finished (exit 0)" in text
    logged = [float(x) for x in re.findall(r"^step \d+/40 .*?\| loss ([0-9.]+)", text, flags=re.M)]
    assert len(logged) == 8, text[-3000:]  # log_interval 5
    assert logged[-1] < logged[0] - 0.5, logged
    losses = _losses(ckpt)
    assert sorted(losses) == list(range(1, 41))


def test_a_bad_config_fails_at_the_preflight_before_srun(cluster, tmp_path):
    """The batch shell makes the run plan before any task starts: one error line, exit 2, no srun step."""
    job, log = _submit(cluster, tmp_path, [*CPU_ALLOC, "--ntasks-per-node=1", "--time=10"], ["model.tp=3"])
    info = cluster.wait(job, timeout=240)
    text = log.read_text() if log.exists() else "(no log)"
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0", f"{info}\n{text[-3000:]}"
    assert text.count("error: model.tp: 3 does not divide the attention heads of tiny (4)") == 1, text[-3000:]
    assert "pre-flight: the run plan refused the config (exit 2)" in text
    assert "] srun " not in text and "distributed:" not in text


def test_stop_request_before_the_tasks_start_is_kept_and_passed_on(cluster, tmp_path):
    """A USR1 to the batch shell while it sets up or runs the pre-flight (seconds of imports; or at
    once when --signal=B:USR1@N asks for more than --time) used to kill the shell, USR1's default
    action, and fail the job. It is kept and passed to the tasks when they start: they checkpoint at
    the first step and exit 3. Python here sleeps 6 s before it starts, so the request lands in
    the pre-flight every time; MAX_REQUEUES=0 ends the job there instead of requeueing it."""
    slow = tmp_path / "slow-python"
    slow.write_text(f"#!/bin/sh\nsleep 6\nexec {sys.executable} \"$@\"\n")
    slow.chmod(0o755)
    save = tmp_path / "ckpt"
    job, log = _submit(cluster, tmp_path, [*CPU_ALLOC, "--ntasks-per-node=1", "--time=30"],
                       [f"checkpoint.save={save}"], PYTHON=str(slow), MAX_REQUEUES="0")
    deadline = time.monotonic() + 120
    while not (log.exists() and "restart 0:" in log.read_text()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert "restart 0:" in log.read_text(), cluster.log_tail()
    subprocess.run(["scancel", "--batch", "--signal=USR1", str(job)], env=cluster.env(), check=True, timeout=30)
    info = cluster.wait(job, timeout=240)
    text = log.read_text()
    assert not info["ExitCode"].endswith(":10"), f"the batch shell died of USR1: {info}\n{text[-3000:]}"
    assert "received USR1 before the tasks started" in text, text[-3000:]
    assert "passing the stop request received before the start to the tasks" in text
    assert "stop request passed to the training process" in text
    assert "checkpointed (exit 3) but restart 0 >= MAX_REQUEUES=0: not requeueing" in text, text[-3000:]
    stopped_at = int((save / "latest_checkpointed_iteration.txt").read_text())
    assert 0 < stopped_at < 40, stopped_at  # stopped early, at a step boundary, with a checkpoint


def test_time_limit_signal_requeue_resume_equals_uninterrupted(cluster, cpt_run, tmp_path):
    """--time=2 with --signal=B:USR1@50: slurmctld checks time limits every 30 s and sends the
    warning up to 30 s early so it is never late, i.e. 40-70 s after the start, once the tasks are
    training; the samples sleep so that the 40 steps take about 80 s without using the CPUs. Every run,
    requeued ones included, gets the same limit, so a job may be requeued more than once."""
    ref = _losses(cpt_run[0] / "ckpt")
    save = tmp_path / "ckpt"
    job, log = _submit(cluster, tmp_path, [*CPU_ALLOC, "--ntasks-per-node=1", "--time=2", "--signal=B:USR1@50"],
                       [f"checkpoint.save={save}", "data.factory=slurm_cluster:SlowSyntheticDataset",
                        "data.factory_args.delay=0.22", "data.valid_factory_args.delay=0.0"])
    info = _finished(cluster, job, log, timeout=420)
    text = log.read_text()
    assert int(info["Restarts"]) >= 1, text[-4000:]
    assert "received USR1" in text and "requeueing job" in text
    resumed_from = [int(x) for x in re.findall(r"^training from iteration (\d+) to 40", text, flags=re.M)]
    assert resumed_from[0] == 0 and len(resumed_from) == int(info["Restarts"]) + 1
    assert all(0 < it < 40 for it in resumed_from[1:]), resumed_from
    assert (save / "latest_checkpointed_iteration.txt").read_text().strip() == "40"
    losses = _losses(save)
    assert losses == ref  # exact: the resumed run continues bit-identically


@pytest.fixture(scope="module")
def tp2_run(cluster, tmp_path_factory):
    """The tiny CPT job on two srun tasks at TP=2, uninterrupted."""
    work = tmp_path_factory.mktemp("tp2")
    job, log = _submit(cluster, work, [*CPU_ALLOC, "--ntasks-per-node=2", "--time=30"],
                       [f"checkpoint.save={work / 'ckpt'}", "model.tp=2"])
    _finished(cluster, job, log)
    return work, log


def test_two_srun_tasks_form_tp2_group(cpt_run, tp2_run):
    ref = _losses(cpt_run[0] / "ckpt")
    save = tp2_run[0] / "ckpt"
    text = tp2_run[1].read_text()
    assert "2 task(s)" in text
    assert "DP=1 TP=2 PP=1" in text, text[-4000:]
    losses = _losses(save)
    assert sorted(losses) == list(range(1, 41))
    # Same weights (CPU initialisation builds the full matrices, then shards them) and data: the
    # first loss matches TP=1 closely; later ones differ only by reduction order.
    assert losses[1] == pytest.approx(ref[1], rel=1e-5)
    for step in ref:
        assert losses[step] == pytest.approx(ref[step], rel=2e-3), step


def test_ordinary_users_train_and_convert_for_their_team(cluster):
    """In a setgid group folder, user A (umask 002) trains with `sbatch slurm/cpt.sh`; then B, of the
    same group, with umask 022, converts A's checkpoint to HF with `sbatch slurm/convert.sh`. Each job
    completes as its user; every file it writes has that owner, the folder's group and the mode of its
    umask (A's teammates may write beside A's files; B's are read-only to the group).
    Runtime: ~30 s on two idle cores."""
    a, b = ou.require_teammates()
    base = Path(tempfile.mkdtemp(prefix="apriel-team-"))
    try:
        os.chmod(base, 0o711)
        team = ou.group_folder(base / "team", a.pw_gid)
        ou.group_folder(team / "logs", a.pw_gid)
        before = set(ou.modes(team))

        def env(user):
            return ou.user_env(ou.home(base, user), DEVICE="cpu", PYTHON=sys.executable,
                               PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests")]))

        train = cluster.sbatch_as(a, 0o002, [*CPU_ALLOC, "--ntasks-per-node=1", "--time=30", CPT, TINY,
                                             "checkpoint.save=ckpt", "train.train_iters=10",
                                             "checkpoint.save_interval=10", "logging.eval_interval=0"],
                                  cwd=team, env=env(a))
        info = _finished(cluster, train, team / "logs" / f"apriel-cpt-{train}.out")
        assert info["UserId"] == f"{a.pw_name}({a.pw_uid})", info
        by_a = set(ou.modes(team)) - before
        convert = cluster.sbatch_as(b, 0o022, ["--cpus-per-task=1", "--time=30", REPO / "slurm" / "convert.sh",
                                               "mcore-to-hf", "--ckpt", "ckpt", "--out", "hf"], cwd=team, env=env(b))
        info = _finished(cluster, convert, team / "logs" / f"apriel-convert-{convert}.out")
        assert info["UserId"] == f"{b.pw_name}({b.pw_uid})", info
        written = ou.modes(team)
        by_b = set(written) - before - by_a
        assert {"ckpt/latest_checkpointed_iteration.txt", "ckpt/iter_0000010/run_config.yaml",
                f"logs/apriel-cpt-{train}.out"} <= by_a, sorted(by_a)
        assert {"hf/model.safetensors", "hf/config.json", f"logs/apriel-convert-{convert}.out"} <= by_b, sorted(by_b)
        group = a.pw_name  # apriel-ci2's primary group is apriel-ci
        for paths, user, mask in ((by_a, a, 0o002), (by_b, b, 0o022)):
            for path in paths:
                want = 0o2000 | 0o777 & ~mask if (team / path).is_dir() else 0o666 & ~mask
                assert written[path] == (want, user.pw_name, group), (path, oct(written[path][0]))
    finally:
        shutil.rmtree(base)


def test_hung_rank_is_named_requeued_and_resumes_bit_identically(cluster, tp2_run, tmp_path):
    """A rank that stops making progress (the ``hang`` drill: rank 1 stops at step 25) is found by
    the watchdog after ``fault.step_timeout``, the launcher logs the fault and requeues the job, and
    the requeued run resumes from the step-20 checkpoint and ends with the uninterrupted job's losses."""
    save = tmp_path / "ckpt"
    job, log = _submit(cluster, tmp_path, [*CPU_ALLOC, "--ntasks-per-node=2", "--time=30"],
                       [f"checkpoint.save={save}", "model.tp=2", "fault.step_timeout=10",
                        'fault.inject=[{"rank":1,"step":25,"kind":"hang"}]'], MAX_REQUEUES="2")
    info = _finished(cluster, job, log, timeout=600)
    text = log.read_text()
    assert info["Restarts"] == "1", text[-4000:]
    assert "fault drill: rank 1 hangs at step 25" in text
    assert "Current thread" in text or "Thread 0x" in text  # the stacks of the rank that fired
    report = re.search(r"^fault: hang detected: (.*)$", text, flags=re.M).group(1)
    assert re.search(r"rank 1 on \S+: behind, in data of step 25", report), report
    account = re.search(r"fault: hang \(exit \d+\) on (\S+) at step 25, detected after ([0-9.]+) s", text)
    assert account and 10 <= float(account.group(2)) < 15, text[-4000:]
    assert "requeueing job" in text and "restart 1 after hang" in text
    assert "resumed at iteration 20, 5 steps recomputed (the fault was at step 25)" in text
    last = {}  # the last loss logged per step (the requeued run logs steps 21-25 again)
    for line in (save / "logs" / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            last[rec["iteration"]] = rec["loss"]
    assert last == _losses(tp2_run[0] / "ckpt")  # exact


def test_sbatch_convert_two_tasks_tp2(cluster, tmp_path):
    check_convert_tp2(cluster, tmp_path, ["--nodes=1", "--ntasks=2"])


def check_convert_tp2(cluster, tmp_path: Path, alloc: list[str]) -> str:
    """slurm/convert.sh with two srun tasks (laid out by ``alloc``) writes a TP=2 dist checkpoint
    equal to the HF tensors; returns the job's log."""
    from conftest import make_tiny_hf

    from megatron_apriel.checkpoint.convert import load_mcore_canonical, preset_from_hf_dir
    from megatron_apriel.checkpoint.hf_io import SafetensorsReader
    from megatron_apriel.checkpoint.mistral import hf_to_mcore

    hf = make_tiny_hf(tmp_path / "hf", seed=5)
    (tmp_path / "logs").mkdir()
    job = cluster.sbatch([*alloc, "--cpus-per-task=1", "--time=30", str(REPO / "slurm" / "convert.sh"),
                          "hf-to-mcore", "--hf", str(hf), "--out", str(tmp_path / "mcore"), "--tp", "2"],
                         cwd=tmp_path, env=_env())
    log = tmp_path / "logs" / f"apriel-convert-{job}.out"
    _finished(cluster, job, log)
    preset = preset_from_hf_dir(hf)
    with SafetensorsReader(hf) as r:
        expected = dict(hf_to_mcore(r.get, preset))
    got = dict(load_mcore_canonical(tmp_path / "mcore"))
    assert set(got) == set(expected)
    for k, v in expected.items():
        assert torch.equal(got[k][: v.shape[0]], v), k
    return log.read_text()


def test_preprocess_array_then_merge_equals_one_process(cluster, tmp_path):
    """slurm/preprocess.sh: an array task per input file, then the dependent merge job; the merged
    dataset is byte for byte the single-process one and the summed stats count every skipped record.
    Runtime: ~1 min (three array tasks and the merge on the 2-CPU node)."""
    import subprocess

    src = tmp_path / "raw"
    src.mkdir()
    for i in range(3):
        lines = [json.dumps({"text": f"file {i} document {j}: " + "word " * (j % 7 + 1)}) for j in range(40)]
        lines.insert(5, "{broken json")  # one bad line per file: skipped and counted, not fatal
        (src / f"part{i}.jsonl").write_text("\n".join(lines) + "\n")
    flags = ["--tokenizer-type", "TikTokenizer", "--tokenizer-model", "mistral-nemo", "--append-eod", "--quiet"]
    env = {**_env(), "SBATCH_ARGS": "--cpus-per-task=1"}
    single = subprocess.run([sys.executable, str(REPO / "tools/preprocess_data.py"), "--input", str(src),
                             "--output-prefix", str(tmp_path / "single" / "x"), *flags],
                            env={**os.environ, **env}, capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    out = subprocess.run(["bash", str(REPO / "slurm/preprocess.sh"), str(src), str(tmp_path / "array" / "x"), *flags],
                         cwd=tmp_path, env=cluster.env(env), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    array_job, merge_job = map(int, out.stdout.split()[-2:])
    info = cluster.wait(merge_job, timeout=400)
    logs = "\n".join(p.read_text() for p in sorted((tmp_path / "logs").glob("*.out")))
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", f"{info}\n{logs[-6000:]}"
    assert cluster.job(array_job).get("JobState") == "COMPLETED"
    for ext in (".bin", ".idx"):
        a = (tmp_path / "single" / f"x_text_document{ext}").read_bytes()
        assert a and a == (tmp_path / "array" / f"x_text_document{ext}").read_bytes(), ext
    one = json.loads((tmp_path / "single" / "x.stats.json").read_text())
    merged = json.loads((tmp_path / "array" / "x.stats.json").read_text())
    assert merged["shards"] == 3 and merged["skipped"] == one["skipped"] == 3
    for field in ("records", "documents", "tokens", "tokens_per_key", "skipped_by_reason"):
        assert merged[field] == one[field], field
    assert not (tmp_path / "array" / "x.shards").exists()




@pytest.mark.slow
def test_sbatch_grpo_stop_requeue_resume(cluster, tmp_path):
    """slurm/grpo.sh on the tiny GRPO config: the batch shell's USR1 (what --signal=B:USR1@N sends
    before the time limit; sent here with scancel as soon as the trainer process has read its prompts,
    so the test does not depend on how fast this machine is: on an idle one the tiny steps take 20 ms
    each) makes the trainer checkpoint and exit 3, the job is
    requeued and resumes from TRL's checkpoint with its optimizer state, and the run ends with all
    steps trained once and the final model. 38 s on an idle machine, ~3 min on a loaded one."""
    import subprocess
    import time

    from test_grpo import make_char_model, write_toy_prompts

    model, prompts, run = make_char_model(tmp_path / "model"), write_toy_prompts(tmp_path / "p.jsonl"), tmp_path / "run"
    (tmp_path / "logs").mkdir()
    steps = 16
    job = cluster.sbatch([*CPU_ALLOC, "--ntasks-per-node=1", "--time=30", str(REPO / "slurm" / "grpo.sh"),
                          "examples/tiny/grpo.yaml", f"out_dir={run}", f"model.path={model}",
                          f"data.train_file={prompts}", f"grpo.max_steps={steps}", "grpo.save_steps=100",
                          "grpo.save_only_model=false"], cwd=tmp_path, env=_env())
    log = tmp_path / "logs" / f"apriel-grpo-{job}.out"
    deadline = time.time() + 240
    while not (log.exists() and "grpo: 16 prompts from" in log.read_text()):
        assert time.time() < deadline and cluster.job(job)["JobState"] in ("PENDING", "RUNNING"), \
            log.read_text()[-3000:] if log.exists() else cluster.job(job)
        time.sleep(0.1)
    subprocess.run(["scancel", "--signal=USR1", "--batch", str(job)], env=cluster.env(), check=True, timeout=30)
    info = _finished(cluster, job, log, timeout=400)
    text = log.read_text()
    assert int(info["Restarts"]) == 1, text[-4000:]
    assert "received USR1" in text and "requeueing job" in text and "GRPO finished (exit 0)" in text
    stopped_at = int(re.search(r"stop requested: checkpointing step (\d+)", text)[1])
    assert 0 < stopped_at < steps
    assert (run / f"checkpoint-{stopped_at}" / "optimizer.pt").exists()
    assert f"resuming from {run}/checkpoint-{stopped_at}" in text
    # Each step trained (and logged) exactly once across the two runs.
    assert len(re.findall(r"\{'loss'", text)) == steps, text[-4000:]
    assert f"grpo: {steps} steps in" in text
    assert (run / "final" / "model.safetensors").exists()
