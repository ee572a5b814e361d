"""The model variants an evaluation compares, as MoCaE configs and router tensors over one run.

- backbone: the frozen backbone alone (no MoCaE block); the only variant of a plain HF folder.
- expert:<name>: one stage-1 expert, exactly as stage 1 trained it (a one-expert block, every
  token forced to it): the expert's own effect, no router.
- uniform: every expert, dense (top-k = all) with equal weights: router weights zero, no priors.
- h3fusion: the trained router's gating as H3Fusion-style fusion uses it: top-2, T = 1, no
  priors, uncalibrated.
- trinityx: the trained router as configured, with the T in its file (fitted, once `trinityx eval
  --suite routing --write-temperature` has run).
Overrides are HF-named tensors placed first in the ChainSource, so they win over the router file.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from trinityx_ds.storage.layout import RunLayout

VARIANTS = ("backbone", "expert:<name>", "uniform", "h3fusion", "trinityx")


def checkpoint_problem(checkpoint: str, variant: str | None) -> str | None:
    """Why `variant` of `checkpoint` cannot be evaluated, found from its files before any process
    starts (`trinityx eval`, `trinityx lm-eval`, both at --nproc N), or None. `variant` None: the
    default (trinityx for a run, backbone otherwise). A plain model has only the backbone (it used
    to be scored as the backbone under the label asked for); a run's router or expert must exist."""
    layout = RunLayout(checkpoint)
    if layout.is_run():
        variant = variant or "trinityx"
        if variant in ("trinityx", "h3fusion") and not layout.router_file.is_file():
            return f"{layout.router_file}: no trained router for --variant {variant} (run `trinityx train router` first)"
        name = variant.partition(":")[2]
        if variant.startswith("expert:") and name and not layout.expert_file(name).is_file():
            return f"{layout.expert_file(name)}: expert {name!r} not trained yet (`trinityx train experts --only {name}`)"
        return None
    config = Path(checkpoint) / "config.json"
    if config.is_file() and json.loads(config.read_text()).get("model_type") == "trinityx":
        return None  # an exported TrinityX folder: its own variants, checked when it is opened
    if variant not in (None, "backbone"):
        return f"--variant {variant}: {checkpoint} is a plain model (no run, no experts): use --variant backbone"
    return None


def variant_config(moe, variant: str):
    """The MoCaEConfig that builds `variant` from the run's config `moe` (None: backbone)."""
    kind, _, name = variant.partition(":")
    if variant == "backbone":
        return None
    if moe is None:
        raise ValueError(f"--variant {variant}: a plain model has no experts; use --variant backbone")
    if kind == "expert":
        if name not in moe.expert_names:
            raise ValueError(f"--variant {variant}: no expert {name!r}; the run has {', '.join(moe.expert_names)}")
        return moe.one_expert(name)
    if variant == "uniform":
        return dataclasses.replace(moe, top_k=moe.num_experts, temperature=1.0, temperature_mode="fixed",
                                   importance=None)
    if variant == "h3fusion":
        return dataclasses.replace(moe, top_k=2, temperature=1.0, temperature_mode="fixed", importance=None)
    if variant == "trinityx":
        return moe
    raise ValueError(f"--variant {variant!r}: one of {', '.join(VARIANTS)}")


def router_overrides(moe, variant: str, num_layers: int, hidden: int) -> dict[str, torch.Tensor]:
    """Router tensors that replace the trained ones for `variant` (HF names, see mocae_adapter)."""
    if variant not in ("uniform", "h3fusion"):
        return {}
    out = {}
    for layer in moe.layer_ids(num_layers):
        pre = f"model.layers.{layer}.mlp.router."
        out[pre + "log_temperature"] = torch.zeros(1)
        out[pre + "log_importance"] = torch.zeros(moe.num_experts)
        if variant == "uniform":
            out[pre + "weight"] = torch.zeros(moe.num_experts, hidden)
    return out
