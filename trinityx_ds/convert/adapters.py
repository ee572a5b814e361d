"""`export-hf --format peft`: the LoRA experts as PEFT adapters on the plain backbone, the router beside them.

    OUT/                                the backbone, a plain Llama-family folder (formats.py's stream)
    OUT/adapters/<expert>/              adapter_config.json + adapter_model.safetensors, PEFT's names
    OUT/adapters/router.safetensors     the router's tensors, HF-named as in a TrinityX folder
    OUT/adapters/router.json            per MoCaE layer T and gamma; top_k; the expert names in order

Why: vLLM (and PEFT) serve LoRA adapters per request (`vllm serve OUT --enable-lora
--lora-modules help=OUT/adapters/help ...`) but have no per-token mixture. An adapter alone is
exact: PEFT's LoRA computes W x + (alpha / r) B A x on the targeted projections, which is the
MoCaE model with that expert forced. What is given up is the per-token choice: `trinityx route`
(convert/route.py) picks one adapter per request from the router, and tools/route_agreement.py
measures what that costs. The router files sit under adapters/, not beside the backbone's shards,
so nothing that loads `OUT/*.safetensors` mistakes them for model weights.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from trinityx_ds.model.mocae_spec import EXPERTS, ROUTER, mocae_role

if TYPE_CHECKING:
    from trinityx_ds.convert.source import ExportSource

ADAPTERS = "adapters"
ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
ROUTER_WEIGHTS, ROUTER_JSON = "router.safetensors", "router.json"
# PEFT's key of a LoRA tensor of a causal LM (peft/utils/save_and_load.py drops the adapter name)
PEFT_KEY = "base_model.model.model.layers.{layer}.mlp.{proj}.{ab}.weight"


def adapter_dir(out: str | Path, expert: str) -> Path:
    return Path(out) / ADAPTERS / expert


def router_files(out: str | Path) -> tuple[Path, Path]:
    """(router.safetensors, router.json) of a peft export folder."""
    return Path(out) / ADAPTERS / ROUTER_WEIGHTS, Path(out) / ADAPTERS / ROUTER_JSON


def adapter_config(s: ExportSource, base: str) -> dict:
    """PEFT's LoraConfig fields for one expert (peft/tuners/lora/config.py; what vLLM reads: r,
    lora_alpha, target_modules, no modules_to_save). Every expert shares the run's LoRA shape.
    `layers_to_transform` only where the experts skip layers (PEFT then builds exactly those):
    with every layer it is null, the plain constant-rank adapter that every serving engine takes
    (some refuse any layer selection)."""
    moe = s.moe
    layers = moe.layer_ids(s.arch.num_layers)
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base,
            "r": moe.lora_rank, "lora_alpha": moe.lora_alpha, "lora_dropout": 0.0, "bias": "none",
            "target_modules": list(moe.lora_targets),
            "layers_to_transform": None if layers == list(range(s.arch.num_layers)) else layers,
            "modules_to_save": None, "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
            "inference_mode": True}


def adapter_tensors(s: ExportSource, expert: str) -> dict:
    """One expert's LoRA tensors under PEFT's names (A: [r, in], B: [out, r], as PEFT holds them)."""
    out = {}
    for layer in s.moe.layer_ids(s.arch.num_layers):
        for proj in s.moe.lora_targets:
            for ab in ("lora_A", "lora_B"):
                t = s.read(f"model.layers.{layer}.mlp.{EXPERTS}.{expert}.{proj}.{ab}.weight")
                out[PEFT_KEY.format(layer=layer, proj=proj, ab=ab)] = t.contiguous()
    return out


def router_meta(s: ExportSource) -> dict:
    """router.json: what `trinityx route` needs beside the tensors, T and gamma as trained."""
    moe, layers = s.moe, []
    for layer in moe.layer_ids(s.arch.num_layers):
        pre = f"model.layers.{layer}.mlp.{ROUTER}."
        layers.append({"layer": layer, "temperature": s.read(pre + "log_temperature").exp().item(),
                       "importance": s.read(pre + "log_importance").exp().tolist()})
    return {"expert_names": list(moe.expert_names), "adapters": {n: f"{ADAPTERS}/{n}" for n in moe.expert_names},
            "top_k": moe.hf_dict()["top_k"], "renormalize": moe.renormalize, "hidden_size": s.arch.hidden_size,
            "router_input": "the layer's MLP input (after post_attention_layernorm)",
            "probs": "softmax(x W^T / T + log gamma), fp32", "layers": layers}


def write_adapters(tmp: Path, s: ExportSource, base: str) -> None:
    """Every expert's adapter folder and the router files under `tmp` (the staged export folder);
    `base`: the folder the export lands in, PEFT's base_model_name_or_path."""
    from safetensors.torch import save_file

    for expert in s.moe.expert_names:
        folder = adapter_dir(tmp, expert)
        folder.mkdir(parents=True)
        save_file(adapter_tensors(s, expert), str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        (folder / ADAPTER_CONFIG).write_text(json.dumps(adapter_config(s, base), indent=2))
    weights, meta = router_files(tmp)
    router = {k: s.read(k).contiguous() for k in sorted(s.mocae_files) if mocae_role(k) == ROUTER}
    save_file(router, str(weights), metadata={"format": "pt"})
    meta.write_text(json.dumps(router_meta(s), indent=2))
