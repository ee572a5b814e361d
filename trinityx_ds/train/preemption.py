"""Preemption: Slurm's --signal, scancel and preemption send SIGUSR1/SIGTERM, a person at the
terminal SIGINT (Ctrl-C; the local launcher forwards it, and SIGHUP, as SIGTERM); the run finishes
its step, saves a checkpoint and exits, and resumes by itself when started again.

A request stops the whole job, not one stage: the handler is installed once per process, as the
first thing a training worker does (`install()`, before the config is read, the process group
joined or the model built: a signal in those seconds used to kill the rank with a traceback on its
peers), and the request it records stays for every later stage and expert of the job. The training
loop and the start of each stage ask `agreed()`, so all ranks stop together; the CLI starts no
further stage or expert after a preempted one.

torch is imported inside `agreed()` only: `install()` must cost nothing, since it runs before the
heavy imports it protects.
"""
from __future__ import annotations

import signal

SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)


class Preemption:
    """SIGUSR1/SIGTERM/SIGINT ask for a checkpoint at the end of the current step; ranks agree
    through an all-reduce so every rank saves together. One per process: `install()`."""

    def __init__(self):
        self.requested = False
        for sig in SIGNALS:
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame):
        self.requested = True

    def agreed(self) -> bool:
        """Whether any rank was asked to stop (a collective: every rank calls it at the same point)."""
        import torch
        import torch.distributed as dist

        from trinityx_ds.parallel.device import rank_device

        flag = torch.tensor([1.0 if self.requested else 0.0], device=rank_device())  # NCCL: no CPU tensors
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


_INSTALLED: Preemption | None = None


def install() -> Preemption:
    """This process's Preemption, its handlers installed on the first call; later calls (every
    stage of the job) return the same one, with whatever it has recorded."""
    global _INSTALLED
    if _INSTALLED is None:
        _INSTALLED = Preemption()
    return _INSTALLED
