"""The four export formats: the HF config of each, and the stream of (HF name, tensor) that fills it.

    trinityx   the whole MoCaE model (convert/hf_model), its tensors as the source holds them
    dense      one expert merged into a plain Llama/Mistral/Qwen2/Qwen3/Gemma (LoRA: W + s B A)
    mixtral    only where Mixtral computes exactly what TrinityX computes; otherwise
               `ExportRefused` names the setting that prevents it
    peft       the plain backbone; its LoRA experts as PEFT adapters and the router beside it
               (convert/adapters.py writes those: the stream here is the backbone alone)

A stream reads one tensor at a time from an `ExportSource` (convert/source.py), so the writer
holds one shard in memory. `_plan` also names the MoCaE tensors the stream must consume: the
export fails rather than silently leave one out.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from transformers import AutoConfig, AutoModelForCausalLM, MixtralConfig

from trinityx_ds.convert.export_spec import AUTO_MAP, FORMATS, ExportRefused
from trinityx_ds.convert.hf_model import TrinityXConfig, TrinityXForCausalLM
from trinityx_ds.model.mocae_spec import expert_tensors

if TYPE_CHECKING:
    from trinityx_ds.convert.source import ExportSource

# what a TrinityX config.json holds beyond its base model's config
TRINITYX_KEYS = ("mocae", "base_model_type", "force_expert", "auto_map", "architectures")
_PROJ = ("gate_proj", "up_proj", "down_proj")


# ---------------------------------------------------------------------------------------- configs
def _base_config(s: ExportSource, **extra):
    hf = {k: v for k, v in s.arch.hf_config.items() if k not in TRINITYX_KEYS + ("model_type",)}
    return AutoConfig.for_model(s.arch.model_type, **{**hf, **extra})


def _dtype(s: ExportSource) -> torch.dtype:
    return s.src.read("model.embed_tokens.weight", 0, 0, 1).dtype


def _trinityx_config(s: ExportSource):
    base = _base_config(s).to_dict()
    for k in ("model_type", "architectures", "transformers_version", "auto_map"):
        base.pop(k, None)
    return TrinityXConfig(**base, base_model_type=s.arch.model_type, mocae=s.moe.hf_dict(),
                          architectures=["TrinityXForCausalLM"], auto_map=dict(AUTO_MAP))


def _meta_model(config) -> dict[str, torch.Tensor]:
    """The names and shapes (no memory) of the state dict transformers expects for `config`."""
    if config.model_type == "trinityx":
        with torch.device("meta"):
            sd = TrinityXForCausalLM(config).state_dict()
    else:
        with torch.device("meta"):
            sd = AutoModelForCausalLM.from_config(config).state_dict()
    if getattr(config, "tie_word_embeddings", False):
        sd.pop("lm_head.weight", None)
    return sd


def model_layout(s: ExportSource) -> dict[str, tuple]:
    """Name -> shape of every tensor of the model `s` describes (TrinityX, or its plain backbone):
    what each read from `s` is checked against."""
    return {k: tuple(v.shape) for k, v in _meta_model(_trinityx_config(s) if s.moe else _base_config(s)).items()}


def _arch_name(model_type: str) -> str:
    return {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
            "qwen3": "Qwen3ForCausalLM", "gemma": "GemmaForCausalLM"}[model_type]


# ---------------------------------------------------------------------------------------- streams
def _layer_of(name: str) -> int | None:
    parts = name.split(".")
    return int(parts[2]) if name.startswith("model.layers.") else None


def _trinityx_tensors(s: ExportSource):
    for name in s.layout:
        yield name, s.read(name)


def _dense_tensors(s: ExportSource, expert: str, names):
    """The base model's tensors with `expert` merged into each MoCaE layer's FFN."""
    moe = s.moe
    layers = set(moe.layer_ids(s.arch.num_layers))
    for name in names:
        proj = name.split(".")[-2]
        if _layer_of(name) not in layers or not name.endswith(tuple(f"mlp.{p}.weight" for p in _PROJ)):
            yield name, s.read(name)
            continue
        ex = name.replace(f"mlp.{proj}.weight", f"mlp.experts.{expert}.{proj}.")
        if moe.kind == "full":
            yield name, s.read(ex + "weight")
        elif proj in moe.lora_targets:  # W' = W + s B A: y = x W'^T is the forced expert's output
            w, a, b = s.read(name), s.read(ex + "lora_A.weight"), s.read(ex + "lora_B.weight")
            scale = moe.lora_alpha / moe.lora_rank
            yield name, (w.double() + scale * (b.double() @ a.double())).to(w.dtype)
        else:
            yield name, s.read(name)


def _backbone_tensors(s: ExportSource, names):
    """The base model's tensors as the source holds them (the FFN of a MoCaE layer is the LoRA base)."""
    for name in names:
        yield name, s.read(name)


def _mixtral_tensors(s: ExportSource, names):
    """Router folded to a gate (W / T), experts as w1 (gate), w3 (up), w2 (down); the base FFN goes."""
    for name in names:
        layer = _layer_of(name)
        if layer is None or ".mlp." not in name:
            yield name, s.read(name)
            continue
        if not name.endswith("mlp.gate_proj.weight"):
            continue
        pre, out = f"model.layers.{layer}.mlp.", f"model.layers.{layer}.block_sparse_moe."
        yield out + "gate.weight", s.read(pre + "router.weight") / s.read(pre + "router.log_temperature").exp()
        for j, n in enumerate(s.moe.expert_names):
            for w, proj in (("w1", "gate_proj"), ("w2", "down_proj"), ("w3", "up_proj")):
                yield f"{out}experts.{j}.{w}.weight", s.read(f"{pre}experts.{n}.{proj}.weight")


def _mixtral_refusal(s: ExportSource) -> str | None:
    """Why Mixtral would not compute exactly what TrinityX computes, or None."""
    moe, arch = s.moe, s.arch
    if moe is None:
        return "a backbone without experts has no mixture to export (use --format trinityx)"
    if moe.kind != "full":
        return f"experts.kind: {moe.kind} — Mixtral experts are whole FFNs (export LoRA experts as trinityx or dense)"
    if moe.layer_ids(arch.num_layers) != list(range(arch.num_layers)):
        return f"experts.layers: {moe.layers} — Mixtral has a mixture in every layer"
    if moe.normalize_output:
        return "router.normalize_output: true — Mixtral has no post-mix RMSNorm"
    if arch.qkv_bias:
        return f"model qkv bias ({arch.model_type}) — Mixtral attention has no bias"
    if arch.model_type == "gemma":
        return ("model_type: 'gemma' — Mixtral has no (1 + w) RMSNorm, no sqrt(hidden) embedding scale and no GeGLU "
                "(export as trinityx or dense)")
    if arch.qk_norm:
        return f"model_type: {arch.model_type!r} — Mixtral attention has no q/k RMSNorm (export as trinityx or dense)"
    if _dtype(s) != torch.float32:
        return f"model dtype {_dtype(s)} — Mixtral computes router logits in the model dtype, TrinityX in fp32"
    E = moe.num_experts
    top_k = E if moe.top_k == "all" else int(moe.top_k)
    if not moe.renormalize and top_k < E:
        return f"router.renormalize: false — Mixtral always renormalises its top-{top_k} weights"
    for layer in moe.layer_ids(arch.num_layers):
        pre = f"model.layers.{layer}.mlp.router."
        if pre + "bias" in s.mocae_files:
            return f"{pre}bias — Mixtral's gate has no bias"
        gamma = s.read(pre + "log_importance")
        if not torch.equal(gamma, gamma[:1].expand_as(gamma)):
            return (f"router.importance: {gamma.exp().tolist()} (layer {layer}) — Mixtral's gate has no bias "
                    "to carry log gamma; only uniform importance is exact")
        w = s.read(pre + "weight")
        if top_k < E and len(torch.unique(w, dim=0)) < E:
            # equal rows tie on every token: TrinityX picks the lowest index (stable sort),
            # Mixtral's torch.topk promises no order (on CPU it returns the highest)
            return (f"router.top_k: {top_k} < {E} experts with equal router rows (layer {layer}) — every token "
                    "ties and Mixtral's torch.topk breaks ties differently; export top_k all or a trained router")
    return None


_NO_POST_NORM = ("router.normalize_output: true — a plain model has no post-mix RMSNorm, so no {what} equals an "
                 "expert alone (use --format trinityx with force_expert)")


def _peft_refusal(s: ExportSource) -> str | None:
    """Why a PEFT adapter on the plain backbone would not compute the model with its expert
    forced, or None. PEFT's LoRA is W x + (alpha / r) B A x on the targeted projections: exactly a
    LoRA expert alone, and nothing else (a whole FFN, a post-mix norm)."""
    moe = s.moe
    if moe is None:
        return "a backbone without experts has no adapters to export (use --format trinityx)"
    if moe.kind != "lora":
        return (f"experts.kind: {moe.kind} — PEFT adapters are LoRA deltas, these experts are whole FFNs "
                "(export them as trinityx, dense or mixtral)")
    if moe.normalize_output:
        return _NO_POST_NORM.format(what="adapter")
    return None


# ---------------------------------------------------------------------------------------- plan
def _plan(s: ExportSource, fmt: str, expert: str | None):
    """(config, tensor stream, MoCaE tensors the stream must consume) for one format."""
    moe = s.moe
    if fmt not in FORMATS:
        raise ValueError(f"--format: {fmt!r} — one of {', '.join(FORMATS)}")
    if expert is not None and fmt != "dense":
        raise ValueError(f"--expert: {expert!r} — only with --format dense")
    dtype = str(_dtype(s)).removeprefix("torch.")
    if fmt == "peft":
        reason = _peft_refusal(s)
        if reason:
            raise ExportRefused(reason)
        config = _base_config(s, dtype=dtype, architectures=[_arch_name(s.arch.model_type)])
        return config, _backbone_tensors(s, _meta_model(config)), set(s.mocae_files)  # peft.py reads the MoCaE ones
    if moe is None or fmt == "trinityx":
        if fmt == "mixtral":
            raise ExportRefused(_mixtral_refusal(s))
        config = _trinityx_config(s) if moe else _base_config(s, architectures=[_arch_name(s.arch.model_type)])
        config.dtype = dtype
        return config, _trinityx_tensors(s), set(s.mocae_files)
    if fmt == "dense":
        if expert not in moe.expert_names:
            raise ValueError(f"--expert: {expert!r} — one of {', '.join(moe.expert_names)}")
        if moe.normalize_output:
            raise ExportRefused(_NO_POST_NORM.format(what="dense model"))
        config = _base_config(s, dtype=dtype, architectures=[_arch_name(s.arch.model_type)])
        mine = set(expert_tensors(s.mocae_files, expert))
        return config, _dense_tensors(s, expert, _meta_model(config)), mine
    reason = _mixtral_refusal(s)
    if reason:
        raise ExportRefused(reason)
    hf = {k: v for k, v in _base_config(s).to_dict().items() if k not in ("model_type", "architectures", "dtype")}
    config = MixtralConfig(**hf, num_local_experts=moe.num_experts, dtype=dtype, architectures=["MixtralForCausalLM"],
                           num_experts_per_tok=moe.num_experts if moe.top_k == "all" else int(moe.top_k))
    names = _meta_model(_base_config(s))
    return config, _mixtral_tensors(s, names), set(s.mocae_files)
