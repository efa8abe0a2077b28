#!/usr/bin/env bash
# The system packages the tests and the launchers need, on Debian/Ubuntu (run as root or with sudo).
# .ci/run calls this script, and the README's test command starts with it, so the list lives here only.
# Safe to rerun: it installs only what is missing. A test whose package is still missing skips and
# names this script (tests/conftest.py: INSTALL_HINT).
#
#   slurmctld slurmd slurm-client munge  a real one-node SLURM on localhost for the launcher tests
#   iproute2                             the two-node SLURM test (each slurmd in its own network namespace)
#   bubblewrap                           the code reward's sandbox (the namespaces Flatpak uses, no root)
#   gcc                                  the compiled Tekken path (setup.py's optional extension)
#   g++                                  torch.compile on the CPU (the rope fusion; inductor builds C++)
#   apriel-ci (a user)                   tests/test_sandbox.py reruns the hostile programs as an ordinary user
#   apriel-ci2 (in apriel-ci's group)    its teammate: runs shared between users (test_shared_clusters.py, SLURM)
set -euo pipefail

if [ "$(id -u)" != 0 ]; then
  if command -v sudo >/dev/null 2>&1; then exec sudo "$0" "$@"; fi
  echo "error: $0 must run as root (apt-get, useradd)" >&2
  exit 2
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "error: $0 needs apt-get (Debian/Ubuntu); elsewhere install the equivalents of:" \
       "slurmctld slurmd slurm-client munge iproute2 bubblewrap gcc g++, and add a user apriel-ci" >&2
  exit 2
fi

# package -> a file it installs, so a rerun does nothing when all are present
declare -A PROVIDES=(
  [slurmctld]=slurmctld [slurmd]=slurmd [slurm-client]=sbatch [munge]=munged
  [iproute2]=ip [bubblewrap]=bwrap [gcc]=gcc [g++]=g++
)
missing=()
for pkg in "${!PROVIDES[@]}"; do
  bin=${PROVIDES[$pkg]}
  command -v "$bin" >/dev/null 2>&1 || [ -x "/usr/sbin/$bin" ] || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if ! id apriel-ci >/dev/null 2>&1; then
  useradd --system --no-create-home --shell /usr/sbin/nologin apriel-ci
  echo "added user apriel-ci"
fi
# its teammate in the same group: tests/test_shared_clusters.py and the SLURM tests share runs between them
if ! id apriel-ci2 >/dev/null 2>&1; then
  useradd --system --no-create-home --shell /usr/sbin/nologin -g apriel-ci apriel-ci2
  echo "added user apriel-ci2"
fi
echo "system packages: ok"
