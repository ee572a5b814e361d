"""Local jobs: N processes on this machine under torchrun, for `trinityx train/eval/demo --nproc N`,
the held-out evaluation, the parity check, the tests and the tools. The one place that starts,
signals and kills a local job (`launch_torchrun`, `kill_tree`), and that decides a local job's
environment (`local_job_env`: CPU-only, or one GPU per process). A rank joins the job it was
started in through `trinityx_ds.parallel.env`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil  # a DeepSpeed dependency

from trinityx_ds.errors import EXIT_FILE_ENV
from trinityx_ds.parallel.env import die_with_parent, free_port

FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)  # the terminal closing is SIGHUP

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
    TimeoutError carries the tail of the output. With `forward_signals`, SIGINT, SIGTERM and SIGHUP
    to this process reach every worker as SIGTERM (a training worker finishes its step, saves and
    exits), this process waits for the job to end and returns 128 + the signal's number; a second
    signal kills the job at once. Nothing of the job outlives this process, however it ends: the
    agent gets SIGTERM from the kernel when this process dies (even by SIGKILL), and stops its
    workers, which get the same from the kernel should the agent die first (`die_with_parent`,
    parallel/env.stay_with_launcher).
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
    launcher = os.getpid()
    proc = subprocess.Popen(
        cmd,
        env=env,
        cwd=cwd,
        stdout=out,
        stderr=subprocess.STDOUT if capture else None,
        text=True,
        start_new_session=True,
        preexec_fn=lambda: die_with_parent(signal.SIGTERM, parent=launcher),  # in the child, before exec
    )
    received: list[int] = []
    signalled: list = []  # the workers a forwarded signal reached

    def forward(signum, frame):
        if received:  # asked twice: stop now
            kill_tree(proc.pid)
            return
        received.append(signum)
        signalled.extend(_signal_workers(proc.pid, signal.SIGTERM))

    previous = {s: signal.signal(s, forward) for s in FORWARDED} if forward_signals else {}
    try:
        stdout, _ = proc.communicate(timeout=timeout)
    except BaseException as exc:  # a timeout, or Ctrl-C: leave no process behind
        kill_tree(proc.pid)
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
    import torch  # here: every command's parser imports this module (eval/runner.py), and only GPUs need torch

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
    job's exit code: 128 + the signal when interrupted; when it failed, the ranks' own code (2 bad
    input, 3 stopped by its guard, 4 storage: errors.one_line_errors records it) where one said,
    else torchrun's."""
    env = local_job_env(nproc, tp, cpu_fallback)
    with tempfile.NamedTemporaryFile(prefix="trinityx-exit-", mode="r") as codes:
        env[EXIT_FILE_ENV] = codes.name
        rc = launch_torchrun(argv, nproc, timeout=RELAUNCH_TIMEOUT, env=env, capture=False,
                             forward_signals=True).returncode
        said = [int(c) for c in codes.read().split() if c.isdigit()]
    return max(said) if rc and rc < 128 and said else rc


def kill_tree(pid: int) -> None:
    """SIGKILL process `pid`, its process group and every descendant, wherever their sessions are
    (torchrun starts each worker in a session of its own, so the group alone would miss them).
    The tree is frozen first (SIGSTOP, twice: what was forked meanwhile too), so nothing forks
    between the listing and the kill; orphans already reparented to a subreaper (this process,
    when it made itself one) are reaped."""
    procs: dict[int, psutil.Process] = {}
    for _ in range(2):
        try:
            root = psutil.Process(pid)
            found = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:  # the root is gone: what it had left, and their children
            found = [c for p in list(procs.values()) for c in _children(p)]
        for p in found:
            if p.pid not in procs:
                procs[p.pid] = p
                with contextlib.suppress(psutil.Error):
                    p.send_signal(signal.SIGSTOP)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
    for p in procs.values():
        with contextlib.suppress(psutil.Error):
            p.kill()
    for p in procs.values():  # reap what became ours; `pid` is its Popen's to wait for
        if p.pid != pid:
            with contextlib.suppress(ChildProcessError, OSError):
                os.waitpid(p.pid, os.WNOHANG)


def _children(p: psutil.Process) -> list:
    try:
        return p.children(recursive=True)
    except psutil.Error:
        return []
