"""Checks a plan against the real model: builds what each rank of a layout builds (megatron
GPTModel + MoCaE blocks, through `build_model`) on the meta device and counts its parameters.

No GPU and no second process: each rank is built in this process on torch's fake process
group (`init_process_group("fake", rank=r, world_size=w)`), so megatron's parallel state and
DeepSpeed's expert-parallel groups are the real ones a rank of that layout gets, and the layers
shard themselves exactly as in training. Nothing is allocated (70B at TP=8 takes well under a
second per rank). Data-parallel replicas build the same model, so each stage's fake world is
tp x pp x ep ranks: every (TP, PP, EP) position once.
"""
from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass
from typing import Iterable

import deepspeed
import torch.distributed as dist
from deepspeed import comm
from megatron.core import parallel_state

from trinityx_ds.model.arch import ModelArch
from trinityx_ds.model.build import build_model
from trinityx_ds.model.mocae_spec import EXPERTS, POST_NORM, ROUTER, MoCaEConfig, mocae_role
from trinityx_ds.parallel.groups import expert_parallel_group, init_parallel
from trinityx_ds.plan.params import MoCaEPlan, per_rank_params, stage_moe

GROUPS = ("embedding", "layers", "final_norm", "output", "router", "experts")


@dataclass(frozen=True)
class RankCount:
    """Planned and built parameter counts of one rank of one stage, by `per_rank_params` group."""

    stage: int
    rank: int
    tp_rank: int
    pp_rank: int
    ep_rank: int
    planned: dict[str, int]
    built: dict[str, int]

    @property
    def ok(self) -> bool:
        return self.planned == self.built

    def describe(self) -> str:
        groups = ", ".join(f"{g} {self.planned[g]:,}" if self.planned[g] == self.built[g]
                           else f"{g} planned {self.planned[g]:,} BUILT {self.built[g]:,}" for g in GROUPS)
        return (f"stage {self.stage} rank {self.rank} (tp {self.tp_rank}, pp {self.pp_rank}, ep {self.ep_rank}): "
                f"{'OK' if self.ok else 'MISMATCH'}: {groups}")


def param_group(name: str) -> str:
    """The `per_rank_params` group a megatron / MoCaE parameter name belongs to."""
    role = mocae_role(name)
    if role == EXPERTS:
        return "experts"
    if role in (ROUTER, POST_NORM):
        return "router"
    for prefix, group in (("embedding.", "embedding"), ("decoder.final_layernorm.", "final_norm"),
                          ("output_layer.", "output"), ("decoder.layers.", "layers")):
        if name.startswith(prefix):
            return group
    raise ValueError(f"{name}: a parameter the planner does not know (add it to plan/params.py)")


def count_params(model) -> dict[str, int]:
    """Parameters of a built rank, by group (shared tensors once, as named_parameters gives them)."""
    out = dict.fromkeys(GROUPS, 0)
    for name, p in model.named_parameters():
        out[param_group(name)] += p.numel()
    return out


def mocae_config(moe: MoCaEPlan, stage: int):
    """The MoCaEConfig a stage's run builds from a plan's MoCaE numbers (stage 1: one expert, as
    `StageRun` does; the expert names do not change any shape)."""
    cfg = MoCaEConfig(expert_names=[f"expert{i}" for i in range(moe.num_experts)], kind=moe.kind,
                      layers="all" if moe.layers is None else list(moe.layers), lora_rank=moe.lora_rank,
                      lora_targets=tuple(moe.lora_targets), top_k=moe.top_k,
                      temperature_mode="learnable" if moe.learnable_temperature else "fixed",
                      normalize_output=moe.normalize_output)
    return cfg.one_expert(cfg.expert_names[0]) if stage == 1 else cfg


@contextlib.contextmanager
def fake_rank(rank: int, tp: int, pp: int, ep: int):
    """This process as global rank `rank` of a tp x pp x ep world on torch's fake process group;
    yields its ParallelDims and tears every group down afterwards."""
    if dist.is_initialized():
        raise RuntimeError("plan verification builds ranks on a fake process group: run it in a process "
                           "without torch.distributed set up")
    hook = sys.excepthook  # init_process_group prefixes it with "[rank N]" each time
    dist.init_process_group("fake", rank=rank, world_size=tp * pp * ep)
    try:
        if ep > 1:  # DeepSpeed's expert groups are made through deepspeed.comm
            deepspeed.init_distributed(dist_backend="fake")
        # megatron's gloo side groups need a real store; the fake one has none
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                                 create_gloo_process_groups=False)
        yield init_parallel(tp=tp, pp=pp, ep=ep)
    finally:
        parallel_state.destroy_model_parallel()
        if ep > 1:
            comm.destroy_process_group()  # also forgets DeepSpeed's expert groups
        else:
            dist.destroy_process_group()
        sys.excepthook = hook


def verify_layout(arch: ModelArch, moe: MoCaEPlan, tp: int, pp: int = 1, ep: int = 1, stages: Iterable[int] = (1, 2),
                  ranks: Iterable[int] | None = None) -> list[RankCount]:
    """Builds each rank of each stage on the meta device and pairs its counts with the plan's.

    `ranks`: global ranks of each stage's fake world to build (default: all tp x pp x ep_stage).
    """
    if arch.tie_word_embeddings and pp > 1:
        raise ValueError("tied embeddings with pp > 1: megatron moves the last stage's output weight to the GPU "
                         "while building it, so it cannot be built on the meta device")
    out = []
    for stage in stages:
        moe_s, ep_s = stage_moe(moe, stage, ep)
        world = tp * pp * ep_s
        for rank in range(world) if ranks is None else [r for r in ranks if r < world]:
            with fake_rank(rank, tp, pp, ep_s) as dims:
                model, _ = build_model(arch, dims, mocae_config(moe, stage), dtype="bf16", meta=True)
                real = [n for n, p in model.named_parameters() if not p.is_meta]
                if real:
                    raise RuntimeError(f"{real[0]}: allocated off the meta device (its builder ignores the "
                                       "default device)")
                pp_rank = parallel_state.get_pipeline_model_parallel_rank()
                group = expert_parallel_group(dims)
                ep_rank = 0 if group is None else dist.get_rank(group)
                out.append(RankCount(stage, rank, dims.tp_rank, pp_rank, ep_rank,
                                     per_rank_params(arch, tp, pp, pp_rank, moe_s, ep_s), count_params(model)))
    return out
