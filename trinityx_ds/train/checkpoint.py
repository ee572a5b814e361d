"""Resumable checkpoints: DeepSpeed's own save/load, plus a `latest` pointer moved only after
every rank finished writing, so a crash in the middle of a save leaves the previous one usable.

What a tag holds and where is storage/layout.py's `CheckpointDir`: DeepSpeed's files, the
layout-free `universal/` copy, our run state and a `COMPLETE` marker; `latest` names the tag in
DeepSpeed's format, so DeepSpeed's tools read it too. A run resumes from the newest tag that
verifies against its manifest (CheckpointDir.choose), whatever `latest` says, and `keep_last`
deletes only verified tags older than the newest ones. The state records the layout (tp, ep, dp,
zero) that wrote the checkpoint: a run resumed at that layout loads DeepSpeed's files, any other
reads `universal/`.
"""
from __future__ import annotations

import errno
import json
import os
import signal
from pathlib import Path

import torch.distributed as dist

from trinityx_ds.errors import StorageError
from trinityx_ds.storage import atomic
from trinityx_ds.storage.layout import CheckpointDir

FAULT_ENV = "TRINITYX_FAULT"  # fault injection for the resume tests: "<point>:<step>"


def fault(point: str, step: int) -> None:
    """SIGKILL this process at `point` of `step` when TRINITYX_FAULT asks for it (tests only):
    the real failure a resumed run must survive, not a simulated one."""
    if os.environ.get(FAULT_ENV) == f"{point}:{step}" and dist.get_rank() == 0:
        os.kill(os.getpid(), signal.SIGKILL)


def nospace(step: int, where: Path) -> None:
    """TRINITYX_FAULT=nospace_during_save:<step> (tests only): every rank's checkpoint write of
    `step` fails as a full disk fails it (OSError ENOSPC on its file)."""
    if os.environ.get(FAULT_ENV) == f"nospace_during_save:{step}":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(where / f"rank{dist.get_rank()}.pt"))


def layout(dims, zero_stage: int) -> dict:
    """What DeepSpeed's files of a checkpoint depend on."""
    return {"tp": dims.tp, "ep": dims.ep, "dp": dims.dp, "zero": zero_stage}


def same_layout(state: dict, current: dict) -> bool:
    """Whether DeepSpeed's own files of the checkpoint fit this run (checkpoints that predate the
    layout record were written by the run that resumes them)."""
    return state.get("layout", current) == current


def save(engine, ckpt: CheckpointDir, step: int, state: dict, keep_last: int, write_more=None) -> str:
    """Collective: every rank calls it. `state` (JSON) is the run's own position (data, step). A
    write that fails (a full disk: 123 lines of traceback per rank, the cause at line 45, before)
    is a StorageError naming the path and the cause; the tag stays incomplete, so a resume skips it.

    `write_more(tag)` (collective) writes what lives outside the engine (per-rank files, the
    layout-free copy, the run config); it lands before COMPLETE.
    """
    tag = ckpt.tag_for(step)
    try:
        return _save(engine, ckpt, tag, step, state, keep_last, write_more)
    except StorageError:
        raise
    except OSError as e:
        failed = StorageError(f"{e.filename or ckpt.tag_dir(tag)}: cannot write checkpoint {tag}: "
                              f"{e.strerror or e} — make room (or fix the folder) and start the run again: it resumes "
                              "from its last complete checkpoint")
        failed.errno = e.errno
        raise failed from None


def _save(engine, ckpt: CheckpointDir, tag: str, step: int, state: dict, keep_last: int, write_more) -> str:
    nospace(step, ckpt.tag_dir(tag))
    if dist.get_rank() == 0:  # a tag written again (after a damaged or interrupted save) is not complete until
        for stale in (ckpt.marker(tag), ckpt.manifest_file(tag)):  # it is rewritten whole
            stale.unlink(missing_ok=True)
    dist.barrier()
    # Frozen tensors (the backbone; frozen experts) never change: they are rebuilt from the run's
    # model source on resume, so a LoRA checkpoint of a 70B backbone stays megabytes, not 140 GB.
    engine.save_checkpoint(str(ckpt.path), tag=tag, save_latest=False, exclude_frozen_parameters=True)
    if write_more is not None:
        write_more(tag)
    fault("during_save", step)
    dist.barrier()
    if dist.get_rank() == 0:  # every rank's files are there: record them, then mark the tag complete
        atomic.write_text(ckpt.state_file(tag), json.dumps(state, indent=2))
        ckpt.write_manifest(tag)
        atomic.write_text(ckpt.marker(tag), "")
        atomic.write_text(ckpt.pointer(), tag)
        ckpt.prune(keep_last)
    dist.barrier()
    return tag


def load(engine, ckpt: CheckpointDir, tag: str) -> None:
    """Loads checkpoint `tag`, written at this run's layout, into `engine` with DeepSpeed."""
    load_path, _ = engine.load_checkpoint(str(ckpt.path), tag=tag, load_module_strict=False)
    if load_path is None:
        raise RuntimeError(f"{ckpt.tag_dir(tag)}: DeepSpeed could not load this checkpoint")
