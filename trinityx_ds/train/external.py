"""Stage 2's `full` experts held outside the ZeRO engine: placed by expert parallelism, stepped
by their own optimizer when the run trains them, saved per (TP, DP) rank next to DeepSpeed's files.

Why outside: a ZeRO-3 engine partitions every parameter it holds over the data-parallel ranks as
if it were replicated, but an EP rank's experts are its own (docs/DESIGN.md). What the engine does
for its parameters is done here by hand, to the same result: the gradient of the mean of the
ranks' losses, clipped by the global norm, on the engine's learning-rate schedule.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from trinityx_ds.parallel import deepspeed_compat
from trinityx_ds.parallel.device import rank_device
from trinityx_ds.storage.layout import CheckpointDir
from trinityx_ds.train.engine import lr_lambda, make_optimizer


class ExternalExperts:
    """The experts of every MoCaE block that holds them outside its module tree."""

    def __init__(self, modules: list[torch.nn.Module], dims):
        self.modules, self.dims = modules, dims
        self.optimizer = self.scheduler = None
        self.grad_clip = 0.0
        self._ids = {id(p) for e in modules for p in e.parameters()}

    @classmethod
    def place(cls, blocks, dims) -> "ExternalExperts":
        """Takes the experts out of each block (MoCaEBlock.place_experts_outside)."""
        return cls([block.place_experts_outside() for block in blocks], dims)

    def owns(self, p: torch.Tensor) -> bool:
        return id(p) in self._ids

    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for e in self.modules for p in e.parameters()]

    def build_optimizer(self, stage_cfg) -> None:
        """Their optimizer (the stage's kind and settings) on the engine's schedule, when any of
        them trains; none otherwise. Under bf16/fp16 it steps fp32 master copies (as DeepSpeed
        does for the engine's parameters) and copies them back into the model's weights: an
        update below bf16's resolution (2^-8 of the weight) would otherwise be lost every step.
        `optimizer.fp32_masters` maps each weight to its master (train/universal.py reads it)."""
        params = [p for p in self.parameters() if p.requires_grad]
        if not params:
            return
        masters = {id(p): torch.nn.Parameter(p.detach().float().clone()) if p.dtype != torch.float32 else p
                   for p in params}
        self.optimizer = make_optimizer([masters[id(p)] for p in params], stage_cfg)
        self.optimizer.fp32_masters = masters
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(stage_cfg))
        self.grad_clip = stage_cfg.grad_clip

    @property
    def trains(self) -> bool:
        return self.optimizer is not None

    def optimizers(self) -> dict:
        """{"experts": (optimizer, scheduler)} when they train, for the universal copy."""
        return {"experts": (self.optimizer, self.scheduler)} if self.trains else {}

    def step(self) -> None:
        """One optimizer step, after the engine's backward passes of the step.

        Each owner's gradient already sums the contributions of every rank of its EP group (the
        all-to-all's backward brings them home); summing over the expert's replicas (the
        expert-data-parallel group, or the DP group without EP) then covers all DP ranks, and
        dividing by the DP size gives the gradient of the mean of the ranks' losses, as DeepSpeed
        does for the router. Clipping uses the global norm: shards are summed over the TP group
        and, with EP, over the distinct experts of the EP group.
        """
        params = [p for p in self.parameters() if p.grad is not None]
        ep = self.dims.ep > 1
        replicas = (deepspeed_compat.expert_data_parallel_group(self.dims.ep_group_name) if ep
                    else ps.get_data_parallel_group())
        for p in params:
            dist.all_reduce(p.grad, group=replicas)
            p.grad /= self.dims.dp
        if self.grad_clip > 0:
            sq = (torch.stack([p.grad.float().pow(2).sum() for p in params]).sum() if params
                  else torch.zeros((), device=rank_device()))  # NCCL: no CPU tensors
            dist.all_reduce(sq, group=ps.get_tensor_model_parallel_group())
            if ep:
                dist.all_reduce(sq, group=deepspeed_compat.expert_parallel_group(self.dims.ep_group_name))
            scale = (self.grad_clip / (sq.sqrt() + 1e-6)).clamp(max=1.0)
            for p in params:
                p.grad.mul_(scale)
        masters = self.optimizer.fp32_masters
        for p in params:
            if masters[id(p)] is not p:
                masters[id(p)].grad = p.grad.float()
        self.optimizer.step()
        self.scheduler.step()
        with torch.no_grad():
            for p in params:
                if masters[id(p)] is not p:
                    p.copy_(masters[id(p)])
                    p.grad = None
        self.optimizer.zero_grad(set_to_none=True)

    def state_dict(self) -> dict:
        masters = self.optimizer.fp32_masters
        return {"experts": [e.state_dict() for e in self.modules], "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "fp32_masters": [masters[id(p)].detach() for p in self.parameters() if id(p) in masters]}

    def load_state_dict(self, state: dict) -> None:
        for experts, sd in zip(self.modules, state["experts"]):
            experts.load_state_dict(sd)
        masters = self.optimizer.fp32_masters
        held = [p for p in self.parameters() if id(p) in masters]
        with torch.no_grad():
            for p, saved in zip(held, state.get("fp32_masters") or [p.float() for p in held]):
                if masters[id(p)] is not p:
                    masters[id(p)].copy_(saved)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])

    def save(self, ckpt: CheckpointDir, tag: str) -> None:
        """This rank's file in checkpoint `tag` (only when they train: frozen experts are rebuilt
        from their stage-1 files)."""
        if self.trains:
            ckpt.tag_dir(tag).mkdir(parents=True, exist_ok=True)
            torch.save(self.state_dict(), ckpt.external_experts_file(tag, self.dims.tp_rank, self.dims.dp_rank))

    def load(self, ckpt: CheckpointDir, tag: str) -> None:
        path = ckpt.external_experts_file(tag, self.dims.tp_rank, self.dims.dp_rank)
        if self.trains and path.is_file():
            # onto this rank's device, not the saver's cuda:N (which may not exist here)
            self.load_state_dict(torch.load(path, weights_only=True, map_location=rank_device()))
