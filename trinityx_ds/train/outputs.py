"""What a finished stage leaves for the next one, for export and for evaluation: HF-named,
layout-free safetensors (storage/layout.py says where). Stage 1: its expert. Stage 2: the
router (and post-mix norm), the experts when it trained them, the held-out routing report; the
router file is written last, as the mark that stage 2 is complete."""
from __future__ import annotations

import torch.distributed as dist

from trinityx_ds.model.mocae_spec import EXPERTS, POST_NORM, ROUTER, expert_tensors, mocae_role
from trinityx_ds.storage import atomic
from trinityx_ds.storage.layout import RunLayout
from trinityx_ds.train.gather import gather_mocae_tensors


def trained_roles(stage: int, train_experts_in_stage2: bool) -> frozenset[str]:
    """The MoCaE parts a stage trains: stage 1 its expert; stage 2 the router and post-mix norm,
    plus the experts when the run says so. The one rule: what trains, what the stage writes."""
    if stage == 1:
        return frozenset({EXPERTS})
    return frozenset({ROUTER, POST_NORM} | ({EXPERTS} if train_experts_in_stage2 else set()))


def write_stage1(run_layout: RunLayout, expert: str, model, moe, arch, dims) -> dict:
    """Collective: stage 1's expert file."""
    tensors = gather_mocae_tensors(model, moe, arch, dims, lambda n: mocae_role(n) == EXPERTS)
    path = run_layout.expert_file(expert)
    if dims.rank == 0:
        atomic.save_safetensors(tensors, path)
    dist.barrier()
    return {"expert_file": str(path), "tensors": len(tensors)}


def write_stage2(run_layout: RunLayout, model, moe, arch, dims, trains_experts: bool) -> dict:
    """Collective: stage 2's expert files (when it trains them), then its router file."""
    roles = trained_roles(2, trains_experts)
    tensors = gather_mocae_tensors(model, moe, arch, dims, lambda n: mocae_role(n) in roles)
    out = {"router_file": str(run_layout.router_file)}
    if trains_experts:
        out["expert_files"] = [str(run_layout.stage2_expert_file(n)) for n in moe.expert_names]
    if dims.rank == 0:
        for name in moe.expert_names if trains_experts else ():
            atomic.save_safetensors({k: tensors[k] for k in expert_tensors(tensors, name)},
                                    run_layout.stage2_expert_file(name))
        # last: its presence says stage 2 is complete (RunLayout.final_expert_file relies on it)
        atomic.save_safetensors({k: v for k, v in tensors.items() if mocae_role(k) != EXPERTS},
                                run_layout.router_file)
    dist.barrier()
    return out
