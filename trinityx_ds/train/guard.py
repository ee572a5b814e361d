"""The divergence guard: a run whose loss or gradient norm is no longer a finite number, or whose
optimizer has skipped too many steps in a row (fp16 overflow), stops with one line naming the
step and the value, before that step is checkpointed or any stage output is written, so the
checkpoints from before the divergence are what is left (`keep_last` prunes nothing more)."""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

from trinityx_ds.parallel.device import rank_device


class Diverged(ValueError):
    """Training stopped on a non-finite value or too many skipped steps (a one-line error)."""


class DivergenceGuard:
    def __init__(self, stop_on_nonfinite: bool, max_skipped_steps: int, where: str, skipped_now: int):
        self.stop_on_nonfinite, self.max_skipped, self.where = stop_on_nonfinite, max_skipped_steps, where
        self.skipped_before, self.in_a_row = skipped_now, 0

    def problem(self, step: int, loss: float, grad_norm: float | None, skipped_now: int) -> str | None:
        """Why the run must stop after `step`, or None."""
        self.in_a_row = self.in_a_row + 1 if skipped_now > self.skipped_before else 0
        self.skipped_before = skipped_now
        if self.stop_on_nonfinite and not math.isfinite(loss):
            return f"loss {loss} at step {step}"
        if self.stop_on_nonfinite and grad_norm is not None and not math.isfinite(grad_norm):
            return f"gradient norm {grad_norm} at step {step} (loss {loss:.4g})"
        if self.max_skipped and self.in_a_row >= self.max_skipped:
            return (f"{self.in_a_row} optimizer steps skipped in a row up to step {step} (overflow; "
                    f"train.max_skipped_steps: {self.max_skipped})")
        return None

    def check(self, step: int, loss: float, grad_norm: float | None, skipped_now: int, kept: str) -> None:
        """Raises Diverged on every rank together (the ranks agree through an all-reduce)."""
        why = self.problem(step, loss, grad_norm, skipped_now)
        flag = torch.tensor([0.0 if why is None else 1.0], device=rank_device())  # NCCL: no CPU tensors
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item():
            raise Diverged(f"{self.where}: diverged: {why or 'on another rank'} — stopped before saving it "
                           f"(train.stop_on_nonfinite / train.max_skipped_steps); earlier checkpoints kept in {kept}, "
                           "no stage output written; lower the learning rate or resume from one of them")
