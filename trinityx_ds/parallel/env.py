"""Where this process sits in the job, from whichever launcher started it; process-group set-up;
and the local end of it: N processes on this machine under torchrun (the CLI's, the evaluation's
and the demo's `--nproc N`, the tests). `trinityx_ds.launch.local` is the public name of the
latter for launchers, tests and tools; it lives here because evaluation, below launch/, starts
itself in N processes too.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import psutil  # a DeepSpeed dependency

DEFAULT_PORT = 29500
RELAUNCH_TIMEOUT = 7 * 24 * 3600  # a local training or evaluation job: no practical limit

CPU_ENV = {
    "DS_ACCELERATOR": "cpu",
    "CUDA_VISIBLE_DEVICES": "",
    "OMP_NUM_THREADS": "1",  # N processes share the cores; more threads each only thrash
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "PYTHONFAULTHANDLER": "1",
    # no CUDA here: megatron's advice to set it (for overlapping TP communication on GPUs) is noise
    "CUDA_DEVICE_MAX_CONNECTIONS": "1",
}


def cpu_env(extra: dict | None = None) -> dict:
    """A copy of os.environ for CPU-only runs (DeepSpeed's CPU accelerator, no hub access)."""
    return {**os.environ, **CPU_ENV, **(extra or {})}


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
    device = bind(denv.local_rank)  # one GPU per local rank, before NCCL picks cuda:0 for everyone
    # LOCAL_RANK is the device index this rank uses: DeepSpeed's engine binds cuda:LOCAL_RANK
    # itself, which must be ours also where each srun task sees only its own GPU (index 0)
    cuda = device.type == "cuda"
    os.environ["LOCAL_RANK"] = str(device.index if cuda else denv.local_rank)
    backend = backend or ("nccl" if cuda else "gloo")
    deepspeed.init_distributed(dist_backend=backend)
    return denv


# ---------------------------------------------------------------------------------- local jobs
def launch_torchrun(
    argv: list[str],
    nproc: int,
    timeout: float,
    env: dict | None = None,
    cwd: str | Path | None = None,
    capture: bool = True,
    forward_signals: bool = False,
) -> subprocess.CompletedProcess:
    """Run `argv` (a script and its arguments) in `nproc` local processes under torchrun.

    Output (stdout and stderr merged) is captured unless `capture` is False. The job runs in its
    own session; on timeout the agent and all its workers are killed together, then
    TimeoutError carries the tail of the output. With `forward_signals`, SIGINT and SIGTERM to
    this process reach every worker as SIGTERM (a training worker finishes its step, saves and
    exits), this process waits for the job to end and returns 128 + the signal's number; a second
    signal kills the job at once. Nothing of the job outlives this process.
    """
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        "--master_addr=127.0.0.1",
        f"--master_port={free_port()}",
        *map(str, argv),
    ]
    out = subprocess.PIPE if capture else None
    proc = subprocess.Popen(
        cmd,
        env=env,
        cwd=cwd,
        stdout=out,
        stderr=subprocess.STDOUT if capture else None,
        text=True,
        start_new_session=True,
    )
    received: list[int] = []
    signalled: list = []  # the workers a forwarded signal reached

    def forward(signum, frame):
        if received:  # asked twice: stop now
            _kill_job(proc.pid)
            return
        received.append(signum)
        signalled.extend(_signal_workers(proc.pid, signal.SIGTERM))

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)} if forward_signals else {}
    try:
        stdout, _ = proc.communicate(timeout=timeout)
    except BaseException as exc:  # a timeout, or Ctrl-C: leave no process behind
        _kill_job(proc.pid)
        stdout, _ = proc.communicate()
        if not isinstance(exc, subprocess.TimeoutExpired):
            raise
        tail = (stdout or "")[-4000:]
        raise TimeoutError(
            f"torchrun {argv} timed out after {timeout:.0f}s; output tail:\n{tail}"
        ) from None
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    for worker in signalled:  # the agent is gone: none of its workers may outlive it
        with contextlib.suppress(psutil.NoSuchProcess):
            worker.kill()
    return subprocess.CompletedProcess(cmd, 128 + received[0] if received else proc.returncode, stdout, None)


def _signal_workers(agent: int, sig: int) -> list:
    """`sig` to every process the torchrun agent started (each in a session of its own); returns them."""
    try:
        workers = psutil.Process(agent).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    for worker in workers:
        with contextlib.suppress(psutil.NoSuchProcess):
            worker.send_signal(sig)
    return workers


class LaunchError(ValueError):
    """A local job this machine cannot run as asked (one line, before any process starts)."""


def local_job_env(nproc: int, tp: int = 1, cpu_fallback: bool = False, what: str = "--nproc") -> dict:
    """The environment of `nproc` local processes: CPU-only (`cpu_env`) where no GPU is visible;
    one GPU per process where enough are (with CUDA_DEVICE_MAX_CONNECTIONS=1 at TP > 1, which
    megatron needs to overlap its TP communication with the GEMMs); fewer GPUs than processes
    (two ranks on one GPU: NCCL refuses a duplicate GPU) is refused in one line, or, with
    `cpu_fallback` (the demo), runs on CPU with a notice."""
    import torch

    if not torch.cuda.is_available():
        return cpu_env()
    gpus = torch.cuda.device_count()
    if nproc > gpus:
        if cpu_fallback:
            print(f"{what} {nproc}: {gpus} GPU(s) visible, one per process needed: running on CPU",
                  file=sys.stderr)
            return cpu_env()
        raise LaunchError(f"{what} {nproc}: this machine shows {gpus} GPU(s) and each process needs its own "
                          f"(NCCL refuses two ranks on one GPU); use {what} {gpus} or fewer, or "
                          "CUDA_VISIBLE_DEVICES= to run on CPU")
    env = dict(os.environ)
    if tp > 1:
        env["CUDA_DEVICE_MAX_CONNECTIONS"] = "1"
    return env


def relaunch(argv: list[str], nproc: int, tp: int = 1, cpu_fallback: bool = False) -> int:
    """Become `nproc` local processes running `argv` (e.g. `["-m", "trinityx_ds.cli", "train", ...]`)
    under torchrun, their output on this terminal, in `local_job_env`'s environment. Returns the
    job's exit code."""
    env = local_job_env(nproc, tp, cpu_fallback)
    return launch_torchrun(argv, nproc, timeout=RELAUNCH_TIMEOUT, env=env, capture=False,
                           forward_signals=True).returncode


def _kill_job(agent: int) -> None:
    """SIGKILL the job's process group and every descendant of the agent: torchrun starts each
    worker in a session of its own, so the group alone would leave hung workers running."""
    try:
        workers = psutil.Process(agent).children(recursive=True)
    except psutil.NoSuchProcess:
        workers = []
    with contextlib.suppress(ProcessLookupError):
        os.killpg(agent, signal.SIGKILL)
    for worker in workers:
        with contextlib.suppress(psutil.NoSuchProcess):
            worker.kill()
