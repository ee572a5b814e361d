"""The universal copy inside every training checkpoint (TAG/universal/): the stage's MoCaE tensors
and their optimizer moments, full fp32 and HF-named, as safetensors shards with an index. Any
layout can read it: `trinityx export-hf` exports from it, and a run resumed at another TP / EP /
DP / ZeRO layout loads from it (DeepSpeed's own files load only into the layout that wrote them).
Why this and not DeepSpeed's zero_to_fp32 or ds_to_universal: docs/DESIGN.md, Checkpoints.

Values come from DeepSpeed's tensor-fragment API (safe_get_full_fp32_param /
safe_get_full_optimizer_state: ZeRO 1/2/3 partitions made whole over data parallelism) or, for
tensors a plain torch optimizer holds (stage 2's EP-placed experts), from the tensors themselves;
MoCaEAdapter undoes TP sharding and EP placement (train/gather.py).
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from trinityx_ds.storage.shards import ShardWriter
from trinityx_ds.storage.sources import CheckpointError, SafetensorsSource

FOLDER = "universal"


def _zero_managed(p: torch.Tensor) -> bool:
    """DeepSpeed holds p's fp32 master and moments in its partitions (ZeRO-3: ds_id; ZeRO-1/2
    and the bf16 optimizer: _hp_mapping, None on ranks that hold no fragment of p)."""
    return hasattr(p, "ds_id") or hasattr(p, "_hp_mapping")


def _torch_optimizer(opt):
    """The torch optimizer itself: ZeRO's and the bf16 wrappers hold it as `.optimizer`."""
    return getattr(opt, "optimizer", opt)


def optimizer_summary(opt) -> dict:
    """The moment names (tensors shaped like the parameters) and the per-tensor counters (AdamW's
    `step`, equal for every tensor an optimizer steps together) of a stepped optimizer."""
    state = list(_torch_optimizer(opt).state.values())
    moments = sorted({k for st in state for k, v in st.items() if torch.is_tensor(v) and v.dim() > 0})
    scalars = {k: float(v) for k, v in (state[0].items() if state else ())
               if not torch.is_tensor(v) or v.dim() == 0}
    return {"moments": moments, "scalars": scalars}


def full(p: torch.Tensor, opt, key: str = "") -> torch.Tensor:
    """This rank's TP shard of parameter `p` (key "") or of its optimizer moment `key`, whole over
    the data-parallel ranks, fp32. Collective over the data-parallel group for ZeRO's parameters."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    if _zero_managed(p):
        value = safe_get_full_optimizer_state(p, key) if key else safe_get_full_fp32_param(p)
    else:
        value = _torch_optimizer(opt).state[p][key] if key else p.detach()
    return value.float().clone()


def set_full(p: torch.Tensor, opt, value: torch.Tensor, key: str = "") -> None:
    """The inverse of `full`, after `materialise`: each rank keeps its own partition of `value`."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    if _zero_managed(p):
        value = value.float()
        safe_set_full_optimizer_state(p, value, key) if key else safe_set_full_fp32_param(p, value)
    elif key:
        _torch_optimizer(opt).state[p][key] = value.to(p.dtype).clone()
    else:
        with torch.no_grad():
            p.copy_(value)


def materialise(opt, summary: dict) -> None:
    """Creates the optimizer state a resumed run loads moments into. Torch optimizers create it at
    their first step, and ZeRO links each parameter's fragment into it only then; DeepSpeed's own
    universal-checkpoint loader writes it the same way (base_optimizer.
    load_hp_checkpoint_state_from_checkpoint_dir)."""
    inner = _torch_optimizer(opt)
    for group in inner.param_groups:
        for flat in group["params"]:
            state = inner.state[flat]
            for key in summary["moments"]:
                state.setdefault(key, torch.zeros_like(flat))
            state.update({k: torch.tensor(v, dtype=torch.float32) for k, v in summary["scalars"].items()})
    link = getattr(opt, "_lazy_init_hp_params_optimizer_state", None)  # ZeRO-1/2: fragments -> state, once
    if link is not None and summary["moments"]:
        link()


def write(tag_dir: Path, tensors, rank: int, max_shard_bytes: int) -> None:
    """Writes `tensors` ((HF name, tensor) pairs, yielded on rank 0 only; every rank iterates them,
    as they are gathered collectively) to TAG/universal, renamed into place when whole."""
    tmp, final = tag_dir / f"{FOLDER}.tmp", tag_dir / FOLDER
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


def open_copy(tag_dir: Path) -> SafetensorsSource:
    """The universal copy of checkpoint `tag_dir` as an HF-named tensor source."""
    folder = Path(tag_dir) / FOLDER
    if not (folder / "model.safetensors.index.json").is_file():
        raise CheckpointError(f"{folder}: no universal copy (model.safetensors.index.json) in this checkpoint")
    return SafetensorsSource(folder)
