"""The README.md of an exported folder: what was exported and from where, the router's settings as
trained (temperature and importance read from the tensors, not the config: stage 2 may have
learned them), stage 2's calibration figures, and how to load the format."""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from trinityx_ds.convert.source import ExportSource


def _router_summary(s: ExportSource) -> list[str]:
    lines = []
    for layer in s.moe.layer_ids(s.arch.num_layers):
        pre = f"model.layers.{layer}.mlp.router."
        t = s.read(pre + "log_temperature").exp().item()
        gamma = [round(g, 4) for g in s.read(pre + "log_importance").exp().tolist()]
        lines.append(f"| {layer} | {t:.4g} | {gamma} |")
    return lines


def model_card(s: ExportSource, fmt: str, expert: str | None) -> str:
    """README.md: what was exported, the router settings, and stage 2's calibration figures."""
    arch, moe = s.arch, s.moe
    title = {"trinityx": "TrinityX (MoCaE)", "dense": f"TrinityX expert `{expert}` merged (dense)",
             "mixtral": "TrinityX as Mixtral", "peft": "TrinityX backbone with one PEFT adapter per expert"}[fmt] \
        if moe else "TrinityX backbone"
    out = ["---", "library_name: transformers", "tags: [trinityx, mixture-of-experts, calibrated-router]", "---",
           f"# {title}", "",
           f"Base: {arch.model_type}, {arch.num_layers} layers, hidden {arch.hidden_size}, vocab {arch.vocab_size}. "
           f"Exported from `{s.origin}`.", ""]
    if moe is None:
        return "\n".join(out) + "\n"
    layers = moe.layer_ids(arch.num_layers)
    out += [f"Experts ({moe.kind}): {', '.join(moe.expert_names)}"
            + (f"; LoRA rank {moe.lora_rank}, alpha {moe.lora_alpha}, targets {', '.join(moe.lora_targets)}"
               if moe.kind == "lora" else ""),
            f"MoCaE layers: {'all' if layers == list(range(arch.num_layers)) else layers}", "",
            "Router: p = softmax(z(h) / T + log gamma), top-k, "
            f"top_k = {moe.top_k}, renormalize = {moe.renormalize}, post-mix RMSNorm = {moe.normalize_output}.", "",
            "| layer | T | gamma |", "|---|---|---|", *_router_summary(s), ""]
    if s.validation:
        v = s.validation
        out += ["## Calibration (stage 2 held-out routing)", "",
                "| n | accuracy | ECE | Brier | NLL |", "|---|---|---|---|---|",
                f"| {v.get('n')} | {v.get('accuracy', float('nan')):.4f} | {v.get('ece', float('nan')):.4f} | "
                f"{v.get('brier', float('nan')):.4f} | {v.get('nll', float('nan')):.4f} |", ""]
        out += [f"- {k}: {a:.4f}" for k, a in v.get("per_task_accuracy", {}).items()] + [""]
    usage = {"trinityx": "Load with `AutoModelForCausalLM.from_pretrained(path)` after `import trinityx_ds`, or with "
                         "`trust_remote_code=True` anywhere. `config.force_expert = NAME` runs one expert alone.",
             "dense": f"A plain model: the `{expert}` expert alone (the router is not part of it).",
             "mixtral": "Exact for the router above: T folded into the gate (W / T), uniform gamma. Tokens whose "
                        "two probabilities are exactly equal break the tie by torch.topk here, by lowest index in "
                        "TrinityX.",
             "peft": "A plain model; `adapters/<expert>/` is each expert as a PEFT LoRA adapter (exact: the model with "
                     "that expert forced), e.g. `vllm serve PATH --enable-lora --lora-modules "
                     + " ".join(f"{n}=PATH/adapters/{n}" for n in moe.expert_names)
                     + "`. `trinityx route --export PATH --prompt TEXT` names the adapter the router picks for a "
                       "request (mean calibrated probability over its tokens)."}
    return "\n".join(out + ["## Use", "", usage[fmt], ""])
