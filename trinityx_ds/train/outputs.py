"""What a finished stage leaves for the next one, for export and for evaluation: HF-named,
layout-free safetensors (storage/layout.py says where). Stage 1: its expert. Stage 2: the
router (and post-mix norm), the experts when it trained them, the held-out routing report; the
router file is written last, as the mark that stage 2 is complete.

Every file says what it is in its safetensors metadata (`file_metadata`): the backbone it was
trained on (storage/fingerprint.model_fingerprint, and its model_type), the expert's kind, LoRA
rank, alpha and targets, its layers and objective, the run config's hash and the steps trained.
Stage 2, export-hf and import-hf check a file against the run before they use it
(model/assemble.open_expert)."""
from __future__ import annotations

import hashlib
import json

import torch.distributed as dist

from trinityx_ds.config import config_to_dict

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


def file_metadata(cfg, moe, arch, step: int, backbone: str, expert: str | None = None) -> dict[str, str]:
    """What a stage output file records about itself (strings: safetensors metadata). `expert`:
    stage 1's expert (its objective too); None: a stage-2 file (the experts' names, in order)."""
    run = json.dumps(config_to_dict(cfg), sort_keys=True, default=str)
    meta = {"trinityx": "expert" if expert else "stage2", "backbone": backbone, "model_type": arch.model_type,
            "kind": moe.kind, "layers": json.dumps(moe.layer_ids(arch.num_layers)), "steps": str(step),
            "run_config_sha256": hashlib.sha256(run.encode()).hexdigest()}
    if moe.kind == "lora":
        meta |= {"lora_rank": str(moe.lora_rank), "lora_alpha": str(moe.lora_alpha),
                 "lora_targets": json.dumps(list(moe.lora_targets))}
    if expert:
        meta |= {"expert": expert, "objective": cfg.experts.objective_of(expert)}
    else:
        meta["experts"] = json.dumps(list(cfg.experts.names))
    return meta


def write_stage1(run_layout: RunLayout, expert: str, model, moe, arch, dims, metadata: dict | None = None) -> dict:
    """Collective: stage 1's expert file (with `metadata`: file_metadata's)."""
    tensors = gather_mocae_tensors(model, moe, arch, dims, lambda n: mocae_role(n) == EXPERTS)
    path = run_layout.expert_file(expert)
    if dims.rank == 0:
        atomic.save_safetensors(tensors, path, metadata)
    dist.barrier()
    return {"expert_file": str(path), "tensors": len(tensors)}


def write_stage2(run_layout: RunLayout, model, moe, arch, dims, trains_experts: bool,
                 metadata: dict | None = None) -> dict:
    """Collective: stage 2's expert files (when it trains them), then its router file (with
    `metadata`: file_metadata's)."""
    roles = trained_roles(2, trains_experts)
    tensors = gather_mocae_tensors(model, moe, arch, dims, lambda n: mocae_role(n) in roles)
    out = {"router_file": str(run_layout.router_file)}
    if trains_experts:
        out["expert_files"] = [str(run_layout.stage2_expert_file(n)) for n in moe.expert_names]
    if dims.rank == 0:
        for name in moe.expert_names if trains_experts else ():
            atomic.save_safetensors({k: tensors[k] for k in expert_tensors(tensors, name)},
                                    run_layout.stage2_expert_file(name), metadata)
        # last: its presence says stage 2 is complete (RunLayout.final_expert_file relies on it)
        atomic.save_safetensors({k: v for k, v in tensors.items() if mocae_role(k) != EXPERTS},
                                run_layout.router_file, metadata)
    dist.barrier()
    return out
