"""The sbatch launchers across two hosts: a real two-node SLURM (tests/slurm_two_nodes.py), each node
in its own network namespace, with the tiny CPT config on CPU (one task per node unless stated).

- DP=2 over the two nodes: MASTER_ADDR is the first node's name (resolved through the node's own
  /etc/hosts), MASTER_PORT the job-id port, gloo meets across the bridge, and the losses equal the
  same job's on one node (two tasks there) bit for bit;
- TP=2 and PP=2 split across the nodes train the same model;
- the time-limit signal reaches the tasks on both nodes, the job checkpoints, is requeued and
  resumes bit-identically;
- a task killed on one node fails the whole job within seconds, with the failing node and task in
  the log;
- slurm/convert.sh with one task on each node writes the TP=2 checkpoint.

Skipped only where Debian's slurm packages or iproute2 are absent or not root (.ci/run installs them).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from slurm_two_nodes import TwoNodeSlurmCluster, missing_net_tools  # noqa: E402
from test_slurm import _finished, _losses, _submit, check_convert_tp2, require_slurm  # noqa: E402

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

CPU = ["--gpus-per-node=0", "--cpus-per-task=1", "--time=30"]
TWO_NODES = ["--nodes=2", "--ntasks-per-node=1"]
ITERS = 20  # checkpoints at 20 (save_interval), enough for a loss to compare
SHORT = [f"train.train_iters={ITERS}", "logging.eval_interval=100"]
SLOW = ["data.factory=slurm_cluster:SlowSyntheticDataset", "data.valid_factory_args.delay=0.0"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    require_slurm(missing_net_tools())
    with TwoNodeSlurmCluster(tmp_path_factory.mktemp("slurm2")) as c:
        yield c


def _run_job(cluster, work: Path, sbatch: list[str], overrides: list[str], **env) -> tuple[int, Path]:
    return _submit(cluster, work, [*sbatch, *CPU], [f"checkpoint.save={work / 'ckpt'}", *SHORT, *overrides], **env)


@pytest.fixture(scope="module")
def one_node(cluster, tmp_path_factory):
    """The references: the same two-task jobs with both tasks on one node (DP=2, and PP=2)."""
    def run(split: str) -> dict[int, float]:
        work = tmp_path_factory.mktemp("one_node")
        job, log = _run_job(cluster, work, ["--nodes=1", "--ntasks-per-node=2"], [split])
        info = _finished(cluster, job, log)
        assert info["NodeList"] in cluster.nodes
        return _losses(work / "ckpt")
    runs: dict[str, dict[int, float]] = {}

    def losses(split: str = "model.tp=1") -> dict[int, float]:  # run each reference once, when first needed
        if split not in runs:
            runs[split] = run(split)
        return runs[split]
    return losses


def test_dp2_across_two_nodes_signal_requeue_resume_equals_one_node(cluster, one_node, tmp_path):
    """DP=2 with one task on each node; mid-run the batch shell gets USR1, as from the time limit of
    `--signal=B:USR1@N` (slurmd signals the batch step either way; test_slurm.py waits for the real
    time limit on one node, 2-3 minutes that this test spends elsewhere): the stop request reaches
    the training process on both nodes, the job checkpoints, is requeued, resumes, and its losses
    equal the uninterrupted one-node job's bit for bit."""
    ref = one_node()
    job, log = _run_job(cluster, tmp_path, TWO_NODES, [*SLOW, "data.factory_args.delay=0.1"])
    _wait_for_step(cluster, job, tmp_path, 3)
    subprocess.run(["scancel", "--batch", "--signal=USR1", str(job)], env=cluster.env(), check=True, timeout=30)
    info = _finished(cluster, job, log)
    text = log.read_text()
    assert info["NodeList"] == "apriel-n[1-2]"
    # The rendezvous the launcher derived: the first node by name, the job-id port.
    assert f"2 node(s) apriel-n[1-2], 2 task(s), master apriel-n1:{20000 + job % 20000}" in text, text[-3000:]
    assert "DP=2 TP=1 PP=1" in text, text[-3000:]
    assert int(info["Restarts"]) == 1, text[-4000:]
    assert "received USR1" in text and "requeueing job" in text
    for node, rank in (("apriel-n1", 0), ("apriel-n2", 1)):
        assert f"{node} task {rank}: stop request passed to the training process" in text, text[-4000:]
    resumed_from = [int(x) for x in re.findall(rf"^training from iteration (\d+) to {ITERS}", text, flags=re.M)]
    assert len(resumed_from) == 2 and resumed_from[0] == 0 and 3 <= resumed_from[1] < ITERS, resumed_from
    assert _losses(tmp_path / "ckpt") == ref  # exact: the same all-reduce, over the bridge instead of loopback


def test_tp2_split_across_nodes(cluster, one_node, tmp_path):
    ref = one_node()
    job, log = _run_job(cluster, tmp_path, TWO_NODES, ["model.tp=2"])
    _finished(cluster, job, log)
    assert "DP=1 TP=2 PP=1" in log.read_text()
    losses = _losses(tmp_path / "ckpt")
    assert sorted(losses) == list(range(1, ITERS + 1))
    # Same weights (the full matrices are initialised, then sharded) and samples as DP=2; only the
    # reduction order differs.
    assert losses[1] == pytest.approx(ref[1], rel=1e-5)
    for step in ref:
        assert losses[step] == pytest.approx(ref[step], rel=2e-3), step


def test_pp2_split_across_nodes_equals_one_node(cluster, one_node, tmp_path):
    """Each stage initialises its own layers, so PP=2 is compared with PP=2 on one node: exactly."""
    ref = one_node("model.pp=2")
    job, log = _run_job(cluster, tmp_path, TWO_NODES, ["model.pp=2"])
    _finished(cluster, job, log)
    assert "DP=1 TP=1 PP=2" in log.read_text()
    assert _losses(tmp_path / "ckpt") == ref


def _wait_for_step(cluster, job: int, work: Path, step: int) -> None:
    metrics = work / "ckpt" / "logs" / "metrics.jsonl"
    deadline = time.time() + 180
    while time.time() < deadline:
        if metrics.exists() and metrics.read_text().count('"loss"') >= step:
            return
        if cluster.job(job).get("JobState") not in ("PENDING", "RUNNING", "CONFIGURING"):
            break
        time.sleep(0.5)
    raise AssertionError(f"job {job} did not reach step {step}: {cluster.job(job)}")


def test_task_killed_on_one_node_fails_job_promptly(cluster, tmp_path):
    """SIGKILL to the training process on apriel-n2 mid-training: its task ends the step and the job
    ends within seconds (NCCL ranks would otherwise wait in a collective until the distributed
    timeout), and the log names the node, the task and the signal. A crash is requeued like a stop
    (tests/test_slurm.py and benchmarks/faults.py show that); with MAX_REQUEUES=0 it fails the job,
    which shows how promptly the kill is seen."""
    job, log = _run_job(cluster, tmp_path, TWO_NODES, [*SLOW, "data.factory_args.delay=0.5"], MAX_REQUEUES="0")
    _wait_for_step(cluster, job, tmp_path, 1)
    victim = _training_process(cluster, "apriel-n2")
    os.kill(victim, 9)
    killed = time.time()
    info = cluster.wait(job, timeout=120)
    took = time.time() - killed
    text = log.read_text()
    assert info["JobState"] == "FAILED", f"{info}\n{text[-3000:]}"
    assert took < 45, f"job took {took:.0f} s to fail after the kill"
    killed = rf"apriel-n2 task 1: python\S* \(pid {victim}\) was killed by SIGKILL: ending step {job}\.0"
    assert re.search(killed, text), text[-3000:]
    assert re.search(r"fault: crash \(exit \d+\)", text), text[-3000:]
    assert "restart 0 >= MAX_REQUEUES=0: not requeueing" in text, text[-3000:]


def _training_process(cluster, node: str) -> int:
    """The pid of the Python training process among the processes of ``node``."""
    for pid in cluster.pids_on(node):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"megatron_apriel.train" in cmd and Path(cmd[0].decode()).name.startswith("python"):
            return pid
    raise AssertionError(f"no training process on {node}")


def test_sbatch_convert_one_task_per_node(cluster, tmp_path):
    """`sbatch --nodes=2 --ntasks=2 slurm/convert.sh ... --tp 2`: the script's own --ntasks=1 yields
    to the command line, and SLURM gives each node one task."""
    log = check_convert_tp2(cluster, tmp_path, ["--nodes=2", "--ntasks=2"])
    assert "2 node(s) apriel-n[1-2], 2 task(s), master apriel-n1:" in log, log[-3000:]
