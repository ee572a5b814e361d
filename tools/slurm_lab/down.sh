#!/usr/bin/env bash
# Tears the lab down and leaves nothing behind: cancels its jobs, stops only the processes it
# recorded or that live in its own namespaces (TERM, KILL after 10 s), stops its munged,
# deletes its namespaces and its folder. Safe to re-run; never kills anything by name.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
. "$HERE/common.sh"

[ "$(id -u)" = 0 ] || { echo "slurm lab: needs root" >&2; exit 2; }
if [ -x "$LAB/bin/scancel" ] && [ -e "/run/netns/$NS1" ]; then
  timeout 5 "$LAB/bin/scancel" --quiet --user=root >/dev/null 2>&1 || true
fi

ns_inodes=()
for ns in "$NS1" "$NS2"; do
  [ -e "/run/netns/$ns" ] && ns_inodes+=("$(stat -L -c %i "/run/netns/$ns")")
done
ours() {  # the pids to stop: recorded daemons still in our namespaces, and everything inside them
  local pid ino
  for pid in $(cat "$LAB"/run/daemons.pids "$LAB"/run/slurm*.pid 2>/dev/null); do
    ino=$(stat -L -c %i "/proc/$pid/ns/net" 2>/dev/null) || continue
    [[ " ${ns_inodes[*]:-} " == *" $ino "* ]] && echo "$pid"
  done
  for ns in "$NS1" "$NS2"; do
    [ -e "/run/netns/$ns" ] && ip netns pids "$ns" 2>/dev/null
  done
  return 0
}
pids=$(ours | sort -u)
if [ -n "$pids" ]; then
  kill -TERM $pids 2>/dev/null || true
  for _ in $(seq 1 40); do
    pids=$(ours | sort -u)
    [ -z "$pids" ] && break
    sleep 0.25
  done
  [ -n "$pids" ] && kill -KILL $pids 2>/dev/null || true
fi

if [ -S "$MUNGE/munge.socket" ]; then
  munged --stop --socket="$MUNGE/munge.socket" >/dev/null 2>&1 || true
fi
if [ -f "$LAB/run/munged.pid" ]; then  # still there: only if it is our munged (its socket path)
  pid=$(cat "$LAB/run/munged.pid")
  if tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "--socket=$MUNGE/munge.socket"; then
    kill -KILL "$pid" 2>/dev/null || true
  fi
fi

[ -f "$MUNGE/munge.key" ] && rm -rf -- "$MUNGE"
for ns in "$NS1" "$NS2"; do
  [ -e "/run/netns/$ns" ] && ip netns del "$ns"
done
ip link show "${NS}-v1" >/dev/null 2>&1 && ip link del "${NS}-v1"
if [ -f "$LAB/$MARK" ]; then
  rm -rf -- "$LAB"
elif [ -e "$LAB" ]; then
  echo "slurm lab: $LAB was not made by up.sh; left in place" >&2
fi
echo "slurm lab: down"
