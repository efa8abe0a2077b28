"""Run commands as ordinary users from a root test process: CI runs as root, clusters do not.

Why a mount namespace: a pyenv or venv under /root (mode 0700) is out of an ordinary user's reach,
yet the test must run this very interpreter with its packages. In a private mount namespace each
folder on the way that others cannot traverse is covered with a tmpfs of mode 0711 into which its
entries are bound back: the interpreter becomes reachable, every entry keeps its own permissions
and contents, and nothing outside the namespace changes. The local SLURM cluster starts slurmd the
same way (tests/slurm_cluster.py), so the jobs it runs as a user inherit that view.

Two users of one group stand for two teammates; .ci/run creates them (see INSTALL).
"""

from __future__ import annotations

import grp
import os
import pwd
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
USER_A, USER_B = "apriel-ci", "apriel-ci2"  # B's primary group is A's: two teammates
INSTALL = ("useradd --system --no-create-home --shell /usr/sbin/nologin apriel-ci; "
           "useradd --system --no-create-home --shell /usr/sbin/nologin -g apriel-ci apriel-ci2")


def require_teammates() -> tuple[pwd.struct_passwd, pwd.struct_passwd]:
    """The two users (created here when root and missing, as .ci/run does); skip where that cannot be."""
    if os.geteuid() != 0:
        missing = [n for n in (USER_A, USER_B) if n not in {u.pw_name for u in pwd.getpwall()}]
        pytest.skip("running as other users needs root (CI runs as root)"
                    + (f"; and the users: {INSTALL}" if missing else ""))
    for tool in ("unshare", "setpriv", "useradd"):
        if not any(Path(d, tool).exists() for d in ("/usr/bin", "/usr/sbin", "/bin", "/sbin")):
            pytest.skip(f"{tool} missing (util-linux / passwd)")
    for name, extra in ((USER_A, []), (USER_B, ["-g", USER_A])):
        try:
            pwd.getpwnam(name)
        except KeyError:
            proc = subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
                                   *extra, name], capture_output=True, text=True)
            if proc.returncode != 0:
                pytest.skip(f"cannot create {name} ({proc.stderr.strip()}): {INSTALL}")
    a, b = pwd.getpwnam(USER_A), pwd.getpwnam(USER_B)
    assert a.pw_gid == b.pw_gid, f"{USER_B} must have {USER_A}'s primary group: {INSTALL}"
    return a, b


def group_folder(path: Path, gid: int) -> Path:
    """A team's folder as an admin makes it: the team's group, group-writable, setgid so that
    everything created inside belongs to the group too."""
    path.mkdir(parents=True)
    os.chown(path, 0, gid)
    os.chmod(path, 0o2775)
    return path


def home(parent: Path, user: pwd.struct_passwd) -> Path:
    """A private HOME (and TMPDIR) for ``user``: caches of matplotlib, torch and HF land there."""
    path = parent / f"home-{user.pw_name}"
    path.mkdir(mode=0o700)
    os.chown(path, user.pw_uid, user.pw_gid)
    return path


def _blocked_folders() -> list[str]:
    """Folders on the way to this interpreter that others cannot traverse, outermost first."""
    out: list[str] = []
    for prefix in sorted({os.path.realpath(sys.prefix), os.path.realpath(sys.base_prefix)}):
        for p in [*reversed(Path(prefix).parents), Path(prefix)]:
            if not os.stat(p).st_mode & 0o001 and str(p) not in out:
                out.append(str(p))
    return out


def reach_interpreter(stash: Path) -> str:
    """Shell lines (as root, inside ``unshare --mount``) that make the interpreter reachable: each
    blocked folder is bound to ``stash``/N, covered with a 0711 tmpfs and its entries bound back."""
    lines = []
    for i, folder in enumerate(_blocked_folders()):
        s = shlex.quote(str(stash / str(i)))
        f = shlex.quote(folder)
        lines += [f"mkdir -p {s}", f"mount --bind {f} {s}", f"mount -t tmpfs -o mode=0711 none {f}",
                  f'for e in {s}/* {s}/.[!.]* {s}/..?*; do',
                  '  [ -e "$e" ] || [ -L "$e" ] || continue',
                  f'  n={f}/"${{e##*/}}"',
                  '  if [ -L "$e" ]; then cp -P "$e" "$n"',
                  '  elif [ -d "$e" ]; then mkdir "$n"; mount --rbind "$e" "$n"',
                  '  else touch "$n"; mount --bind "$e" "$n"; fi',
                  'done']
    return "\n".join(lines) + "\n"


def in_namespace(command: str, stash: Path) -> list[str]:
    """``command`` (a shell string) run by root in a private mount namespace that reaches the interpreter."""
    script = "set -e\n" + reach_interpreter(stash) + command
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script]


def user_env(user_home: Path, **extra: str) -> dict:
    return {"PATH": "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin", "HOME": str(user_home),
            "TMPDIR": str(user_home), "PYTHONPATH": str(REPO), "PYTHONDONTWRITEBYTECODE": "1",
            "OMP_NUM_THREADS": "1", **extra}


def as_user(user: pwd.struct_passwd, argv: list[str], umask: int, cwd: Path, env: dict) -> str:
    """The shell line that runs ``argv`` as ``user`` (its groups, no capabilities) with ``umask``."""
    assigns = " ".join(shlex.quote(f"{k}={v}") for k, v in env.items())
    return (f"cd {shlex.quote(str(cwd))}\numask {umask:03o}\n"
            f"exec setpriv --reuid={user.pw_uid} --regid={user.pw_gid} --init-groups --inh-caps=-all "
            f"env -i {assigns} {shlex.join(map(str, argv))}\n")


def run_as(user: pwd.struct_passwd, argv: list[str], umask: int, cwd: Path, env: dict, stash: Path,
           timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(in_namespace(as_user(user, argv, umask, cwd, env), stash), capture_output=True,
                          text=True, timeout=timeout)


def modes(root: Path) -> dict[str, tuple[int, str, str]]:
    """Every path under ``root`` (itself excluded): (permission bits with setgid, owner, group)."""
    out = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        out[str(p.relative_to(root))] = (st.st_mode & 0o7777, pwd.getpwuid(st.st_uid).pw_name,
                                         grp.getgrgid(st.st_gid).gr_name)
    return out
