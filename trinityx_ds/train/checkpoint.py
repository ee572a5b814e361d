"""Resumable checkpoints: DeepSpeed's own save/load, plus a `latest` pointer moved only after
every rank finished writing, so a crash in the middle of a save leaves the previous one usable.

Layout: CKPT_DIR/step00000012/ (DeepSpeed files, the layout-free `universal/` copy, our
`trinityx_state.json` and a `COMPLETE` marker), CKPT_DIR/latest (the tag, DeepSpeed's format, so
DeepSpeed's tools read it too). The state records the layout (tp, ep, dp, zero) that wrote the
checkpoint: a run resumed at that layout loads DeepSpeed's files, any other reads `universal/`.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import torch.distributed as dist

COMPLETE = "COMPLETE"
STATE = "trinityx_state.json"
FAULT_ENV = "TRINITYX_FAULT"  # fault injection for the resume tests: "<point>:<step>"


def fault(point: str, step: int) -> None:
    """SIGKILL this process at `point` of `step` when TRINITYX_FAULT asks for it (tests only):
    the real failure a resumed run must survive, not a simulated one."""
    if os.environ.get(FAULT_ENV) == f"{point}:{step}" and dist.get_rank() == 0:
        os.kill(os.getpid(), signal.SIGKILL)


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def latest_tag(ckpt_dir: str | Path) -> str | None:
    """The newest complete checkpoint's tag, or None."""
    pointer = Path(ckpt_dir) / "latest"
    if not pointer.is_file():
        return None
    tag = pointer.read_text().strip()
    return tag if (Path(ckpt_dir) / tag / COMPLETE).is_file() else None


def layout(dims, zero_stage: int) -> dict:
    """What DeepSpeed's files of a checkpoint depend on."""
    return {"tp": dims.tp, "ep": dims.ep, "dp": dims.dp, "zero": zero_stage}


def save(engine, ckpt_dir: str | Path, step: int, state: dict, keep_last: int, extra_files=None,
         universal=None) -> str:
    """Collective: every rank calls it. `state` (JSON) is the run's own position (data, step).

    `extra_files(tag_dir)` lets a caller write what lives outside the engine (per-rank files);
    `universal(tag_dir)` (collective) writes the layout-free copy. Both land before COMPLETE.
    """
    ckpt_dir, tag = Path(ckpt_dir), tag_for(step)
    # Frozen tensors (the backbone; frozen experts) never change: they are rebuilt from the run's
    # model source on resume, so a LoRA checkpoint of a 70B backbone stays megabytes, not 140 GB.
    engine.save_checkpoint(str(ckpt_dir), tag=tag, save_latest=False, exclude_frozen_parameters=True)
    if extra_files is not None:
        extra_files(ckpt_dir / tag)
    if universal is not None:
        universal(ckpt_dir / tag)
    fault("during_save", step)
    dist.barrier()
    if dist.get_rank() == 0:
        _atomic_write(ckpt_dir / tag / STATE, json.dumps(state, indent=2))
        _atomic_write(ckpt_dir / tag / COMPLETE, "")
        _atomic_write(ckpt_dir / "latest", tag)
        complete = sorted(p.name for p in ckpt_dir.iterdir() if p.is_dir() and (p / COMPLETE).is_file())
        for old in complete[:-keep_last]:
            shutil.rmtree(ckpt_dir / old, ignore_errors=True)
    dist.barrier()
    return tag


def latest(ckpt_dir: str | Path) -> tuple[str, dict] | None:
    """(tag, run state) of the newest complete checkpoint, or None."""
    tag = latest_tag(ckpt_dir)
    if tag is None:
        return None
    return tag, json.loads((Path(ckpt_dir) / tag / STATE).read_text())


def same_layout(state: dict, current: dict) -> bool:
    """Whether DeepSpeed's own files of the checkpoint fit this run (checkpoints that predate the
    layout record were written by the run that resumes them)."""
    return state.get("layout", current) == current


def load(engine, ckpt_dir: str | Path, tag: str) -> None:
    """Loads checkpoint `tag`, written at this run's layout, into `engine` with DeepSpeed."""
    load_path, _ = engine.load_checkpoint(str(ckpt_dir), tag=tag, load_module_strict=False)
    if load_path is None:
        raise RuntimeError(f"{Path(ckpt_dir) / tag}: DeepSpeed could not load this checkpoint")
