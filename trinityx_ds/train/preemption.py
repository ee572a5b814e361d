"""Preemption: Slurm's --signal, scancel and preemption send SIGUSR1/SIGTERM, a person at the
terminal SIGINT (Ctrl-C; the local launcher forwards it as SIGTERM); the run finishes its step,
saves a checkpoint and exits, and resumes by itself when started again."""
from __future__ import annotations

import signal

import torch
import torch.distributed as dist

from trinityx_ds.parallel.device import rank_device


class Preemption:
    """SIGUSR1/SIGTERM/SIGINT ask for a checkpoint at the end of the current step; ranks agree
    through an all-reduce so every rank saves together."""

    def __init__(self):
        self.requested = False
        for sig in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame):
        self.requested = True

    def agreed(self) -> bool:
        flag = torch.tensor([1.0 if self.requested else 0.0], device=rank_device())  # NCCL: no CPU tensors
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())
