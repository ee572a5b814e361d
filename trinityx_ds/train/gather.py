"""Gathering sharded tensors (ZeRO partitions, TP shards, EP-placed experts) into HF-named full
tensors on rank 0, one MoCaE layer at a time: what stage outputs and the universal copy of a
checkpoint are written from."""
from __future__ import annotations

from collections.abc import Callable, Iterator
from functools import partial

import deepspeed
import torch
import torch.distributed as dist

from trinityx_ds.model.mocae import MoCaEBlock
from trinityx_ds.model.mocae_adapter import MoCaEAdapter
from trinityx_ds.storage.universal_copy import OPTIMIZER_PREFIX


def mocae_named_tensors(model) -> list[tuple[str, torch.Tensor]]:
    """Every parameter and buffer of `model` by megatron name, plus the experts a module holds
    outside its module tree (stage 2's EP-placed `full` experts, MoCaEBlock.place_experts_outside)
    under the names they would have inside it, so the adapter maps them like any other expert."""
    out = [(n, t) for n, t in model.state_dict(keep_vars=True).items() if not n.endswith("_extra_state")]
    for name, module in model.named_modules():
        held = module.outside_experts() if isinstance(module, MoCaEBlock) else None
        if held is not None:
            out += [(f"{name}.experts.{n}", t) for n, t in held.state_dict(keep_vars=True).items()
                    if not n.endswith("_extra_state")]
    return out


def gather_layers(model, moe_cfg, arch, dims, include: Callable[[str], bool],
                  values: Callable[[str, torch.Tensor], dict[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, full tensor) on global rank 0, one MoCaE layer in memory at a time; nothing on the
    other ranks. Collective over the whole job: every rank must exhaust it.

    `values(name, tensor)` gives, for each megatron tensor of this rank that passes `include`, its
    TP shard whole over the data-parallel ranks by kind: "" is the value, any other kind (an
    optimizer moment) comes out as OPTIMIZER_PREFIX + kind + "." + HF name. Ranks call it in the same
    order, so it may run collectives over the data-parallel group."""
    adapter = MoCaEAdapter(moe_cfg, dims.tp)
    named = [(n, t) for n, t in mocae_named_tensors(model) if include(n)]
    for layer in moe_cfg.layer_ids(arch.num_layers):
        pre, mine = f"decoder.layers.{layer}.", {}
        for n, t in named:
            if n.startswith(pre):
                for kind, value in values(n, t).items():
                    # on the CPU before pickling: a CUDA tensor would unpickle on rank 0 onto the
                    # sender's GPU, and the TP shards of one tensor onto different GPUs
                    mine.setdefault(kind, {})[n] = value.detach().cpu()
        every = [None] * dims.world_size if dims.rank == 0 else None
        dist.gather_object((dims.tp_rank, mine), every, dst=0)
        if dims.rank != 0:
            continue
        for kind in sorted({k for _, m in every for k in m}):
            parts = [(tp_rank, m.get(kind, {})) for tp_rank, m in every]
            names = sorted({n for tp_rank, m in parts if tp_rank == 0 for n in m})
            prefix = f"{OPTIMIZER_PREFIX}{kind}." if kind else ""
            for hf_name, tensor in adapter.unshard(layer, partial(_shard, parts), names):
                yield prefix + hf_name, tensor


def _shard(parts: list[tuple[int, dict]], tp_rank: int, name: str) -> torch.Tensor:
    """TP rank `tp_rank`'s shard of `name` among the ranks' (tp rank, tensors) (with EP, the one EP
    rank that holds the expert)."""
    return next(m[name] for r, m in parts if r == tp_rank and name in m)


def gather_mocae_tensors(model, moe_cfg, arch, dims, include) -> dict[str, torch.Tensor]:
    """HF-named full tensors (on global rank 0; {} elsewhere) of the MoCaE tensors whose megatron
    name passes `include(name)`, as the model holds them (ZeRO-3 partitions gathered). Collective."""
    def value(name, tensor):
        with deepspeed.zero.GatheredParameters([tensor], modifier_rank=None):  # a no-op unless ZeRO-3's
            return {"": tensor.detach().clone()}

    return dict(gather_layers(model, moe_cfg, arch, dims, include, value))
