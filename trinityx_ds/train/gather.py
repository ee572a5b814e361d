"""Gathering sharded weights (ZeRO-3 partitions, TP shards, EP-placed experts) into HF-named
full tensors on rank 0: what stage outputs and exports are written from."""
from __future__ import annotations

import torch
import torch.distributed as dist


def gather_mocae_tensors(model, moe_cfg, arch, dims, include) -> dict[str, torch.Tensor]:
    """HF-named full tensors (on global rank 0; {} elsewhere) of the MoCaE tensors whose megatron
    name passes `include(name)`. Collective over the whole job."""
    import deepspeed
    from megatron.core import parallel_state as ps

    from trinityx_ds.convert.mocae_adapter import MoCaEAdapter

    named = [(n, t) for n, t in model.state_dict(keep_vars=True).items()
             if include(n) and not n.endswith("_extra_state")]
    params = [t for _, t in named if isinstance(t, torch.nn.Parameter)]
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        mine = {n: t.detach().clone() for n, t in named}
    every = [None] * dims.world_size
    dist.all_gather_object(every, (ps.get_tensor_model_parallel_rank(), mine))
    if dims.rank != 0:
        return {}

    def shard(r, name):
        return next(m[name] for tr, m in every if tr == r and name in m)

    adapter, out = MoCaEAdapter(moe_cfg, dims.tp), {}
    names = sorted({n for tr, m in every if tr == 0 for n in m})
    for layer in moe_cfg.layer_ids(arch.num_layers):
        out.update(adapter.unshard(layer, shard, [n for n in names if n.startswith(f"decoder.layers.{layer}.")]))
    return out
