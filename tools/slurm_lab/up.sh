#!/usr/bin/env bash
# Stands up a real two-node Slurm cluster on this machine (root): nodes node1/node2, each in a
# network namespace of its own (127.0.0.21/.22 over a veth pair), one munged, slurmctld on node1,
# a slurmd per node. Waits until both nodes are idle. Idempotent: a healthy lab is left as is,
# a broken one is torn down and made again.
# Use it:  source "$SLURM_LAB_DIR/env.sh"   (PATH gets wrappers that run sbatch, squeue, ...
# inside node1's namespace), then sbatch as usual. Tear down: tools/slurm_lab/down.sh.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
. "$HERE/common.sh"

[ "$(id -u)" = 0 ] || { echo "slurm lab: needs root (namespaces, munged, slurmd)" >&2; exit 2; }
for b in munged slurmctld slurmd sbatch nsenter unshare ip; do
  command -v "$b" >/dev/null || { echo "slurm lab: $b missing (run tools/slurm_lab/install.sh)" >&2; exit 2; }
done

nodes_ready() {  # both nodes answer and are usable (idle, or busy with jobs)
  local states
  states=$(timeout 5 "$LAB/bin/sinfo" -h -N -o '%N %t' 2>/dev/null | sort -u) || return 1
  [ "$(grep -cE '^node[12] (idle|mix|alloc|comp)$' <<<"$states")" = 2 ]
}

if [ -f "$LAB/$MARK" ] && [ -x "$LAB/bin/sinfo" ] && nodes_ready; then
  echo "slurm lab: already up ($LAB)"
  exit 0
fi
if [ -e "$LAB" ] && [ ! -f "$LAB/$MARK" ] && [ -n "$(ls -A "$LAB" 2>/dev/null)" ]; then
  echo "slurm lab: $LAB exists and was not made by up.sh; pick another SLURM_LAB_DIR" >&2
  exit 2
fi
"$HERE/down.sh" >/dev/null  # leftovers of a crashed or half-made lab

mkdir -p "$MUNGE" "$LAB"/{state,run,log,bin,dev,spool/node1,spool/node2,tmp/node1,tmp/node2}
touch "$LAB/$MARK"
chmod 755 "$MUNGE"  # munged refuses a socket folder others cannot traverse

# --- munge: one daemon in the root namespace; its socket is a file, reachable from every node
dd if=/dev/urandom of="$MUNGE/munge.key" bs=1024 count=1 status=none
chmod 400 "$MUNGE/munge.key"
munged --socket="$MUNGE/munge.socket" --key-file="$MUNGE/munge.key" \
  --pid-file="$LAB/run/munged.pid" --log-file="$LAB/log/munged.log" --seed-file="$MUNGE/munged.seed"

# --- network: node1 <-veth-> node2, loopback-range addresses only
ip netns add "$NS1"
ip netns add "$NS2"
ip link add "${NS}-v1" type veth peer name "${NS}-v2"
for i in 1 2; do
  ns=${NS}-n$i dev=${NS}-v$i peer=$((3 - i))
  ip link set "$dev" netns "$ns"
  in_ns() { nsenter --net="/run/netns/$ns" "$@"; }
  in_ns ip link set lo up
  in_ns ip link set "$dev" up
  for c in all default "$dev"; do
    in_ns sysctl -qw "net.ipv4.conf.$c.route_localnet=1" "net.ipv4.conf.$c.rp_filter=0"
  done
  in_ns ip route del local 127.0.0.0/8 dev lo table local  # else 127/8 never leaves the node
  in_ns ip addr add "127.0.0.2$i/32" dev "$dev"
  in_ns ip route add "127.0.0.2$peer/32" dev "$dev"
done
printf '127.0.0.1 localhost\n127.0.0.21 node1\n127.0.0.22 node2\n' >"$LAB/hosts"

# --- Slurm: config, fake GPUs (they only set CUDA_VISIBLE_DEVICES), command wrappers
sed -e "s|{{LAB}}|$LAB|g" -e "s|{{MUNGE}}|$MUNGE|g" "$HERE/slurm.conf.in" >"$LAB/slurm.conf"
for g in 0 1; do mknod -m 666 "$LAB/dev/fakegpu$g" c 1 3; done
echo "Name=gpu File=$LAB/dev/fakegpu[0-1]" >"$LAB/gres.conf"
for cmd in "${SLURM_CMDS[@]}"; do
  real=$(command -v "$cmd") || continue
  cat >"$LAB/bin/$cmd" <<WRAP
#!/bin/sh
# $cmd on the lab cluster: inside node1's network namespace, unless already on a lab node.
export SLURM_CONF=$LAB/slurm.conf
me=\$(stat -L -c %i /proc/self/ns/net)
for ns in $NS1 $NS2; do
  [ "\$me" = "\$(stat -L -c %i /run/netns/\$ns 2>/dev/null)" ] && exec $real "\$@"
done
exec nsenter --net=/run/netns/$NS1 $real "\$@"
WRAP
  chmod +x "$LAB/bin/$cmd"
done
printf 'export SLURM_CONF=%s\nexport PATH=%s:$PATH\n' "$LAB/slurm.conf" "$LAB/bin" >"$LAB/env.sh"

# --- daemons: each with the node's network, its own /etc/hosts and hostname
start_on() {  # NODE NAMESPACE COMMAND...
  local node=$1 ns=$2
  shift 2
  setsid nsenter --net="/run/netns/$ns" unshare --mount --uts sh -c \
    "mount --bind '$LAB/hosts' /etc/hosts && hostname $node && exec $*" \
    </dev/null >>"$LAB/log/$node-daemons.out" 2>&1 &
  echo $! >>"$LAB/run/daemons.pids"
}
export SLURM_CONF=$LAB/slurm.conf
start_on node1 "$NS1" slurmctld -D -f "$LAB/slurm.conf"
start_on node1 "$NS1" slurmd -D -f "$LAB/slurm.conf" -N node1
start_on node2 "$NS2" slurmd -D -f "$LAB/slurm.conf" -N node2

for _ in $(seq 1 120); do
  if nodes_ready; then
    echo "slurm lab: up ($LAB): node1, node2 idle; source $LAB/env.sh to use it"
    exit 0
  fi
  sleep 0.25
done
echo "slurm lab: nodes not idle after 30 s; logs in $LAB/log:" >&2
tail -n 5 "$LAB"/log/*.log >&2 || true
exit 1
