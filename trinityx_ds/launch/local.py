"""Launch N local processes with torchrun: used by tests and by the CLI's `--nproc N`."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import psutil  # a DeepSpeed dependency

CPU_ENV = {
    "DS_ACCELERATOR": "cpu",
    "CUDA_VISIBLE_DEVICES": "",
    "OMP_NUM_THREADS": "1",  # N processes share the cores; more threads each only thrash
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "PYTHONFAULTHANDLER": "1",
}


def cpu_env(extra: dict | None = None) -> dict:
    """A copy of os.environ for CPU-only runs (DeepSpeed's CPU accelerator, no hub access)."""
    return {**os.environ, **CPU_ENV, **(extra or {})}


def free_port() -> int:
    """A TCP port free right now on 127.0.0.1 (for torchrun's rendezvous)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_torchrun(
    argv: list[str],
    nproc: int,
    timeout: float,
    env: dict | None = None,
    cwd: str | Path | None = None,
    capture: bool = True,
) -> subprocess.CompletedProcess:
    """Run `argv` (a script and its arguments) in `nproc` local processes under torchrun.

    Output (stdout and stderr merged) is captured unless `capture` is False. The job runs in its
    own session; on timeout the agent and all its workers are killed together, then
    TimeoutError carries the tail of the output.
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
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, None)


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
