"""A real two-node SLURM cluster on one machine: each slurmd in its own network and UTS namespace.

The one-node cluster (slurm_cluster.py) runs every task on one host, so the multi-node paths of
the launchers never run there: MASTER_ADDR taken from ``scontrol show hostnames``, name resolution
of the first node, srun across hosts, signals and requeue of a job whose tasks live on two hosts,
gloo rendezvous between hosts. Here the two nodes are two hosts as far as SLURM and the tasks can
tell:

- ``apriel-n1`` and ``apriel-n2`` each run a slurmd inside a network namespace (own loopback, own
  ``eth0`` on a veth pair) and a UTS namespace (own hostname), with a private ``/etc/hosts``
  (bind-mounted inside a mount namespace) that names both nodes; they still share the machine's
  process table and file system (the latter as compute nodes share a parallel file system);
- the host ends of the veth pairs sit on a bridge made for this cluster, which carries the
  controller's address; addresses come from 10.231.X.0/24, a private range used only on this
  bridge, so the jobs' traffic never leaves the machine;
- munged and slurmctld run in the host namespace (as in the one-node cluster: own scratch folder,
  munge socket and free ports); the nodes reach munged through its socket on the shared file system
  and share the checkout the same way.

Every name (namespaces, bridge, veths) carries this process's pid, and the subnet is one that no
interface uses yet, so it runs beside a one-node cluster or another two-node one. ``stop`` cancels
the jobs, ends the daemons by their pids and every process left in the namespaces, then deletes
the namespaces and the bridge (the veths go with them), also after a failed start.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

from slurm_cluster import SlurmCluster, SlurmError, _alive, _which

NODES = ("apriel-n1", "apriel-n2")
NET_TOOLS = ("ip", "nsenter", "unshare", "mount", "hostname")


def missing_net_tools() -> list[str]:
    return [t for t in NET_TOOLS if shutil.which(t) is None]


def _ip(*args: str, netns: str | None = None) -> None:
    cmd = ["ip", *(["-n", netns] if netns else []), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        raise SlurmError(f"{' '.join(cmd)} failed: {proc.stderr.strip()}")


def _free_subnet() -> int:
    """X in 10.231.X.0/24 such that no interface of the host has an address there yet."""
    used = subprocess.run(["ip", "-o", "-4", "addr"], capture_output=True, text=True, timeout=30).stdout
    start = os.getpid() % 250
    for k in range(250):
        x = (start + k) % 250 + 1
        if f" 10.231.{x}." not in used:
            return x
    raise SlurmError("no free subnet in 10.231.0.0/16 for the two-node test cluster")


def _remove_stale_networks() -> None:
    """Namespaces and bridges of a cluster whose test process was killed before ``stop`` (SIGKILL,
    a CI timeout): the owner's pid is in their names. Namespaces that still hold processes are left."""
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=30).stdout
    for name, pid in re.findall(r"^(apriel(\d+)n\d)\b", listed, flags=re.M):
        pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True, timeout=30).stdout
        if not _alive(int(pid)) and not pids.strip():
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)
    links = subprocess.run(["ip", "-o", "link", "show", "type", "bridge"], capture_output=True, text=True,
                           timeout=30).stdout
    for name, pid in re.findall(r"^\d+: (apbr(\d+))[:@]", links, flags=re.M):
        if not _alive(int(pid)):
            subprocess.run(["ip", "link", "del", name], capture_output=True, timeout=30)


class TwoNodeSlurmCluster(SlurmCluster):
    def __init__(self, root: Path, cpus: int = 2, start_timeout: float = 60.0):
        super().__init__(root, cpus=cpus, start_timeout=start_timeout)
        tag = os.getpid()
        self.subnet = _free_subnet()
        self.gateway = f"10.231.{self.subnet}.1"
        self.nodes = list(NODES)
        self.addrs = {n: f"10.231.{self.subnet}.{i + 2}" for i, n in enumerate(NODES)}
        self.netns = {n: f"apriel{tag}n{i + 1}" for i, n in enumerate(NODES)}
        self.veths = {n: f"apv{tag}n{i + 1}" for i, n in enumerate(NODES)}  # host ends, <= 15 chars
        self.bridge = f"apbr{tag}"
        # The controller keeps the machine's hostname (slurmctld checks it) and is reached on the bridge.
        self.ctl_host = f"{self.host}({self.gateway})"
        self.per_node = "-%n"
        # A requeued job whose start time has come waits for the next scheduling pass (up to 30 s
        # with the defaults; measured: 27 s): passes every 2 s start it about 2 s after that time.
        self.extra_conf = "SchedulerParameters=bf_interval=2,sched_interval=2"
        self.hosts_file = self.root / "hosts"
        self._pidfiles = {**{f"slurmd-{n}": self.root / f"slurmd-{n}.pid" for n in NODES},
                          "slurmctld": self.root / "slurmctld.pid", "munged": self.root / "munge" / "munged.pid"}
        self._made: list[tuple[str, str]] = []  # ("netns" | "link", name), for stop

    def node_lines(self, mem: int) -> str:
        per_node = max(500, mem // len(NODES))
        return "\n".join(f"NodeName={n} NodeAddr={self.addrs[n]} NodeHostname={n} CPUs={self.cpus} "
                         f"RealMemory={per_node} State=UNKNOWN" for n in NODES)

    def start(self) -> None:
        missing = missing_net_tools()
        if missing:
            raise SlurmError(f"missing {', '.join(missing)} for the two-node cluster "
                             "(apt-get install iproute2 util-linux mount)")
        self.root.mkdir(parents=True, exist_ok=True)
        _remove_stale_networks()
        self._make_network()
        super().start()

    def _make_network(self) -> None:
        self._made.append(("link", self.bridge))
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{self.gateway}/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        for n in NODES:
            ns, veth = self.netns[n], self.veths[n]
            self._made.append(("netns", ns))
            _ip("netns", "add", ns)
            _ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
            _ip("link", "set", veth, "master", self.bridge, "up")
            _ip("addr", "add", f"{self.addrs[n]}/24", "dev", "eth0", netns=ns)
            _ip("link", "set", "eth0", "up", netns=ns)
            _ip("link", "set", "lo", "up", netns=ns)
        lines = ["127.0.0.1 localhost", f"{self.gateway} {self.host}"]
        lines += [f"{self.addrs[n]} {n}" for n in NODES]
        self.hosts_file.write_text("\n".join(lines) + "\n")

    def start_slurmd(self, env: dict) -> None:
        """Each slurmd (and so every job step it forks) lives in its node's network namespace, with
        the node's hostname and an /etc/hosts that names the nodes, as on a compute node."""
        for n in NODES:
            inner = (f"mount --bind {self.hosts_file} /etc/hosts && hostname {n} && "
                     f"exec {_which('slurmd')} -f {self.conf} -N {n}")
            # Not `ip netns exec`: it remounts /sys, hiding the cgroup tree slurmd reads at start.
            # The private mount namespace keeps the bind mount of /etc/hosts to this node.
            self._run(["nsenter", f"--net=/run/netns/{self.netns[n]}", "unshare", "--uts", "--mount",
                       "--propagation", "private", "sh", "-c", inner], env=env)

    def pids_on(self, node: str) -> list[int]:
        """The processes running on one node (in its network namespace)."""
        out = subprocess.run(["ip", "netns", "pids", self.netns[node]], capture_output=True, text=True,
                             timeout=30).stdout
        return [int(p) for p in out.split()]

    def log_tail(self, name: str = "slurmctld", chars: int = 3000) -> str:
        if name == "slurmd":
            return "\n".join(f"{n}: {super(TwoNodeSlurmCluster, self).log_tail(f'slurmd-{n}', chars)}" for n in NODES)
        return super().log_tail(name, chars)

    def stop(self) -> None:
        try:
            super().stop()
        finally:
            self._remove_network()

    def _remove_network(self) -> None:
        for kind, name in reversed(self._made):
            if kind == "netns":
                # job processes outliving their slurmd (a failed start, a stuck step): end them by pid
                node = next(n for n, ns in self.netns.items() if ns == name)
                for pid in self.pids_on(node):
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                deadline = time.time() + 10
                while time.time() < deadline and any(_alive(p) for p in self.pids_on(node)):
                    time.sleep(0.2)
                subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)
            else:
                subprocess.run(["ip", "link", "del", name], capture_output=True, timeout=30)
        self._made.clear()
