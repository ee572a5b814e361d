"""Export to Hugging Face folders, and back.

Formats: `trinityx` (the whole MoCaE model, loadable with AutoModelForCausalLM once trinityx_ds is
imported, or anywhere with trust_remote_code), `dense` (one expert merged into a plain
Llama/Mistral/Qwen2) and `mixtral` (only where Mixtral computes exactly what TrinityX computes;
otherwise `ExportRefused` names the setting that prevents it).

Everything is read through HF-named tensor sources one tensor at a time and written in
safetensors shards of at most `max_shard_bytes`, one shard in memory at a time, into a temporary
folder renamed at the end. Inputs: a training output dir (`output.dir` of a run: its stage
outputs), a training checkpoint of any layout (a run's `checkpoints/` folder, meaning its latest
complete tag, or one `step%08d` tag: its universal copy, see train/universal.py), a TrinityX HF
folder, or an import-hf checkpoint (backbone only: a plain model).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from trinityx_ds.convert.backbone_ckpt import copy_tokenizer, import_hf
from trinityx_ds.model.weights import META, open_source
from trinityx_ds.storage.sources import ChainSource, CheckpointError, MissingTensor, SafetensorsSource
from trinityx_ds.model.arch import ModelArch
from trinityx_ds.storage.shards import DEFAULT_SHARD_BYTES, ShardWriter, parse_bytes

FORMATS = ("trinityx", "dense", "mixtral")
HF_MODEL_DIR = Path(__file__).parent / "hf_model"
VALIDATION = "validation.json"  # stage 2's calibration report, kept with TrinityX exports
MODEL_FILES = ("configuration_trinityx.py", "modeling_trinityx.py")
AUTO_MAP = {"AutoConfig": "configuration_trinityx.TrinityXConfig",
            "AutoModelForCausalLM": "modeling_trinityx.TrinityXForCausalLM"}
_TRINITYX_KEYS = ("mocae", "base_model_type", "force_expert", "auto_map", "architectures")
_MOCAE_PARTS = (".mlp.router.", ".mlp.experts.", ".mlp.post_norm.")
_PROJ = ("gate_proj", "up_proj", "down_proj")


class ExportRefused(ValueError):
    """The requested format cannot compute exactly what the model computes."""


# ---------------------------------------------------------------------------------------- inputs
@dataclass
class ExportSource:
    """What one export reads: the backbone's arch, HF-named tensors, and the MoCaE settings.

    `mocae_files` maps every MoCaE tensor the source holds to the file it came from: the export
    must account for each one (the count that catches silently dropped experts)."""

    arch: ModelArch
    src: object  # TensorSource
    origin: Path
    moe: object = None  # MoCaEConfig, None for a plain backbone
    mocae_files: dict[str, str] = field(default_factory=dict)
    tokenizer_dirs: list[Path] = field(default_factory=list)  # later ones win
    validation: dict | None = None
    homes: dict[str, str] = field(default_factory=dict)  # "router" / expert name -> its file
    layout: dict[str, tuple] = field(default_factory=dict)  # name -> shape the model expects
    reads: set[str] = field(default_factory=set)

    def where(self, name: str) -> str:
        """The file that holds (or should hold) tensor `name`."""
        if name in self.mocae_files:
            return self.mocae_files[name]
        if ".mlp.experts." in name:
            return self.homes.get(name.split(".mlp.experts.")[1].split(".")[0], str(self.origin))
        if any(p in name for p in _MOCAE_PARTS):
            return self.homes.get("router", str(self.origin))
        return str(self.origin)

    def release(self) -> None:
        """Unmaps the safetensors files read so far (reopened on the next read). Tensors keep their
        own mapping, so written shards' pages leave memory: without this, every file stays mapped
        and the process's resident size grows to the whole model."""
        stack = [self.src]
        while stack:
            src = stack.pop()
            stack += getattr(src, "sources", [])
            if isinstance(src, SafetensorsSource):
                src.close()

    def read(self, name: str) -> torch.Tensor:
        self.reads.add(name)
        where = self.where(name)
        try:
            t = self.src.read(name)
        except MissingTensor:
            raise CheckpointError(f"{where}: tensor {name!r} is missing") from None
        want = self.layout.get(name)
        if want is not None and tuple(t.shape) != want:
            raise CheckpointError(f"{where}: tensor {name!r} has shape {tuple(t.shape)}, the model needs {want}")
        return t


def _mocae_config_dict(moe) -> dict:
    top_k = moe.num_experts if moe.top_k == "all" else int(moe.top_k)
    return {"expert_names": list(moe.expert_names), "kind": moe.kind, "layers": moe.layers,
            "lora_rank": moe.lora_rank, "lora_alpha": moe.lora_alpha, "lora_targets": list(moe.lora_targets),
            "temperature": moe.temperature, "importance": moe.importance, "top_k": top_k,
            "renormalize": moe.renormalize, "normalize_output": moe.normalize_output}


def _files(paths: list[Path]) -> tuple[list, dict[str, str]]:
    """Safetensors sources of single files, and which file holds each tensor."""
    sources, where = [], {}
    for p in paths:
        if not p.is_file():
            raise CheckpointError(f"{p}: no such file")
        s = SafetensorsSource.from_file(p)
        sources.append(s)
        where.update({k: str(p) for k in s.keys()})
    return sources, where


def _run_config_path(run: Path, config: str | Path | None) -> Path:
    from trinityx_ds.train.checkpoint import latest_tag

    if config is not None:
        return Path(config)
    ckpt = run / "stage2" / "checkpoints"
    tag = latest_tag(ckpt)
    if tag is not None:
        return ckpt / tag / "config.yaml"
    if (run / "config.yaml").is_file():
        return run / "config.yaml"
    raise CheckpointError(f"{run}: no stage2/checkpoints/<latest>/config.yaml nor config.yaml "
                          "(not a training output dir; pass the run config with --config)")


def _assemble(cfg, cfg_path: Path, moe, sources: list, where: dict[str, str], homes: dict[str, Path],
              validation: dict | None) -> ExportSource:
    """The export source of a run: MoCaE `sources` (first wins) over the run's backbone."""
    from trinityx_ds.train.stages import open_source_origin

    model_path = cfg.model.checkpoint or cfg.model.hf_path
    arch, backbone = open_source(model_path)
    tok = [Path(open_source_origin(model_path)), Path(model_path)]
    tok += [Path(cfg.model.tokenizer)] if cfg.model.tokenizer else []
    tok.append(cfg_path.parent / "tokenizer")
    return ExportSource(arch, ChainSource(sources + [backbone]), Path(model_path), moe, where, tok, validation,
                        {k: str(v) for k, v in homes.items()})


def _from_run(run: Path, config: str | Path | None) -> ExportSource:
    """A run's stage outputs: stage 2's router (and experts, when it trains them), else stage 1's."""
    from trinityx_ds.config import load_config
    from trinityx_ds.model.mocae import MoCaEConfig
    from trinityx_ds.train.stages import final_expert_file

    cfg_path = _run_config_path(run, config)
    cfg = load_config(str(cfg_path), check_paths=False)
    cfg.output.dir = str(run)  # the run may have moved since it was trained
    moe = MoCaEConfig.from_run_config(cfg)
    homes = {"router": run / "stage2" / "router.safetensors",
             **{n: final_expert_file(cfg, n) for n in moe.expert_names}}
    sources, where = _files(list(homes.values()))  # stage 2's router first, as StageRun has no router source
    val = run / "stage2" / "validation.json"
    return _assemble(cfg, cfg_path, moe, sources, where, homes, json.loads(val.read_text()) if val.is_file() else None)


def _checkpoint_tag(path: Path) -> Path | None:
    """The tag dir a training checkpoint path means (a `checkpoints/` folder: its latest complete
    tag), or None when `path` is no training checkpoint."""
    from trinityx_ds.train.checkpoint import COMPLETE, STATE, latest_tag
    from trinityx_ds.train.universal import FOLDER

    if (path / "latest").is_file():
        tag = latest_tag(path)
        if tag is None:
            raise CheckpointError(f"{path / 'latest'}: names no complete checkpoint (no {COMPLETE} marker)")
        return path / tag
    if (path / STATE).is_file() or (path / FOLDER).is_dir():
        if not (path / COMPLETE).is_file():
            raise CheckpointError(f"{path}: incomplete checkpoint (no {COMPLETE} marker: its save was interrupted)")
        return path
    return None


def _from_checkpoint(tag_dir: Path, config: str | Path | None) -> ExportSource:
    """A training checkpoint of any layout, through its universal copy: the stage's trained tensors
    (stage 1: its one expert; stage 2: the router, and the experts when it trains them), the other
    experts from their stage-1 files, the frozen backbone from the run config's model source."""
    from trinityx_ds.config import load_config
    from trinityx_ds.model.mocae import MoCaEConfig
    from trinityx_ds.train.checkpoint import STATE
    from trinityx_ds.train.gather import OPTIMIZER
    from trinityx_ds.train.stages import expert_file
    from trinityx_ds.train.universal import open_copy

    tag_dir = tag_dir.resolve()
    cfg_path = Path(config) if config is not None else tag_dir / "config.yaml"
    cfg = load_config(str(cfg_path), check_paths=False)
    state = json.loads((tag_dir / STATE).read_text())
    # <run>/stage2/checkpoints/<tag> or <run>/stage1/<expert>/checkpoints/<tag>: the run may have moved
    cfg.output.dir = str(tag_dir.parents[2] if state["stage"] == 2 else tag_dir.parents[3])
    moe = MoCaEConfig.from_run_config(cfg)
    if state["stage"] == 1:  # as stage 1 trained it: one expert, every token to it
        moe = moe.one_expert(state["expert"])
    held = open_copy(tag_dir)
    where = {k: str(held.folder / f) for k, f in held.weight_map.items()
             if not k.startswith(OPTIMIZER) and ".mlp.routing_ema." not in k}  # training state, not the model
    frozen = [n for n in moe.expert_names if not any(f".mlp.experts.{n}." in k for k in where)]
    homes = {"router": held.folder,
             **{n: expert_file(cfg, n) if n in frozen else held.folder for n in moe.expert_names}}
    sources, files = _files([expert_file(cfg, n) for n in frozen])
    return _assemble(cfg, cfg_path, moe, [held] + sources, {**where, **files}, homes, None)


def _from_trinityx_folder(folder: Path, cfg: dict) -> ExportSource:
    from trinityx_ds.model.mocae import MoCaEConfig

    base = {k: v for k, v in cfg.items() if k not in _TRINITYX_KEYS}
    arch = ModelArch.from_hf_dict({**base, "model_type": cfg["base_model_type"]})
    m = cfg["mocae"]
    moe = MoCaEConfig(**{k: v for k, v in m.items() if k != "lora_targets"}, lora_targets=tuple(m["lora_targets"]))
    src = SafetensorsSource(folder)
    where = {k: str(folder / f) for k, f in src.weight_map.items() if any(p in k for p in _MOCAE_PARTS)}
    val = folder / VALIDATION
    return ExportSource(arch, src, folder, moe, where, [folder], json.loads(val.read_text()) if val.is_file() else None)


def open_export_source(path: str | Path, config: str | Path | None = None) -> ExportSource:
    """A training output dir, a training checkpoint, a TrinityX HF folder, or a backbone (import-hf
    checkpoint, HF folder)."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such folder")
    cfg_file = path / "config.json"
    if cfg_file.is_file() and json.loads(cfg_file.read_text()).get("model_type") == "trinityx":
        s = _from_trinityx_folder(path, json.loads(cfg_file.read_text()))
    elif (path / META).is_file() or cfg_file.is_file():
        arch, src = open_source(path)
        s = ExportSource(arch, src, path, tokenizer_dirs=[path])
    elif (tag := _checkpoint_tag(path)) is not None:
        s = _from_checkpoint(tag, config)
    else:
        s = _from_run(path, config)
    s.layout = {k: tuple(v.shape) for k, v in _meta_model(_trinityx_config(s) if s.moe else _base_config(s)).items()}
    return s


# ---------------------------------------------------------------------------------------- configs
def _base_config(s: ExportSource, **extra):
    from transformers import AutoConfig

    hf = {k: v for k, v in s.arch.hf_config.items() if k not in _TRINITYX_KEYS + ("model_type",)}
    return AutoConfig.for_model(s.arch.model_type, **{**hf, **extra})


def _dtype(s: ExportSource) -> torch.dtype:
    return s.src.read("model.embed_tokens.weight", 0, 0, 1).dtype


def _trinityx_config(s: ExportSource):
    from trinityx_ds.convert.hf_model import TrinityXConfig

    base = _base_config(s).to_dict()
    for k in ("model_type", "architectures", "transformers_version", "auto_map"):
        base.pop(k, None)
    return TrinityXConfig(**base, base_model_type=s.arch.model_type, mocae=_mocae_config_dict(s.moe),
                          architectures=["TrinityXForCausalLM"], auto_map=dict(AUTO_MAP))


def _meta_model(config) -> dict[str, torch.Tensor]:
    """The names and shapes (no memory) of the state dict transformers expects for `config`."""
    from transformers import AutoModelForCausalLM

    if config.model_type == "trinityx":
        from trinityx_ds.convert.hf_model import TrinityXForCausalLM as cls

        with torch.device("meta"):
            sd = cls(config).state_dict()
    else:
        with torch.device("meta"):
            sd = AutoModelForCausalLM.from_config(config).state_dict()
    if getattr(config, "tie_word_embeddings", False):
        sd.pop("lm_head.weight", None)
    return sd


# ---------------------------------------------------------------------------------------- formats
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


# ---------------------------------------------------------------------------------------- writing
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
             "mixtral": "TrinityX as Mixtral"}[fmt] if moe else "TrinityX backbone"
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
                        "TrinityX."}
    return "\n".join(out + ["## Use", "", usage[fmt], ""])


def _write_side_files(tmp: Path, s: ExportSource, config, fmt: str, expert: str | None) -> None:
    from transformers import GenerationConfig

    config.save_pretrained(tmp)
    for d in s.tokenizer_dirs:
        if d.is_dir():
            copy_tokenizer(d, tmp)
    if not (tmp / "generation_config.json").is_file():
        GenerationConfig.from_model_config(config).save_pretrained(tmp)
    if fmt == "trinityx" and s.moe is not None:
        for f in MODEL_FILES:
            shutil.copy2(HF_MODEL_DIR / f, tmp / f)
        if s.validation:
            (tmp / VALIDATION).write_text(json.dumps(s.validation, indent=2))
    (tmp / "README.md").write_text(model_card(s, fmt, expert))


def _plan(s: ExportSource, fmt: str, expert: str | None):
    """(config, tensor stream, MoCaE tensors the stream must consume) for one format."""
    moe = s.moe
    if fmt not in FORMATS:
        raise ValueError(f"--format: {fmt!r} — one of {', '.join(FORMATS)}")
    if expert is not None and fmt != "dense":
        raise ValueError(f"--expert: {expert!r} — only with --format dense")
    dtype = str(_dtype(s)).removeprefix("torch.")
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
            raise ExportRefused("router.normalize_output: true — a plain model has no post-mix RMSNorm, so no dense "
                                "model equals an expert alone (use --format trinityx with force_expert)")
        config = _base_config(s, dtype=dtype, architectures=[_arch_name(s.arch.model_type)])
        mine = {k for k in s.mocae_files if f".mlp.experts.{expert}." in k}
        return config, _dense_tensors(s, expert, _meta_model(config)), mine
    reason = _mixtral_refusal(s)
    if reason:
        raise ExportRefused(reason)
    from transformers import MixtralConfig

    hf = {k: v for k, v in _base_config(s).to_dict().items() if k not in ("model_type", "architectures", "dtype")}
    config = MixtralConfig(**hf, num_local_experts=moe.num_experts, dtype=dtype, architectures=["MixtralForCausalLM"],
                           num_experts_per_tok=moe.num_experts if moe.top_k == "all" else int(moe.top_k))
    names = _meta_model(_base_config(s))
    return config, _mixtral_tensors(s, names), set(s.mocae_files)


def _arch_name(model_type: str) -> str:
    return {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}[model_type]


def export_hf(run_or_ckpt: str | Path, out_dir: str | Path, fmt: str = "trinityx", expert: str | None = None,
              overwrite: bool = False, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
              config: str | Path | None = None) -> Path:
    """Writes an HF folder at `out_dir` (see module docstring); returns it.

    `config`: the run config when a training output dir holds none (default: the one saved
    with stage 2's latest checkpoint)."""
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out}: already exists (pass --overwrite to replace it)")
    s = open_export_source(run_or_ckpt, config)
    hf_config, tensors, required = _plan(s, fmt, expert)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        writer = ShardWriter(tmp, max_shard_bytes, on_flush=s.release)
        for name, tensor in tensors:
            writer.add(name, tensor)
        writer.close()
        missing = sorted(required - s.reads)
        if missing:
            raise CheckpointError(f"{s.where(missing[0])}: {len(missing)} of {len(required)} expert/router tensors "
                                  f"would be left out of the export (the model has no place for them), "
                                  f"e.g. {missing[0]!r}")
        _write_side_files(tmp, s, hf_config, fmt, expert)
        _replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _replace(tmp: Path, out: Path) -> None:
    old = out.with_name(f".{out.name}.old")
    if out.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------------------------- import
def import_trinityx(hf_dir: str | Path, out_dir: str | Path, tp: int = 1, overwrite: bool = False) -> Path:
    """A TrinityX HF folder as a starting point for training: OUT/backbone (import-hf checkpoint at
    `tp`), OUT/stage1/<expert>/expert.safetensors, OUT/stage2/router.safetensors (the layout of a
    training output dir) and OUT/config.yaml, a run config whose data.tasks paths are placeholders."""
    from trinityx_ds.config import config_from_dict, save_config
    from trinityx_ds.model.backbone import DTYPES

    hf_dir, out = Path(hf_dir), Path(out_dir)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out}: already exists (pass --overwrite to replace it)")
    s = open_export_source(hf_dir)
    if s.moe is None:
        raise CheckpointError(f"{hf_dir}/config.json: model_type is not 'trinityx' (use `trinityx import-hf`)")
    dtype = {v: k for k, v in DTYPES.items()}[_dtype(s)]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        _import_backbone(s, hf_dir, tmp / "backbone", tp, dtype)
        for n in s.moe.expert_names:  # one expert in memory at a time
            (tmp / "stage1" / n).mkdir(parents=True)
            save_file({k: s.read(k) for k in s.mocae_files if f".mlp.experts.{n}." in k},
                      str(tmp / "stage1" / n / "expert.safetensors"))
            s.release()
        (tmp / "stage2").mkdir()
        save_file({k: s.read(k) for k in s.mocae_files if ".mlp.experts." not in k},
                  str(tmp / "stage2" / "router.safetensors"))
        if s.validation:
            (tmp / "stage2" / VALIDATION).write_text(json.dumps(s.validation, indent=2))
        moe = s.moe
        run = {"name": hf_dir.name or "trinityx", "model": {"checkpoint": str((out / "backbone").resolve()),
                                                            "dtype": dtype},
               "experts": {"names": list(moe.expert_names), "kind": moe.kind, "layers": moe.layers,
                           "lora": {"rank": moe.lora_rank, "alpha": moe.lora_alpha, "targets": list(moe.lora_targets)}},
               "router": {"temperature": moe.temperature, "importance": moe.importance, "top_k": moe.top_k,
                          "renormalize": moe.renormalize, "normalize_output": moe.normalize_output},
               "data": {"tasks": {n: [{"path": f"REPLACE_ME/{n}.jsonl"}] for n in moe.expert_names}},
               "output": {"dir": str(out.resolve())}}
        save_config(config_from_dict(run, check_paths=False), str(tmp / "config.yaml"))
        _replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _import_backbone(s: ExportSource, hf_dir: Path, out: Path, tp: int, dtype: str) -> None:
    """import_hf on a view of the folder: a base config.json and an index naming the original shard
    files, so the backbone is re-sliced without copying it first."""
    from trinityx_ds.model.backbone import DTYPES

    with tempfile.TemporaryDirectory(dir=out.parent) as view:
        view = Path(view)
        _base_config(s, dtype=str(DTYPES[dtype]).removeprefix("torch.")).save_pretrained(view)
        weight_map = {k: str((hf_dir / f).resolve()) for k, f in s.src.weight_map.items() if k not in s.mocae_files}
        (view / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
        for d in s.tokenizer_dirs:
            copy_tokenizer(d, view)
        import_hf(view, out, tp=tp, dtype=dtype)
    meta = json.loads((out / META).read_text())
    meta["source"] = str(hf_dir.resolve())  # not the temporary view
    (out / META).write_text(json.dumps(meta, indent=2))


# ---------------------------------------------------------------------------------------- CLI
def add_export_arguments(p) -> None:
    p.add_argument("run", help="training output dir (output.dir), training checkpoint (a run's checkpoints/ folder "
                              "= its latest complete tag, or a step%%08d tag dir; any TP/EP/ZeRO layout), "
                              "TrinityX HF folder, or import-hf checkpoint")
    p.add_argument("out", help="HF folder to write")
    p.add_argument("--format", choices=FORMATS, default="trinityx",
                   help="trinityx (MoCaE model), dense (one expert merged), mixtral (where exact)")
    p.add_argument("--expert", default=None, help="the expert of --format dense")
    p.add_argument("--config", default=None, help="run config (default: the one saved with the checkpoint, or with "
                                                  "stage 2's latest checkpoint for an output dir)")
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard [5GB]")
    p.add_argument("--overwrite", action="store_true")


def cmd_export(args) -> int:
    out = export_hf(args.run, args.out, fmt=args.format, expert=args.expert, overwrite=args.overwrite,
                    max_shard_bytes=parse_bytes(args.max_shard_size), config=args.config)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    print(f"exported {args.run} -> {out} ({args.format}, {len(set(index['weight_map'].values()))} shards, "
          f"{index['metadata']['total_size'] / 1e6:.1f} MB)")
    return 0
