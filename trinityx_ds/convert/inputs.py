"""What an export reads: the four kinds of input, each resolved to one `ExportSource` (the
backbone's arch, HF-named tensors read one at a time, the MoCaE settings).

    a training output dir     a run's `output.dir`: its stage outputs (stage 2's router, the experts
                              as the run last trained them), the backbone from the run config
    a training checkpoint     a run's `checkpoints/` folder (its latest complete tag) or one
                              `step%08d` tag, of any TP/EP/ZeRO layout: read through the tag's
                              universal copy (storage/universal_copy.py), the experts it does not
                              train from their stage-1 files
    a TrinityX HF folder      what `trinityx export-hf` writes (model_type "trinityx")
    a backbone                an import-hf checkpoint or a plain HF folder: no experts

Where a run keeps its files is storage/layout.py's to say (`RunLayout`, `CheckpointDir`): a run
that has moved since it trained is read where it is now, never where its config says it was.
"""
from __future__ import annotations

import json
from pathlib import Path

from trinityx_ds.config import load_config
from trinityx_ds.convert.formats import TRINITYX_KEYS, model_layout
from trinityx_ds.convert.source import MODEL_ROLES, ExportSource
from trinityx_ds.errors import CheckpointError
from trinityx_ds.model.arch import ModelArch
from trinityx_ds.model.assemble import open_expert
from trinityx_ds.model.mocae_spec import ROUTING_EMA, MoCaEConfig, expert_of, mocae_role
from trinityx_ds.model.weights import META, open_source
from trinityx_ds.storage.fingerprint import model_fingerprint
from trinityx_ds.storage.layout import VALIDATION, CheckpointDir, RunLayout, import_origin
from trinityx_ds.storage.sources import ChainSource, SafetensorsSource
from trinityx_ds.storage.universal_copy import OPTIMIZER_PREFIX, open_universal

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
    """`config` when given, else the config the run last trained with (RunLayout.run_config_file)."""
    if config is not None:
        return Path(config)
    try:
        return RunLayout(run).run_config_file()
    except FileNotFoundError:
        raise CheckpointError(f"{run}: no stage checkpoint with config.yaml nor config.yaml "
                              "(not a training output dir; pass the run config with --config)") from None


def _assemble(cfg, cfg_path: Path, moe: MoCaEConfig, sources: list, where: dict[str, str], homes: dict[str, Path],
              validation: dict | None) -> ExportSource:
    """The export source of a run: MoCaE `sources` (first wins) over the run's backbone."""
    model_path = cfg.model.checkpoint or cfg.model.hf_path
    arch, backbone = open_source(model_path)
    tok = [import_origin(model_path), Path(model_path)]
    tok += [Path(cfg.model.tokenizer)] if cfg.model.tokenizer else []
    tok.append(cfg_path.parent / CheckpointDir.TOKENIZER)  # a checkpoint tag keeps its tokenizer by its config
    return ExportSource(arch, ChainSource(sources + [backbone]), Path(model_path), moe, where, tok, validation,
                        {k: str(v) for k, v in homes.items()})


def check_experts(cfg, moe: MoCaEConfig, files: dict[str, Path]) -> None:
    """Each expert file against the run, before anything is written (CheckpointError naming the
    file and the tensor): the tensors and shapes the run's config asks for, in fp32 or its dtype,
    every value finite, trained on its backbone where the file records one (model/assemble.open_expert:
    what stage 2 checks before launch, issue 28)."""
    model_path = cfg.model.checkpoint or cfg.model.hf_path
    arch, _ = open_source(model_path)
    backbone = model_fingerprint(model_path)
    for name, path in files.items():
        open_expert(Path(path), arch, moe, name, dtype=cfg.model.dtype, backbone=backbone,
                    values=True)


def _from_run(run: Path, config: str | Path | None) -> ExportSource:
    """A run's stage outputs: stage 2's router (and experts, when it trains them), else stage 1's."""
    cfg_path = _run_config_path(run, config)
    cfg = load_config(str(cfg_path), check_paths=False)
    layout = RunLayout(run)  # where the run is now: it may have moved since it was trained
    moe = MoCaEConfig.from_run_config(cfg)
    homes = {"router": layout.router_file,
             **{n: layout.final_expert_file(n, cfg.train.train_experts_in_stage2) for n in moe.expert_names}}
    check_experts(cfg, moe, {n: homes[n] for n in moe.expert_names if Path(homes[n]).is_file()})
    sources, where = _files(list(homes.values()))  # stage 2's router first, as StageRun has no router source
    val = layout.validation_file
    return _assemble(cfg, cfg_path, moe, sources, where, homes, json.loads(val.read_text()) if val.is_file() else None)


def _from_checkpoint(tag_dir: Path, config: str | Path | None) -> ExportSource:
    """A training checkpoint of any layout, through its universal copy: the stage's trained tensors
    (stage 1: its one expert; stage 2: the router, and the experts when it trains them), the other
    experts from their stage-1 files, the frozen backbone from the run config's model source."""
    tag_dir = tag_dir.resolve()
    ckpt, tag = CheckpointDir(tag_dir.parent), tag_dir.name
    cfg_path = Path(config) if config is not None else ckpt.config_file(tag)
    cfg = load_config(str(cfg_path), check_paths=False)
    state = json.loads(ckpt.state_file(tag).read_text())
    layout = RunLayout.of_checkpoint(tag_dir, state["stage"])
    moe = MoCaEConfig.from_run_config(cfg)
    if state["stage"] == 1:  # as stage 1 trained it: one expert, every token to it
        moe = moe.one_expert(state["expert"])
    held = open_universal(tag_dir)
    where = {k: str(held.folder / f) for k, f in held.weight_map.items()
             if not k.startswith(OPTIMIZER_PREFIX) and mocae_role(k) != ROUTING_EMA}  # training state, not the model
    trained = {expert_of(k) for k in where}
    frozen = [n for n in moe.expert_names if n not in trained]
    homes = {"router": held.folder,
             **{n: layout.expert_file(n) if n in frozen else held.folder for n in moe.expert_names}}
    check_experts(cfg, moe, {n: layout.expert_file(n) for n in frozen if layout.expert_file(n).is_file()})
    sources, files = _files([layout.expert_file(n) for n in frozen])
    return _assemble(cfg, cfg_path, moe, [held] + sources, {**where, **files}, homes, None)


def _from_trinityx_folder(folder: Path, cfg: dict) -> ExportSource:
    base = {k: v for k, v in cfg.items() if k not in TRINITYX_KEYS}
    arch = ModelArch.from_hf_dict({**base, "model_type": cfg["base_model_type"]})
    moe = MoCaEConfig.from_hf_dict(cfg["mocae"])
    src = SafetensorsSource(folder)
    where = {k: str(folder / f) for k, f in src.weight_map.items() if mocae_role(k) in MODEL_ROLES}
    val = folder / VALIDATION
    return ExportSource(arch, src, folder, moe, where, [folder], json.loads(val.read_text()) if val.is_file() else None)


def open_export_source(path: str | Path, config: str | Path | None = None) -> ExportSource:
    """A training output dir, a training checkpoint, a TrinityX HF folder, or a backbone (import-hf
    checkpoint, HF folder); its `layout` is the model's (every read is checked against it)."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such folder")
    cfg_file = path / "config.json"
    if cfg_file.is_file() and json.loads(cfg_file.read_text()).get("model_type") == "trinityx":
        s = _from_trinityx_folder(path, json.loads(cfg_file.read_text()))
    elif (path / META).is_file() or cfg_file.is_file():
        arch, src = open_source(path)
        s = ExportSource(arch, src, path, tokenizer_dirs=[path])
    elif (tag := CheckpointDir.tag_of(path)) is not None:
        s = _from_checkpoint(tag, config)
    else:
        s = _from_run(path, config)
    s.layout = model_layout(s)
    return s
