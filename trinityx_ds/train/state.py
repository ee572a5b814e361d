"""A stage's train state and its checkpoints: where a run resumes from, and how its components
(the engine, the experts held outside it, the data position, the universal copy) are saved and
restored, natively at the layout that wrote a checkpoint and through the universal copy at any
other (train/universal.py)."""
from __future__ import annotations

import json
from dataclasses import dataclass

import torch
import torch.distributed as dist

from trinityx_ds.model.mocae_spec import POST_NORM, ROUTER, ROUTING_EMA, mocae_role
from trinityx_ds.storage.layout import CheckpointDir
from trinityx_ds.storage.universal_copy import open_universal
from trinityx_ds.train import checkpoint, universal
from trinityx_ds.train.outputs import trained_roles


@dataclass
class ResumePoint:
    """The newest complete checkpoint of a stage, read before the model is built: at another
    layout its universal copy is the first weight source (`sources`)."""

    tag: str | None = None
    state: dict | None = None
    copy: object = None  # the universal copy as a tensor source, when resharding
    layout: dict | None = None  # the layout of this run
    notes: tuple[str, ...] = ()  # the damaged or incomplete tags skipped, and why

    @classmethod
    def find(cls, ckpt: CheckpointDir, dims, zero_stage: int) -> "ResumePoint":
        """Rank 0 chooses (CheckpointDir.choose: the newest tag that verifies) and every rank
        takes its choice, so all resume from the same tag even on a file system that lags."""
        here = checkpoint.layout(dims, zero_stage)
        choice = [ckpt.choose() if dims.rank == 0 else None]
        dist.broadcast_object_list(choice, src=0)
        tag, notes = choice[0]
        if tag is None:
            return cls(layout=here, notes=tuple(notes))
        state = json.loads(ckpt.state_file(tag).read_text())
        copy = None if checkpoint.same_layout(state, here) else open_universal(ckpt.tag_dir(tag))
        return cls(tag, state, copy, here, tuple(notes))

    @property
    def sources(self) -> list:
        return [] if self.copy is None else [self.copy]

    @property
    def resharded(self) -> bool:
        return self.copy is not None


def in_universal(name: str, stage: int, train_experts_in_stage2: bool) -> bool:
    """The tensors a stage's universal copy holds: what the stage trains (outputs.trained_roles),
    plus the router, post-mix norm and routing EMA (stage 2's frozen experts live in stage 1's
    files)."""
    return mocae_role(name) in trained_roles(stage, train_experts_in_stage2) | {ROUTER, POST_NORM, ROUTING_EMA}


@dataclass
class TrainState:
    """The live components of a running stage and their checkpoint contract: `save(step)` writes
    them all into one tag; `restore()` puts the resume point back into them and returns its step."""

    ckpt: CheckpointDir
    resume: ResumePoint
    engine: object
    external: object  # ExternalExperts
    batches: object  # data.dataset.Batches
    model: torch.nn.Module
    moe: object
    arch: object
    dims: object
    stage: int
    expert: str | None
    train_experts_in_stage2: bool
    keep_last: int
    write_run_files: object = None  # (tag) -> None, rank 0: run config and tokenizer
    inputs: dict | None = None  # drift.inputs_of: what this stage reads, by content (rank 0's, which writes it)

    def _opts(self) -> dict:
        return {"engine": (self.engine.optimizer, self.engine.lr_scheduler)} | self.external.optimizers()

    def _owner(self, p) -> str:
        return "experts" if self.external.owns(p) else "engine"

    def _include(self, name: str) -> bool:
        return in_universal(name, self.stage, self.train_experts_in_stage2)

    def restore(self) -> int:
        """The step to continue from (0 for a fresh run)."""
        r = self.resume
        if r.tag is None:
            return 0
        if not r.resharded:
            checkpoint.load(self.engine, self.ckpt, r.tag)
            self.external.load(self.ckpt, r.tag)
        else:
            universal.load_copy(r.copy, r.state["universal"], self.engine, self.model, self.moe, self.dims,
                                self._opts(), self._owner, self._include)
        self.batches.load_state_dict(r.state["data"])
        return r.state["step"]

    def save(self, step: int) -> None:
        """Collective: checkpoint `step` (DeepSpeed's files, the experts outside the engine, the
        universal copy, the run config and tokenizer, then the run state and COMPLETE)."""
        opts = self._opts()
        state = {"step": step, "data": self.batches.state_dict(), "stage": self.stage, "expert": self.expert,
                 "layout": self.resume.layout, "universal": universal.meta(opts, self.engine)}
        if self.inputs is not None:
            state["inputs"] = self.inputs

        def write_more(tag: str) -> None:
            self.external.save(self.ckpt, tag)
            universal.write_copy(self.ckpt.tag_dir(tag), self.model, self.moe, self.arch, self.dims, opts,
                                 self._owner, self._include)
            if self.dims.rank == 0 and self.write_run_files is not None:
                self.write_run_files(tag)

        checkpoint.save(self.engine, self.ckpt, step, state, self.keep_last, write_more)
