"""slurm/grpo.sh's multi-node GPU launch, dry-run: the batch script runs for real under bash, with
SLURM's client commands (srun, scontrol) and the Python interpreter replaced by recorders, so the test
sees the exact command lines each node would run for a 2-node allocation, colocated vLLM and with a
vLLM server node. What it cannot show: accelerate, FSDP, NCCL and `trl vllm-serve` on real GPUs
(the local one-node SLURM run of the script is in test_slurm.py). Runtime: under 2 s."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from megatron_apriel.config import load_config
from megatron_apriel.rl.grpo import GRPORunConfig

REPO = Path(__file__).resolve().parents[1]
NODES = ["gpu-a1", "gpu-a2"]
JOB_ID = 4242
PORT = 20000 + JOB_ID % 20000  # slurm/common.sh: the rendezvous port derived from the job id

# srun: record the call, then run the task once per node of the step (SLURM_NODEID counts the nodes
# of the step, which skip an --exclude'd server node), one after the other.
SRUN = """#!/bin/bash
nodes=${SLURM_JOB_NUM_NODES:-1} opts=()
while [ $# -gt 0 ] && [ "${1#-}" != "$1" ]; do
  case "$1" in --nodes=*) nodes=${1#--nodes=} ;; esac
  opts+=("$1")
  shift
done
echo "srun ${opts[*]} :: ${1##*/}" >> "$DRY_LOG"
for ((i = 0; i < nodes; i++)); do SLURM_NODEID=$i SLURM_PROCID=$i "$@" || exit $?; done
"""
SCONTROL = """#!/bin/bash
# `scontrol ... | head -n1` may close the pipe before all is written: exit 0 then, as scontrol's single
# buffered write at exit does.
trap '' PIPE
[ "$1 $2" = "show hostnames" ] && { printf '%s\\n' $DRY_NODES 2>/dev/null; exit 0; }
echo "scontrol $*" >> "$DRY_LOG"
"""
PYTHON = """#!/bin/bash
echo "python node=${SLURM_NODEID:-} $*" >> "$DRY_LOG"
"""


ARGS = ["examples/apriel_nemotron_15b/grpo.yaml", "model.path=/ckpt/A-hf", "data.train_file=/data/prompts.jsonl"]


def dry_run(tmp_path: Path, args=ARGS, **env) -> subprocess.CompletedProcess:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", SRUN), ("scontrol", SCONTROL), ("python-rec", PYTHON)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    log = tmp_path / "dry.log"
    proc = subprocess.run(
        ["bash", str(REPO / "slurm" / "grpo.sh"), *args],
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
        env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "DRY_LOG": str(log), "APRIEL_HOME": str(REPO),
             "PYTHON": str(bin_dir / "python-rec"), "DRY_NODES": " ".join(NODES), "SLURM_JOB_ID": str(JOB_ID),
             "SLURM_JOB_NODELIST": "gpu-a[1-2]", "SLURM_JOB_NUM_NODES": "2", "SLURM_GPUS_ON_NODE": "8", **env})
    proc.log = log.read_text().splitlines() if log.exists() else []
    return proc


def launched(tmp_path: Path, **env) -> list[str]:
    """The recorded calls of a dry run that must succeed."""
    proc = dry_run(tmp_path, **env)
    assert proc.returncode == 0 and "GRPO finished (exit 0)" in proc.stdout, proc.stdout + proc.stderr
    return proc.log


def trainer_args(line: str) -> list[str]:
    """The key=value overrides a recorded trainer command passes to megatron_apriel.rl.grpo."""
    return line.split("-m megatron_apriel.rl.grpo --config ", 1)[1].split()[1:]


def test_two_nodes_colocated_vllm(tmp_path):
    lines = launched(tmp_path)
    assert [x for x in lines if x.startswith("srun")] == ["srun --kill-on-bad-exit=0 --wait=600 :: bash"], lines
    launches = [x for x in lines if x.startswith("python")]
    accel = REPO / "examples/apriel_nemotron_15b/accelerate_fsdp.yaml"
    # One accelerate launcher per node, 16 trainers in all, meeting at the first node on the job's port.
    for rank, line in enumerate(launches):
        assert line.startswith(f"python node={rank} -m accelerate.commands.launch --config_file {accel} "
                               f"--num_machines 2 --num_processes 16 --machine_rank {rank} "
                               f"--main_process_ip gpu-a1 --main_process_port {PORT} -m megatron_apriel.rl.grpo "
                               f"--config {REPO / 'examples/apriel_nemotron_15b/grpo.yaml'} "), line
        assert trainer_args(line) == ["model.path=/ckpt/A-hf", "data.train_file=/data/prompts.jsonl"]
    assert len(launches) == 2 and not any("vllm_serve" in x for x in lines), lines


def test_two_nodes_with_a_vllm_server_node(tmp_path):
    lines = launched(tmp_path, VLLM_SERVER="1")
    # The last node serves (all its GPUs as one tensor-parallel vLLM), the first one trains alone.
    server = [x for x in lines if "trl.scripts.vllm_serve" in x]
    assert server == ["python node=0 -m trl.scripts.vllm_serve --model /ckpt/A-hf --tensor_parallel_size 8 "
                      "--port 8000"], lines
    assert sorted(x for x in lines if x.startswith("srun")) == [  # the server's srun runs in the background
        "srun --kill-on-bad-exit=0 --wait=600 --nodes=1 --ntasks=1 --exclude=gpu-a2 :: bash",
        "srun --nodes=1 --ntasks=1 --nodelist=gpu-a2 :: python-rec"], lines
    launches = [x for x in lines if "megatron_apriel.rl.grpo" in x]
    assert len(launches) == 1 and ("--num_machines 1 --num_processes 8 --machine_rank 0 --main_process_ip gpu-a1 "
                                   in launches[0]), launches
    overrides = trainer_args(launches[0])
    assert overrides[2:] == ["grpo.use_vllm=true", "grpo.vllm_mode=server", "grpo.vllm_server_host=gpu-a2",
                             "grpo.vllm_server_port=8000"]
    # The overrides the script adds are ones the trainer's config accepts, as the trainer will read them.
    g = load_config(GRPORunConfig, REPO / "examples/apriel_nemotron_15b/grpo.yaml", overrides).grpo
    assert (g.use_vllm, g.vllm_mode, g.vllm_server_host, g.vllm_server_port) == ("true", "server", "gpu-a2", 8000)


def test_vllm_server_needs_the_model_path(tmp_path):
    proc = dry_run(tmp_path, ARGS[::2], VLLM_SERVER="1")
    assert proc.returncode == 2 and "VLLM_SERVER=1 needs model.path=... on the command line" in proc.stdout
    assert proc.log == []  # nothing launched
