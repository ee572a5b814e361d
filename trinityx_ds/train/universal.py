"""The universal copy inside every training checkpoint (TAG/universal/): the stage's MoCaE tensors
and their optimizer moments, full fp32 and HF-named, as safetensors shards with an index. Any
layout can read it: `trinityx export-hf` exports from it, and a run resumed at another TP / EP /
DP / ZeRO layout loads from it (DeepSpeed's own files load only into the layout that wrote them).
Why this and not DeepSpeed's zero_to_fp32 or ds_to_universal: docs/DESIGN.md, Checkpoints. Its
format (folder, moment prefix, reader) is storage/universal_copy.py's.

Values come from DeepSpeed's tensor-fragment API (safe_get_full_fp32_param /
safe_get_full_optimizer_state: ZeRO 1/2/3 partitions made whole over data parallelism) or, for
tensors a plain torch optimizer holds (stage 2's EP-placed experts), from the tensors themselves;
MoCaEAdapter undoes TP sharding and EP placement (train/gather.py).
"""
from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import deepspeed
import torch
from deepspeed.utils import (safe_get_full_fp32_param, safe_get_full_optimizer_state, safe_set_full_fp32_param,
                             safe_set_full_optimizer_state)

from trinityx_ds.model.mocae_adapter import MoCaEAdapter
from trinityx_ds.model.mocae_spec import ROUTING_EMA, mocae_role
from trinityx_ds.parallel import deepspeed_compat as dsc
from trinityx_ds.storage.layout import CheckpointDir
from trinityx_ds.storage.shards import DEFAULT_SHARD_BYTES, ShardWriter
from trinityx_ds.storage.sources import PrefixedSource
from trinityx_ds.storage.universal_copy import OPTIMIZER_PREFIX
from trinityx_ds.train.gather import gather_layers, mocae_named_tensors

# name -> optimizer key ("engine" / "experts") of a trainable parameter
OwnerOf = Callable[[torch.Tensor], str]


def optimizer_summary(opt) -> dict:
    """The moment names (tensors shaped like the parameters) and the per-tensor counters (AdamW's
    `step`, equal for every tensor an optimizer steps together) of a stepped optimizer."""
    state = list(dsc.inner_optimizer(opt).state.values())
    moments = sorted({k for st in state for k, v in st.items() if torch.is_tensor(v) and v.dim() > 0})
    scalars = {k: float(v) for k, v in (state[0].items() if state else ())
               if not torch.is_tensor(v) or v.dim() == 0}
    return {"moments": moments, "scalars": scalars}


def full(p: torch.Tensor, opt, key: str = "") -> torch.Tensor:
    """This rank's TP shard of parameter `p` (key "") or of its optimizer moment `key`, whole over
    the data-parallel ranks, fp32. Collective over the data-parallel group for ZeRO's parameters."""
    if dsc.zero_managed(p):
        value = safe_get_full_optimizer_state(p, key) if key else safe_get_full_fp32_param(p)
    else:
        held = stepped(p, opt)
        value = dsc.inner_optimizer(opt).state[held][key] if key else held.detach()
    return value.float().clone()


def stepped(p: torch.Tensor, opt) -> torch.Tensor:
    """The tensor `opt` steps for parameter `p`: its fp32 master where the owner keeps one
    (train/external.py under bf16/fp16), else `p` itself."""
    return getattr(opt, "fp32_masters", {}).get(id(p), p)


def set_full(p: torch.Tensor, opt, value: torch.Tensor, key: str = "") -> None:
    """The inverse of `full`, after `materialise`: each rank keeps its own partition of `value`."""
    if dsc.zero_managed(p):
        value = value.float()
        safe_set_full_optimizer_state(p, value, key) if key else safe_set_full_fp32_param(p, value)
    elif key:
        held = stepped(p, opt)  # on its own device: the moments meet it in the optimizer's step
        dsc.inner_optimizer(opt).state[held][key] = value.to(held.device, held.dtype).clone()
    else:
        with torch.no_grad():
            p.copy_(value)
            stepped(p, opt).copy_(value)


def materialise(opt, summary: dict) -> None:
    """Creates the optimizer state a resumed run loads moments into. Torch optimizers create it at
    their first step, and ZeRO links each parameter's fragment into it only then; DeepSpeed's own
    universal-checkpoint loader writes it the same way (base_optimizer.
    load_hp_checkpoint_state_from_checkpoint_dir)."""
    inner = dsc.inner_optimizer(opt)
    for flat in dsc.optimizer_state_params(opt):
        state = inner.state[flat]
        for key in summary["moments"]:
            state.setdefault(key, torch.zeros_like(flat))
        state.update({k: torch.tensor(v, dtype=torch.float32) for k, v in summary["scalars"].items()})
    if summary["moments"]:
        dsc.link_optimizer_fragments(opt)


def write(tag_dir: Path, tensors, rank: int, max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> None:
    """Writes `tensors` ((HF name, tensor) pairs, yielded on rank 0 only; every rank iterates them,
    as they are gathered collectively) to TAG/universal, renamed into place when whole."""
    final = Path(tag_dir) / CheckpointDir.UNIVERSAL
    tmp = final.with_name(final.name + ".tmp")
    writer = None
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        writer = ShardWriter(tmp, max_shard_bytes)
    for name, tensor in tensors:
        writer.add(name, tensor)
    if writer is not None:
        writer.close()
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)


def meta(opts: dict, engine) -> dict:
    """What the copy's tensors do not hold (JSON, kept in the run state): optimizer counters and
    moment names, schedules, DeepSpeed's step counters. `opts`: {key: (optimizer, scheduler)}."""
    return {"optimizers": {k: optimizer_summary(o) for k, (o, _) in opts.items()},
            "schedulers": {k: s.state_dict() for k, (_, s) in opts.items()},
            "counters": dsc.engine_counters(engine)}


def write_copy(tag_dir: Path, model, moe, arch, dims, opts: dict, owner_of: OwnerOf, include) -> None:
    """Collective: the MoCaE tensors passing `include` (trainable ones as DeepSpeed's fp32 masters)
    and their optimizer moments, gathered layer by layer to rank 0 and written as TAG/universal."""
    moments = {k: (o, optimizer_summary(o)["moments"]) for k, (o, _) in opts.items()}

    def values(name, t):
        if isinstance(t, torch.nn.Parameter) and t.requires_grad:
            opt, keys = moments[owner_of(t)]
            return {"": full(t, opt), **{k: full(t, opt, k) for k in keys}}
        with deepspeed.zero.GatheredParameters([t], modifier_rank=None):  # a no-op unless ZeRO-3's
            return {"": t.detach().clone()}

    write(tag_dir, gather_layers(model, moe, arch, dims, include, values), dims.rank)


def load_copy(src, saved: dict, engine, model, moe, dims, opts: dict, owner_of: OwnerOf, include) -> None:
    """Resume at another layout. The copy's tensors were loaded with the weights (the assembly put
    `src` first), re-sliced for this TP/EP by the adapter; here DeepSpeed's fp32 masters, the
    optimizer moments and counters, the schedules and the engine's step counters follow."""
    adapter, rank = MoCaEAdapter(moe, dims.tp), dims.tp_rank
    for key, (opt, sched) in opts.items():
        materialise(opt, saved["optimizers"][key])
        sched.load_state_dict(saved["schedulers"][key])
        for group, lr in zip(opt.param_groups, sched.get_last_lr()):
            group["lr"] = lr
    for name, t in mocae_named_tensors(model):
        if mocae_role(name) == ROUTING_EMA:  # a buffer the weights loader leaves alone
            with torch.no_grad():
                t.copy_(adapter.shard(name, src, rank))
        elif include(name) and isinstance(t, torch.nn.Parameter) and t.requires_grad:
            key = owner_of(t)
            opt = opts[key][0]
            set_full(t, opt, adapter.shard(name, src, rank))
            for m in saved["optimizers"][key]["moments"]:
                set_full(t, opt, adapter.shard(name, PrefixedSource(src, f"{OPTIMIZER_PREFIX}{m}."), rank), m)
    dsc.set_engine_counters(engine, saved["counters"])
