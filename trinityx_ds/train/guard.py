"""The divergence guard: a run whose loss or gradient norm is no longer a finite number, or whose
optimizer has skipped too many steps in a row (fp16 overflow), or that has collapsed, stops with
one line naming the step, the value and the rule, before that step is checkpointed or any stage
output is written, so the checkpoints from before are what is left (`keep_last` prunes nothing
more).

Collapse (`train.stop_on_collapse`, `train.collapse_steps` [5]): the global gradient norm over
every trainable parameter is exactly 0.0 for that many optimizer steps in a row. Exactly zero
means no trainable parameter can move any more: the model sits where its loss is flat (a softmax
saturated to uniform or one-hot, every unit of a path dead), which a too-large learning rate
causes in a step or two (`lr: 1e4` on the tiny recipe: loss fixed at ln(vocab), norm 0.0 from step
3). A healthy run has no such step: LoRA starts with B = 0 but B's own gradient is not 0, and the
router's never is; one zero step can be an accident (a batch whose every label is masked), five
in a row are not. Why not "loss near ln(vocab)": that is SFT's uniform output only; DPO's loss
starts at ln 2 and a stalled router's at ln(#experts), and a gradient of exactly 0 is the same
signal for every objective. Where the norm is not known (None), the rule does not apply."""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

from trinityx_ds.parallel.device import rank_device


class Diverged(ValueError):
    """Training stopped on a non-finite value, too many skipped steps or a collapse (a one-line error,
    exit code 3)."""

    exit_code = 3


class DivergenceGuard:
    def __init__(self, stop_on_nonfinite: bool, max_skipped_steps: int, where: str, skipped_now: int,
                 collapse_steps: int | None = None):
        self.stop_on_nonfinite, self.max_skipped, self.where = stop_on_nonfinite, max_skipped_steps, where
        self.skipped_before, self.in_a_row = skipped_now, 0
        self.collapse_steps, self.zero_in_a_row = collapse_steps, 0  # None: never stop on a collapse

    def problem(self, step: int, loss: float, grad_norm: float | None, skipped_now: int) -> str | None:
        """Why the run must stop after `step` ("diverged: ..." or "collapsed: ..."), or None."""
        self.in_a_row = self.in_a_row + 1 if skipped_now > self.skipped_before else 0
        self.skipped_before = skipped_now
        if self.stop_on_nonfinite and not math.isfinite(loss):
            return f"diverged: loss {loss} at step {step}"
        if self.stop_on_nonfinite and grad_norm is not None and not math.isfinite(grad_norm):
            return f"diverged: gradient norm {grad_norm} at step {step} (loss {loss:.4g})"
        if self.max_skipped and self.in_a_row >= self.max_skipped:
            return (f"diverged: {self.in_a_row} optimizer steps skipped in a row up to step {step} (overflow; "
                    f"train.max_skipped_steps: {self.max_skipped})")
        self.zero_in_a_row = self.zero_in_a_row + 1 if grad_norm == 0.0 else 0  # None (unknown) breaks a run
        if self.collapse_steps and self.zero_in_a_row >= self.collapse_steps:
            return (f"collapsed: gradient norm exactly 0 for {self.zero_in_a_row} steps in a row up to step {step} "
                    f"(loss {loss:.4g}; train.stop_on_collapse, train.collapse_steps: {self.collapse_steps})")
        return None

    def check(self, step: int, loss: float, grad_norm: float | None, skipped_now: int, kept: str) -> None:
        """Raises Diverged on every rank together (the ranks agree through an all-reduce)."""
        why = self.problem(step, loss, grad_norm, skipped_now)
        flag = torch.tensor([0.0 if why is None else 1.0], device=rank_device())  # NCCL: no CPU tensors
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item():
            raise Diverged(f"{self.where}: {why or 'stopped by another rank'} — stopped before saving it "
                           f"(train.stop_on_nonfinite / train.max_skipped_steps / train.stop_on_collapse); earlier "
                           f"checkpoints kept in {kept}, no stage output written; lower the learning rate or resume "
                           "from one of them")
