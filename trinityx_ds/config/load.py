"""Reads, checks and writes run-config YAML files.

Relative input paths (model, tokenizer, DeepSpeed JSON, data files) are read from the YAML
file's folder, so a recipe means the same thing from any working directory; `output.dir` stays
relative to the launch directory. All problems of a file come back together, one line each.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import sys

import yaml

from trinityx_ds.config.families import hf_config_problems, sliding_window_problem
from trinityx_ds.config.schema import SUPPORTED_MODEL_TYPES, ConfigError, RunConfig, problem
from trinityx_ds.config.typed import build
from trinityx_ds.storage.layout import IMPORT_META  # written by `trinityx import-hf`; "hf_config": the HF config.json

# Only the FFN width must split evenly: attention heads are padded to whole query groups per TP
# rank (see ModelArch.padded_kv_heads), so any TP works for them.
_TP_SPLIT = ("intermediate_size",)


class _Loader(yaml.SafeLoader):
    """Safe YAML that also reads `5e-4` as a float (YAML 1.1 wants `5.0e-4`)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d[\d_]*(?:\.[\d_]*)?|\.\d[\d_]*)[eE][-+]?\d+$"),
    list("-+0123456789."))


def _read_yaml(path: str) -> dict:
    if not os.path.isfile(path):
        raise ConfigError([f"{path}: no such file"])
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.load(f, Loader=_Loader)
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError([f"{path}: cannot read ({e})"]) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else path
        raise ConfigError([f"{where}: YAML syntax error: {' '.join(str(getattr(e, 'problem', None) or e).split())}"]) \
            from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError([f"{path}: top level must be a mapping of sections, got {type(data).__name__}"])
    return data


def _absolute(base: str, path: str | None) -> str | None:
    if path is None or path.startswith("hub:"):
        return path
    return os.path.normpath(os.path.join(base, os.path.expanduser(path)))


def _resolve_paths(cfg: RunConfig, base: str) -> None:
    m = cfg.model
    m.hf_path, m.checkpoint, m.tokenizer = (_absolute(base, p) for p in (m.hf_path, m.checkpoint, m.tokenizer))
    cfg.parallel.ds_config = _absolute(base, cfg.parallel.ds_config)
    for sources in [*cfg.data.tasks.values(), *cfg.data.heldout.values()]:
        for src in sources:
            src.path = _absolute(base, src.path)


def _model_problems(cfg: RunConfig, check_paths: bool) -> list[str]:
    """Checks the layout against the model's shapes, read from config.json or the import meta."""
    m = cfg.model
    key, folder, name = ("model.hf_path", m.hf_path, "config.json") if m.hf_path is not None \
        else ("model.checkpoint", m.checkpoint, IMPORT_META)
    if folder is None:
        return []
    if not os.path.isdir(folder):
        return [problem(key, folder, "no such folder")] if check_paths else []
    try:
        with open(os.path.join(folder, name), encoding="utf-8") as f:
            meta = json.load(f)
    except OSError:
        return [problem(key, folder, f"no readable {name} in that folder")]
    except ValueError as e:
        return [problem(key, folder, f"{name} is not valid JSON ({e})")]
    hf = meta if name == "config.json" or not isinstance(meta, dict) else meta.get("hf_config")
    if not isinstance(hf, dict):
        return [problem(key, folder, f"{name} holds no HF config mapping")]
    out = []
    # the family and its settings: the rule ModelArch applies, read here before any process starts
    out += [problem(key, folder, p) for p in hf_config_problems(hf)]
    window = sliding_window_problem(hf, cfg.data.max_seq_len)
    if window and hf.get("model_type") in SUPPORTED_MODEL_TYPES:
        out.append(window)
    sizes = {}
    for field in (*_TP_SPLIT, "num_attention_heads", "num_hidden_layers"):
        value = hf.get(field)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
            sizes[field] = value
        else:
            out.append(problem(key, folder, f"{name} needs a positive int {field!r}"))
    tp = cfg.parallel.tp
    for field in _TP_SPLIT:
        if field in sizes and tp >= 1 and sizes[field] % tp:
            out.append(problem("parallel.tp", tp, f"must divide model {field} ({sizes[field]})"))
    if "num_hidden_layers" in sizes and cfg.experts.layers != "all":
        for i, layer in enumerate(cfg.experts.layers):
            if layer >= sizes["num_hidden_layers"]:
                out.append(problem(f"experts.layers[{i}]", layer,
                                   f"must be < model num_hidden_layers ({sizes['num_hidden_layers']})"))
    return out


def _path_problems(cfg: RunConfig) -> list[str]:
    out = []
    for key, sources in [*((f"data.tasks.{k}", v) for k, v in cfg.data.tasks.items()),
                         *((f"data.heldout.{k}", v) for k, v in cfg.data.heldout.items())]:
        for i, src in enumerate(sources):
            if not src.path.startswith("hub:") and not os.path.exists(src.path):
                out.append(problem(f"{key}[{i}].path", src.path,
                                   "no such file (relative paths are read from the YAML file's folder)"))
    if cfg.parallel.ds_config is not None and not os.path.isfile(cfg.parallel.ds_config):
        out.append(problem("parallel.ds_config", cfg.parallel.ds_config, "no such file"))
    if cfg.model.tokenizer is not None and not os.path.exists(cfg.model.tokenizer):
        out.append(problem("model.tokenizer", cfg.model.tokenizer, "no such file or folder"))
    return out


def _key(line: str) -> str:
    return line.split(": ", 1)[0]


def _related(a: str, b: str) -> bool:
    return a == b or a.startswith((b + ".", b + "[")) or b.startswith((a + ".", a + "["))


def config_from_dict(data: dict, *, base_dir: str | None = None, check_paths: bool = True,
                     world_size: int | None = None) -> RunConfig:
    """A checked RunConfig from YAML-shaped data, or ConfigError with every problem.

    `base_dir` is where relative input paths live (None: leave them as they are). With
    `world_size`, or `parallel.world_size` set, the layout is checked and `parallel.dp` filled.
    """
    structural: list[str] = []
    cfg = build(RunConfig, data, "", structural)
    if base_dir is not None:
        _resolve_paths(cfg, base_dir)
    if world_size is not None:
        if cfg.parallel.world_size not in (None, world_size):
            structural.append(problem("parallel.world_size", cfg.parallel.world_size,
                                      f"differs from the launch world size {world_size}"))
        else:
            cfg.parallel.world_size = world_size
    semantic = cfg.problems() + _model_problems(cfg, check_paths) + (_path_problems(cfg) if check_paths else [])
    # A field that failed to parse was replaced by its default: do not judge it again.
    problems = structural + [p for p in semantic if not any(_related(_key(p), _key(s)) for s in structural)]
    if problems:
        raise ConfigError(problems)
    if cfg.parallel.world_size is not None:
        cfg.parallel = cfg.parallel.resolve(cfg.parallel.world_size)
    return cfg


def load_config(path: str, *, check_paths: bool = True, world_size: int | None = None) -> RunConfig:
    """The checked RunConfig of a YAML file, or ConfigError listing every problem."""
    return config_from_dict(_read_yaml(path), base_dir=os.path.dirname(os.path.abspath(path)),
                            check_paths=check_paths, world_size=world_size)


def validate_file(path: str, *, check_paths: bool = True, world_size: int | None = None) -> list[str]:
    """Every problem of a YAML file, one line each; empty when it is fine."""
    try:
        load_config(path, check_paths=check_paths, world_size=world_size)
    except ConfigError as e:
        return e.problems
    return []


def config_to_dict(cfg: RunConfig) -> dict:
    """Plain YAML-serialisable data; `config_from_dict(config_to_dict(c)) == c`."""
    return dataclasses.asdict(cfg)


def save_config(cfg: RunConfig, path: str) -> None:
    """Writes the config as YAML, e.g. next to a run's checkpoints to record what was run."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(config_to_dict(cfg), f, sort_keys=False)


def cmd_validate(path: str, world_size: int | None = None, check_paths: bool = True) -> int:
    """`trinityx config validate`: 0 and a summary when the file is usable, else 2 and its problems.

    check_paths=False checks everything but the existence of input files: a recipe before its
    model and data are in place (the model's shape is still checked when its folder exists).
    """
    try:
        cfg = load_config(path, world_size=world_size, check_paths=check_paths)
    except ConfigError as e:
        for line in e.problems:
            print(line, file=sys.stderr)
        return 2
    p = cfg.parallel
    print(f"OK: {path}" + ("" if check_paths else " (input files not checked)"))
    print(f"  experts: {', '.join(cfg.experts.names)} ({cfg.experts.kind}); "
          f"tp={p.tp} pp={p.pp} ep={p.ep} dp={p.dp if p.dp is not None else 'from world size'}")
    return 0
