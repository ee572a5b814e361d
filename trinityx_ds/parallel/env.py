"""Where this process sits in the job, from whichever launcher started it (torchrun, DeepSpeed's
launcher, srun), and joining it: the rank's side of a launch. Starting processes is
`trinityx_ds.launch`'s (`launch/torchrun.py` on one machine, `launch/slurm.py` on a cluster).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import signal
import socket
import subprocess
from dataclasses import dataclass
from typing import Mapping

DEFAULT_PORT = 29500


def free_port() -> int:
    """A TCP port free right now on 127.0.0.1 (for torchrun's rendezvous)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int
    launcher: str  # "torchrun", "deepspeed", "slurm" or "single"


def dist_env() -> DistEnv:
    """Read rank and rendezvous from torchrun/deepspeed (RANK...), else srun (SLURM_*), else
    a single process. RANK wins over SLURM_*: under `srun torchrun`, each worker has both."""
    env = os.environ
    addr, port = env.get("MASTER_ADDR"), env.get("MASTER_PORT")
    if "RANK" in env:
        local_size = env.get("LOCAL_WORLD_SIZE") or env.get("LOCAL_SIZE") or env["WORLD_SIZE"]
        # deepspeed's launcher sets LOCAL_SIZE, torchrun LOCAL_WORLD_SIZE
        deepspeed = "LOCAL_SIZE" in env and "LOCAL_WORLD_SIZE" not in env
        return DistEnv(
            rank=int(env["RANK"]),
            world_size=int(env["WORLD_SIZE"]),
            local_rank=int(env.get("LOCAL_RANK", 0)),
            local_world_size=int(local_size),
            master_addr=addr or "127.0.0.1",
            master_port=int(port or DEFAULT_PORT),
            launcher="deepspeed" if deepspeed else "torchrun",
        )
    if "SLURM_PROCID" in env:
        # Jobs sharing a node must not share a port: derive it from the job id.
        job_port = 20000 + int(env.get("SLURM_JOB_ID", 0)) % 40000
        return DistEnv(
            rank=int(env["SLURM_PROCID"]),
            world_size=int(env["SLURM_NTASKS"]),
            local_rank=int(env.get("SLURM_LOCALID", 0)),
            local_world_size=_slurm_tasks_on_node(env),
            master_addr=addr or _first_host(env.get("SLURM_JOB_NODELIST", "127.0.0.1")),
            master_port=int(port or job_port),
            launcher="slurm",
        )
    # Alone on the machine or not: a free port keeps concurrent single-process jobs apart.
    return DistEnv(0, 1, 0, 1, addr or "127.0.0.1", int(port or free_port()), "single")


def _slurm_tasks_on_node(env: Mapping[str, str]) -> int:
    """This node's task count: SLURM_NTASKS_PER_NODE if given, else this node's entry of
    SLURM_TASKS_PER_NODE, which srun writes compressed ("2(x3),1" = 2,2,2,1)."""
    if "SLURM_NTASKS_PER_NODE" in env:
        return int(env["SLURM_NTASKS_PER_NODE"])
    counts = []
    for item in env.get("SLURM_TASKS_PER_NODE", "1").split(","):
        count, _, repeat = item.partition("(x")
        counts += [int(count)] * int(repeat.rstrip(")") or 1)
    return counts[min(int(env.get("SLURM_NODEID", 0)), len(counts) - 1)]


def _first_host(nodelist: str) -> str:
    """The first host of a Slurm nodelist: `scontrol show hostnames` if it runs, else the first
    name parsed from the list itself ("node[03-05,9],gpu1" -> "node03")."""
    try:
        out = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.SubprocessError):
        pass
    prefix, _, ranges = re.match(r"([^,\[]*)(\[([^\]]*)\])?", nodelist).group(1, 2, 3)
    return prefix + re.split(r"[-,]", ranges)[0] if ranges else prefix


def init_distributed(backend: str | None = None) -> DistEnv:
    """Export this process's place in the job as the env:// variables and join the job.

    Through `deepspeed.init_distributed`, even on CPU where it is slower than torch's own
    init_process_group (0.01 s): it first builds DeepSpeed's shm_comm op, 31.5 s on a fresh
    TORCH_EXTENSIONS_DIR, 0.1-0.4 s once cached. Calling torch directly would only postpone that
    build to `deepspeed.initialize` (which does pick up an existing torch group), and until then
    `deepspeed.comm` is unset, so `deepspeed.utils.groups` (expert groups, made before
    `deepspeed.initialize`) fails with an AssertionError. Workers that need no DeepSpeed at all
    may call torch.distributed.init_process_group("gloo") themselves.
    """
    import deepspeed

    from trinityx_ds.parallel.device import bind

    denv = dist_env()
    os.environ.update(
        RANK=str(denv.rank),
        WORLD_SIZE=str(denv.world_size),
        MASTER_ADDR=denv.master_addr,
        MASTER_PORT=str(denv.master_port),
    )
    stay_with_launcher(denv)
    device = bind(denv.local_rank)  # one GPU per local rank, before NCCL picks cuda:0 for everyone
    # LOCAL_RANK is the device index this rank uses: DeepSpeed's engine binds cuda:LOCAL_RANK
    # itself, which must be ours also where each srun task sees only its own GPU (index 0)
    cuda = device.type == "cuda"
    os.environ["LOCAL_RANK"] = str(device.index if cuda else denv.local_rank)
    backend = backend or ("nccl" if cuda else "gloo")
    deepspeed.init_distributed(dist_backend=backend)
    return denv


PR_SET_PDEATHSIG = 1  # linux/prctl.h
try:  # resolved at import, not after a fork (dlopen in a forked child of a threaded parent can hang)
    _PRCTL = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):  # not Linux
    _PRCTL = None


def stay_with_launcher(denv: DistEnv | None = None) -> None:
    """A rank that a local agent started (torchrun's, DeepSpeed's launcher) does not outlive it:
    the agent's death sends it SIGTERM (`die_with_parent`). Called as early as a worker can (the
    training CLI, before any heavy import) and again by `init_distributed`; idempotent. Under srun
    the parent is Slurm's step daemon, which kills its tasks itself."""
    if (denv or dist_env()).launcher in ("torchrun", "deepspeed"):
        die_with_parent()


def die_with_parent(sig: int = signal.SIGTERM, parent: int | None = None) -> bool:
    """Ask the kernel to send `sig` to this process when its parent dies (Linux prctl
    PR_SET_PDEATHSIG): a torchrun worker whose agent is killed, an agent whose launcher is killed,
    gets SIGTERM (a training rank then saves and stops) instead of running on as an orphan. Not
    polling: the kernel delivers it however the parent dies, SIGKILL included. `parent`: the pid
    the caller expects as its parent; if it is already gone (it died before this call), `sig` is
    sent at once. Returns False where the platform has no such request (not Linux). Safe between
    fork and exec (launch_torchrun's preexec_fn): nothing is loaded or allocated but a call."""
    if _PRCTL is None or _PRCTL(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        return False
    if parent is not None and os.getppid() != parent:
        with contextlib.suppress(ProcessLookupError):
            os.kill(os.getpid(), sig)
    return True
