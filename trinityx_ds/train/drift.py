"""Config drift on resume: a checkpoint keeps the config it was trained with (TAG/config.yaml); a
run resumed from it compares the two field by field. A change that alters what the saved tensors
mean or the order the data comes in is refused in one line naming the key, the old and the new
value; any other change (steps, the learning-rate schedule, logging, checkpoint cadence, the
parallel layout, which the universal copy carries over) is allowed and reported.

The config names the data and the backbone; what they hold is compared by content: each
checkpoint records the stage's inputs (`inputs_of`: every data file's size and SHA-256, the
backbone's sampled fingerprint, storage/fingerprint.py), and a resume whose inputs changed is
refused before launch (train/preflight.resume_problems) unless the user says
`--allow-data-change`, which reports the change instead. Checkpoints written before they recorded
their inputs resume as before."""
from __future__ import annotations

from pathlib import Path

from trinityx_ds.config import config_to_dict, load_config
from trinityx_ds.storage.fingerprint import file_digest, model_fingerprint

# prefixes of the dotted keys a resume may not change; {stage} is the resumed stage's section
REFUSED = ("seed", "experts.", "router.normalize_output", "router.temperature_mode", "model.dtype", "data.",
           "train.train_experts_in_stage2", "train.{stage}.micro_batch", "train.{stage}.grad_accum")
IGNORED = ("model.hf_path", "model.checkpoint", "model.tokenizer", "output.", "parallel.world_size", "parallel.dp")


def _leaves(node, prefix: str = "") -> dict:
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            out.update(_leaves(v, f"{prefix}{k}."))
        return out
    if isinstance(node, list) and node and all(isinstance(v, dict) for v in node):
        out = {}
        for i, v in enumerate(node):
            out.update(_leaves(v, f"{prefix[:-1]}[{i}]."))
        return out
    key = prefix[:-1]
    return {key: Path(node).name if key.endswith(".path") and isinstance(node, str) else node}  # runs move


def config_drift(saved, current, stage: int) -> tuple[list[str], list[str]]:
    """(refused, allowed) changes from the `saved` run config to the `current` one, one line each."""
    old, new = _leaves(config_to_dict(saved)), _leaves(config_to_dict(current))
    refused_prefixes = tuple(p.format(stage=f"stage{stage}") for p in REFUSED)
    refused, allowed = [], []
    for key in sorted(old.keys() | new.keys()):
        if key.startswith(IGNORED) or old.get(key) == new.get(key):
            continue
        line = f"{key} was {old.get(key)!r}, now {new.get(key)!r}"
        (refused if key.startswith(refused_prefixes) else allowed).append(line)
    return refused, allowed


def check_resume(saved_file: Path, current, stage: int) -> list[str]:
    """Raises ValueError (one line) when resuming from the checkpoint whose config is `saved_file`
    would change what it means; returns the allowed changes. Checkpoints without a config pass."""
    if not saved_file.is_file():
        return []
    refused, allowed = config_drift(load_config(str(saved_file), check_paths=False), current, stage)
    if refused:
        raise ValueError(f"{saved_file}: resume refused: {'; '.join(refused)} — this changes what the saved "
                         "checkpoint means; put it back, or train into a new output.dir")
    return allowed


def inputs_of(cfg, stage: int, expert: str | None = None) -> dict:
    """What stage `stage` (expert `expert` in stage 1) reads, by content: {"data": {"data.tasks.help[0]":
    {"path", "bytes", "sha256"}, ...}, "backbone": fingerprint}. Stage 1 reads its own task's
    training and held-out sources, stage 2 every task's. A hub source is recorded by name."""
    tasks = [expert] if stage == 1 else list(cfg.experts.names)
    data = {}
    for kind in ("tasks", "heldout"):
        for task in tasks:
            for i, src in enumerate(getattr(cfg.data, kind).get(task, [])):
                local = not src.path.startswith("hub:")
                data[f"data.{kind}.{task}[{i}]"] = {"path": src.path, **(file_digest(src.path) if local else {})}
    return {"data": data, "backbone": model_fingerprint(cfg.model.checkpoint or cfg.model.hf_path)}


def input_drift(saved: dict, now: dict) -> list[str]:
    """One line per input whose content differs between a checkpoint's record and this run."""
    out = []
    for key, was in saved.get("data", {}).items():
        cur = now["data"].get(key)
        if cur is None or "sha256" not in was:  # a source gone or renamed: config_drift's to say
            continue
        if (cur.get("bytes"), cur.get("sha256")) != (was["bytes"], was["sha256"]):
            out.append(f"{key} ({cur['path']}): its content changed since the checkpoint ({was['bytes']:,} bytes, "
                       f"sha256 {was['sha256'][:12]}; now {cur.get('bytes', 0):,} bytes, sha256 "
                       f"{cur.get('sha256', '-')[:12]})")
    if saved.get("backbone") not in (None, now["backbone"]):
        out.append(f"the backbone's weights differ from the checkpoint's (fingerprint {saved['backbone'][:12]}, "
                   f"now {now['backbone'][:12]})")
    return out
