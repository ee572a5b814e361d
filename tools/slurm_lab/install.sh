#!/usr/bin/env bash
# Installs Debian's Slurm 22.05 + munge (+ PMIx for `srun --mpi=pmix`) for the local two-node lab
# and tests/slurm/. A no-op when all are present; when not root (or no apt-get) it says so and
# exits 0, so `make test` can call it anywhere: the Slurm tests then skip, naming the reason.
set -euo pipefail
PKGS=(munge slurmctld slurmd slurm-client libpmix-dev)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
  echo "slurm lab: not root or no apt-get: not installing ${missing[*]} (the Slurm tests will skip)" >&2
  exit 0
fi
echo "slurm lab: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
