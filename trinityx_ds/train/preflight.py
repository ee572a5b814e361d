"""What a training job checks before any worker starts (the local launcher `--nproc`, every rank
under torchrun/srun before its process group, `trinityx config validate`): every data row, the
stage's inputs (the experts stage 2 reads: readable, shaped as the config says) and the output
folder. Each problem is one line naming the file (and line, or tensor); the caller prints them and
exits 2, so a user's mistake never becomes a traceback per rank."""
from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import torch

from trinityx_ds.config.schema import PREFERENCE_OBJECTIVES
from trinityx_ds.data.dataset import split_tasks
from trinityx_ds.data.formats import DataError, read_pairs, read_source
from trinityx_ds.errors import CheckpointError
from trinityx_ds.model.assemble import open_expert
from trinityx_ds.model.mocae_spec import MoCaEConfig
from trinityx_ds.model.weights import open_source
from trinityx_ds.parallel import torch_compat
from trinityx_ds.storage.fingerprint import model_fingerprint
from trinityx_ds.storage.layout import RunLayout
from trinityx_ds.train.drift import input_drift, inputs_of
from trinityx_ds.train.lock import RunLock


def data_problems(cfg) -> list[str]:
    """Every data row read as training will read it (pairs too, for a dpo/simpo/cpo expert), then the
    held-out split by prompt: a held-out prompt that is also a training prompt is refused here, with
    both files and lines. Hub sources are left to the workers."""
    out, unsafe = [], getattr(cfg.data, "beavertails_unsafe", "refuse")
    pairs_for = tuple(n for n in cfg.experts.names if cfg.experts.objective_of(n) in PREFERENCE_OBJECTIVES)
    for task in cfg.experts.names:
        for src in [*cfg.data.tasks.get(task, []), *cfg.data.heldout.get(task, [])]:
            if src.path.startswith("hub:"):
                continue
            try:
                records, _ = read_source(src, task, cfg.data.on_malformed, unsafe, cfg.data.max_row_chars)
                if not records:  # found after launch before, once per rank and without the file's name
                    out.append(f"{src.path}: no usable example (expert {task}: an empty file, or every row skipped)")
                    continue
                if task in pairs_for:
                    read_pairs(src, task, cfg.data.on_malformed, unsafe, cfg.data.pairs_per_prompt,
                               cfg.data.max_row_chars)
            except DataError as e:
                out += e.problems
            except ValueError as e:
                out.append(f"{src.path}: {e}")
    hub = any(s.path.startswith("hub:") for srcs in [*cfg.data.tasks.values(), *cfg.data.heldout.values()]
              for s in srcs)
    if not out and not hub and all(n in cfg.data.tasks for n in cfg.experts.names):
        try:
            split_tasks(cfg.data, list(cfg.experts.names), cfg.seed, pairs_for=pairs_for)
        except DataError as e:
            out += e.problems
    return out


def expert_problems(cfg, arch, names: list[str], notes: list[str] | None = None) -> list[str]:
    """Stage 2's inputs: each expert's stage-1 file readable and holding exactly the tensors, of
    the shapes, that the run config asks for, in fp32 or the run's dtype, trained on this run's
    backbone (the file's metadata), and (the launcher, or rank 0: one reader is enough) finite.
    A file from before experts recorded their backbone is noted in `notes`."""
    layout, moe, out = RunLayout(cfg.output.dir), MoCaEConfig.from_run_config(cfg), []
    backbone = model_fingerprint(cfg.model.checkpoint or cfg.model.hf_path)
    for name in names:
        path = layout.expert_file(name)
        try:
            src = open_expert(path, arch, moe, name, dtype=cfg.model.dtype, backbone=backbone,
                              values=os.environ.get("RANK", "0") == "0")
        except CheckpointError as e:
            out.append(str(e))
            continue
        if notes is not None and "backbone" not in src.metadata():
            notes.append(f"{path}: written before expert files recorded their backbone: not checked against it")
    return out


def output_problems(cfg) -> list[str]:
    folder = Path(cfg.output.dir)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
    except OSError as e:
        return [f"output.dir: {folder} — cannot write there ({e.strerror or e})"]
    return []


def device_problems(cfg) -> list[str]:
    """The run's precision against the device it will train on: fp16 where the job runs on a CPU
    without fp16 units (AMD EPYC with AVX-512 and bf16, ...), which DeepSpeed's engine would
    refuse in a traceback per rank ("Type fp16 is not supported on your device")."""
    if cfg.model.dtype == "fp16" and not torch.cuda.is_available() and not torch_compat.mkldnn_fp16_supported():
        return ["model.dtype: 'fp16' — this CPU has no fp16 units (torch.ops.mkldnn._is_mkldnn_fp16_supported() "
                "is False) and DeepSpeed's CPU engine refuses fp16 here; use bf16 or fp32, or train on GPUs"]
    return []


def layout_problems(cfg) -> list[str]:
    """A layout config validate accepts (it is what `trinityx plan` models) but training does not run."""
    if cfg.parallel.pp > 1:
        return [f"parallel.pp: {cfg.parallel.pp} — training runs at PP=1 in this release (TP x EP x DP); "
                "`trinityx plan` models PP layouts"]
    return []


def _stage_folders(cfg, stage: str, only: str | None) -> list[tuple[int, str | None]]:
    names = [only] if only else list(cfg.experts.names)
    return [(1, n) for n in names if n in cfg.experts.names] if stage == "experts" else [(2, None)]


def resume_problems(cfg, stage: str, only: str | None = None, locks: bool = True, allow_data_change: bool = False,
                    notes: list[str] | None = None) -> list[str]:
    """What the job's stage folders say before any worker starts: another live job owns one (its
    lock; `locks`), or the newest checkpoint was trained data-parallel over another number of ranks
    than this launch gives (its saved data position cannot be split anew: TP, EP and ZeRO may
    change, DP may not). Needs the launch's world size (`parallel.dp` filled) for the second.

    `locks` only where no rank of this job can hold the lock yet: the `--nproc` launcher, or a job
    of one process. A rank of a multi-rank job must not look: its own rank 0 may already hold it
    (NCCL creates communicators lazily, so rank 0 can reach the lock before this rank is past its
    check), and rank 0 refuses a second job itself, in one line, when it takes the lock."""
    out, layout = [], RunLayout(cfg.output.dir)
    for st, expert in _stage_folders(cfg, stage, only):
        folder = layout.stage_dir(st, expert)
        owner = RunLock(folder).holder() if locks else None
        if owner is not None:
            out.append(RunLock.refusal(folder, owner))
            continue
        ckpt = layout.checkpoints(st, expert)
        latest = ckpt.latest()
        if latest is None:
            continue
        tag, state = ckpt.tag_dir(latest[0]), latest[1]
        saved = (state.get("data") or {}).get("world")
        if saved is not None and cfg.parallel.dp is not None and saved != cfg.parallel.dp:
            mp = cfg.parallel.tp * cfg.parallel.pp
            out.append(f"{tag}: resume refused: trained data-parallel over {saved} rank(s), this launch gives "
                       f"{cfg.parallel.dp} (world {cfg.parallel.world_size} / tp {cfg.parallel.tp} x pp "
                       f"{cfg.parallel.pp}); a run resumes at the same DP size (TP, EP and ZeRO may change): "
                       f"launch {saved * mp} processes, or train into another output.dir")
        changed = input_drift(state["inputs"], inputs_of(cfg, st, expert)) if state.get("inputs") else []
        if changed and allow_data_change:
            if notes is not None:
                notes += [f"{tag}: resuming anyway (--allow-data-change): {c}" for c in changed]
        elif changed:
            out.append(f"{tag}: resume refused: {'; '.join(changed)} — train on the inputs it was trained on, or "
                       "pass --allow-data-change to resume anyway")
    return out


def problems(cfg, stage: str, only: str | None = None, locks: bool = True, allow_data_change: bool = False,
             notes: list[str] | None = None) -> list[str]:
    """Everything `trinityx train <stage>` would fail on later, found now (`stage`: experts | router;
    `locks`, `allow_data_change`, `notes` (what is allowed but said): see resume_problems)."""
    out = layout_problems(cfg) + device_problems(cfg) + output_problems(cfg) + data_problems(cfg)
    if not out:  # the inputs read: their content can be compared with what a checkpoint recorded
        out += resume_problems(cfg, stage, only, locks, allow_data_change, notes)
    if stage == "router":
        arch, _ = open_source(cfg.model.checkpoint or cfg.model.hf_path)
        out += expert_problems(cfg, arch, list(cfg.experts.names), notes)
    elif only is not None and only not in cfg.experts.names:
        out.append(f"--only: {only!r} — one of {', '.join(cfg.experts.names)}")
    return out


REPORTED = 20  # problems printed in full; the rest are counted (a wrong format on a 20,000-row file)


def report(lines: list[str], command: str = "trinityx train") -> int:
    """Prints the problems once (rank 0 of a launched job; the process itself otherwise), the first
    REPORTED in full and then how many more there are; 2 if any."""
    if lines and os.environ.get("RANK", "0") == "0":
        for line in lines[:REPORTED]:
            print(f"{command}: {line}", file=sys.stderr)
        if len(lines) > REPORTED:
            print(f"{command}: ... and {len(lines) - REPORTED:,} more problems like these", file=sys.stderr)
    return 2 if lines else 0
