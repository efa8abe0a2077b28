"""A real one-node SLURM cluster on localhost for the launcher tests (Debian slurm 22.05 + munge).

Why by hand: there is no Python package that runs slurmctld/slurmd; the launchers must be tested
against the real daemons (signals, requeue, srun task layout), not a mock. The cluster lives in one
scratch directory: its own munged socket, free ports, state and spool folders, so it touches
nothing of the machine's and several can run side by side. ``stop`` cancels the jobs and ends every
daemon by the pid in its pid file, leaving nothing running.

    with SlurmCluster(tmp_path / "slurm") as cluster:
        job = cluster.sbatch(["slurm/cpt.sh", ...], cwd=workdir)
        info = cluster.wait(job)
"""

from __future__ import annotations

import os
import pwd
import shlex
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "squeue")
FINISHED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
            "PREEMPTED"}


def missing_binaries() -> list[str]:
    return [b for b in BINARIES if shutil.which(b) is None and not Path("/usr/sbin", b).exists()]


def _which(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _mem_mb() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    return 4096


class SlurmError(RuntimeError):
    pass


class SlurmCluster:
    def __init__(self, root: Path, cpus: int | None = None, start_timeout: float = 60.0, for_users: bool = False):
        self.root = Path(root).resolve()
        # for_users: jobs of ordinary users can run this interpreter (slurmd starts in the mount
        # namespace of tests/ordinary_user.py) and reach the clients' config and munge socket.
        self.for_users = for_users
        self.host = socket.gethostname().split(".")[0]
        # The tests need two tasks on the node even on a one-core machine: config_overrides makes
        # slurmd use these numbers instead of what it detects.
        self.cpus = cpus or max(2, os.cpu_count() or 2)
        self.start_timeout = start_timeout
        self.conf = self.root / "slurm.conf"
        self.munge_socket = self.root / "munge" / "munge.socket"
        self.nodes = [self.host]
        self.ctl_host = self.host
        self.per_node = ""  # "-%n" where several slurmd share the scratch folder
        self.extra_conf = ""
        self._pidfiles = {
            "slurmd": self.root / "slurmd.pid",
            "slurmctld": self.root / "slurmctld.pid",
            "munged": self.root / "munge" / "munged.pid",
        }

    # -- lifecycle ---------------------------------------------------------------------------------
    def __enter__(self) -> "SlurmCluster":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def env(self, extra: dict | None = None) -> dict:
        """The environment for the SLURM clients (sbatch, srun, scontrol) of this cluster."""
        return {**os.environ, "SLURM_CONF": str(self.conf), **(extra or {})}

    def write_conf(self) -> None:
        d = self.root
        for sub in ("state", "spool", "log", "munge"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        if self.for_users:  # the clients of every user read the config and talk to munged
            for sub in ("", "munge"):
                os.chmod(d / sub, 0o755)
        mem = max(1000, int(_mem_mb() * 0.8))
        self.conf.write_text(f"""\
ClusterName=apriel-test
SlurmctldHost={self.ctl_host}
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket}
SlurmUser=root
SlurmdUser=root
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool{self.per_node}
SlurmctldPidFile={self._pidfiles['slurmctld']}
SlurmdPidFile={d}/slurmd{self.per_node}.pid
SlurmctldLogFile={d}/log/slurmctld.log
SlurmdLogFile={d}/log/slurmd{self.per_node}.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
ReturnToService=2
MpiDefault=none
JobRequeue=1
KillWait=10
MinJobAge=600
{self.extra_conf}
{self.node_lines(mem)}
PartitionName=debug Nodes={','.join(self.nodes)} Default=YES MaxTime=INFINITE State=UP
""")

    def node_lines(self, mem: int) -> str:
        return f"NodeName={self.host} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory={mem} State=UNKNOWN"

    def start(self) -> None:
        missing = missing_binaries()
        if missing:
            raise SlurmError(f"SLURM binaries missing: {', '.join(missing)} "
                             "(apt-get install slurmctld slurmd slurm-client munge)")
        if os.geteuid() != 0:
            raise SlurmError("the local SLURM cluster needs root (SlurmUser=root, munged key access)")
        self.write_conf()
        key = Path("/etc/munge/munge.key")
        if not key.exists():
            subprocess.run(["mungekey", "-c"], check=True)
        m = self.root / "munge"
        self._run([_which("munged"), "--force", f"--socket={self.munge_socket}",
                   f"--pid-file={self._pidfiles['munged']}", f"--key-file={key}", f"--log-file={m}/munged.log",
                   f"--seed-file={m}/munged.seed"])
        self._wait_for(lambda: self.munge_socket.exists(), "munged socket")
        env = self.env()
        self._run([_which("slurmctld"), "-f", str(self.conf)], env=env)
        self._wait_for(lambda: self._ok(["scontrol", "ping"]), "slurmctld to answer scontrol ping")
        self.start_slurmd(env)
        self._wait_for(self._node_idle, f"node(s) {self.nodes} to become idle")

    def start_slurmd(self, env: dict) -> None:
        cmd = [_which("slurmd"), "-f", str(self.conf)]
        if self.for_users:
            from ordinary_user import in_namespace

            cmd = in_namespace(f"exec {shlex.join(cmd)}", self.root / "stash")
        self._run(cmd, env=env)

    def stop(self) -> None:
        """Cancel every job, then end slurmd, slurmctld and munged by their pids."""
        if self.conf.exists() and self._pid("slurmctld"):
            jobs = subprocess.run(["squeue", "-h", "-o", "%i"], env=self.env(), capture_output=True, text=True,
                                  timeout=30).stdout.split()
            if jobs:  # every user's
                subprocess.run(["scancel", "--full", *jobs], env=self.env(), capture_output=True, timeout=30)
            deadline = time.time() + 30
            while time.time() < deadline and self._ok(["squeue", "-h", "-t", "running,completing"], need_output=True):
                time.sleep(0.5)
        for name in self._pidfiles:  # the slurmd(s) first, munged last
            pid = self._pid(name)
            if pid is None:
                continue
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            deadline = time.time() + 20
            while time.time() < deadline and _alive(pid):
                time.sleep(0.2)
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)

    # -- jobs ----------------------------------------------------------------------------------------
    def sbatch(self, args: list[str], cwd: Path, env: dict | None = None) -> int:
        proc = subprocess.run(["sbatch", "--parsable", *map(str, args)], cwd=cwd, env=self.env(env),
                              capture_output=True, text=True, timeout=60)
        if proc.returncode != 0:
            raise SlurmError(f"sbatch {args} failed: {proc.stderr.strip()}")
        return int(proc.stdout.strip().split(";")[0])

    def sbatch_as(self, user: pwd.struct_passwd, umask: int, args: list[str], cwd: Path, env: dict) -> int:
        """sbatch as ``user`` with ``umask`` (sbatch passes it on to the job) and only ``env`` exported."""
        from ordinary_user import as_user

        cmd = as_user(user, ["sbatch", "--parsable", *map(str, args)], umask, cwd,
                                    {**env, "SLURM_CONF": str(self.conf)})
        proc = subprocess.run(["sh", "-c", cmd], capture_output=True, text=True, timeout=60)
        if proc.returncode != 0:
            raise SlurmError(f"sbatch {args} as {user.pw_name} failed: {proc.stderr.strip()}")
        return int(proc.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict:
        """``scontrol show job`` as a dict (JobState, Restarts, ExitCode, BeginTime, ...)."""
        out = subprocess.run(["scontrol", "-o", "show", "job", str(job_id)], env=self.env(),
                             capture_output=True, text=True, timeout=30).stdout
        info = {}
        for field in out.split():
            k, _, v = field.partition("=")
            info.setdefault(k, v)
        return info

    def wait(self, job_id: int, timeout: float = 300.0, start_requeued_now: bool = True) -> dict:
        """Wait until the job has finished for good (a requeued job is pending again, not finished)."""
        deadline = time.time() + timeout
        released = set()
        while time.time() < deadline:
            info = self.job(job_id)
            state = info.get("JobState", "")
            if state in FINISHED:
                return info
            restarts = info.get("Restarts", "0")
            held = state == "PENDING" and info.get("Reason") == "BeginTime"
            if start_requeued_now and held and restarts not in released:
                # slurmctld holds a requeued batch job for about two minutes (its credential lifetime)
                # before it may start again. Production clusters live with that; the test asks for a
                # start a few seconds later so it fits its time budget. Not "now": slurmd refuses a
                # credential issued in the same second as the previous run's revocation ("Job
                # credential revoked") and the job fails. Nothing else is changed.
                subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now+5"], env=self.env(),
                               capture_output=True, timeout=30)
                released.add(restarts)
            time.sleep(1.0)
        raise SlurmError(f"job {job_id} did not finish within {timeout:.0f} s: {self.job(job_id)}")

    def log_tail(self, name: str = "slurmctld", chars: int = 3000) -> str:
        p = self.root / "log" / f"{name}.log"
        return p.read_text(errors="replace")[-chars:] if p.exists() else ""

    # -- helpers -------------------------------------------------------------------------------------
    def _run(self, cmd: list[str], env: dict | None = None) -> None:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
        if proc.returncode != 0:
            raise SlurmError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}\n{self.log_tail()}")

    def _ok(self, cmd: list[str], need_output: bool = False) -> bool:
        try:
            p = subprocess.run(cmd, env=self.env(), capture_output=True, text=True, timeout=15)
        except subprocess.TimeoutExpired:
            return False
        return p.returncode == 0 and (bool(p.stdout.strip()) if need_output else True)

    def _node_idle(self) -> bool:
        p = subprocess.run(["sinfo", "-h", "-N", "-o", "%t"], env=self.env(), capture_output=True, text=True,
                           timeout=15)
        return p.returncode == 0 and p.stdout.split() == ["idle"] * len(self.nodes)

    def _wait_for(self, cond, what: str) -> None:
        deadline = time.time() + self.start_timeout
        while time.time() < deadline:
            if cond():
                return
            time.sleep(0.5)
        raise SlurmError(f"timed out waiting for {what}\nslurmctld: {self.log_tail()}\n"
                         f"slurmd: {self.log_tail('slurmd')}")

    def _pid(self, name: str) -> int | None:
        p = self._pidfiles[name]
        try:
            return int(p.read_text().strip())
        except (OSError, ValueError):
            return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie of ours counts as gone
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


class SlowSyntheticDataset:
    """The tiny configs' SyntheticDataset, sleeping ``delay`` seconds per sample.

    Lets a tiny job outlast SLURM's time-limit signal (checked every 30 s) without using the CPUs;
    the samples, and so the losses, are exactly those of SyntheticDataset.
    """

    def __init__(self, delay: float = 0.1, **kwargs):
        from megatron_apriel.data.synthetic import SyntheticDataset

        self.inner = SyntheticDataset(**kwargs)
        self.delay = delay

    def __len__(self):
        return len(self.inner)

    def __getitem__(self, i: int) -> dict:
        time.sleep(self.delay)
        return self.inner[i]
