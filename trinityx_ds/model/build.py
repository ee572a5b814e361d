"""One call that builds this rank's model: the megatron backbone plus MoCaE blocks."""
from __future__ import annotations

import contextlib

import torch

from trinityx_ds.model.arch import ModelArch
from trinityx_ds.model.backbone import Backbone, build_backbone
from trinityx_ds.model.mocae import MoCaEBlock, attach_mocae
from trinityx_ds.model.mocae_spec import MoCaEConfig
from trinityx_ds.parallel.groups import ParallelDims, expert_parallel_group


def build_model(arch: ModelArch, dims: ParallelDims, moe_cfg: MoCaEConfig | None = None, *, dtype: str = "fp32",
                activation_checkpointing: bool | str = "none", meta: bool = False,
                attention: str = "sdpa", sequence_parallel: bool = False) -> tuple[Backbone, list[MoCaEBlock]]:
    """Backbone (weights uninitialised: load them) with the MoCaE blocks `moe_cfg` asks for.

    sequence_parallel: megatron's SP at TP > 1 (ignored at TP 1); the MoCaE blocks follow it.

    meta: on the meta device, nothing allocated (what `trinityx plan --verify` counts).
    """
    model = build_backbone(arch, tp=dims.tp, pp=dims.pp, dtype=dtype, init_weights=False,
                           activation_checkpointing=activation_checkpointing, meta=meta, attention=attention,
                           sequence_parallel=sequence_parallel)
    with torch.device("meta") if meta else contextlib.nullcontext():
        blocks = attach_mocae(model, moe_cfg, ep_group=expert_parallel_group(dims)) if moe_cfg else []
    return model, blocks
