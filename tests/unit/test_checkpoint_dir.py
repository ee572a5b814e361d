"""Checkpoint discovery never loses a complete checkpoint: the newest tag that verifies against its
manifest is resumed whatever `latest` says, damaged tags are skipped by name and never deleted,
and `keep_last` deletes only verified tags older than the newest ones."""
import json

import pytest

from trinityx_ds.errors import CheckpointError
from trinityx_ds.storage.layout import CheckpointDir
from trinityx_ds.train.guard import DivergenceGuard


def _tag(ckpt: CheckpointDir, step: int, complete: bool = True, manifest: bool = True) -> str:
    tag = ckpt.tag_for(step)
    d = ckpt.tag_dir(tag)
    (d / "universal").mkdir(parents=True)
    (d / "mp_rank_00_model_states.pt").write_bytes(bytes(range(256)) * (step + 1))
    (d / "universal" / "model.safetensors.index.json").write_text("{}")
    (d / CheckpointDir.STATE).write_text(json.dumps({"step": step}))
    if manifest:
        ckpt.write_manifest(tag)
    if complete:
        ckpt.marker(tag).write_text("")
        ckpt.pointer().write_text(tag)
    return tag


@pytest.fixture
def ckpt(tmp_path):
    c = CheckpointDir(tmp_path / "checkpoints")
    c.path.mkdir()
    return c


def test_newest_verified_tag_is_chosen(ckpt):
    _tag(ckpt, 3)
    newest = _tag(ckpt, 6)
    assert ckpt.choose() == (newest, [])
    assert ckpt.latest() == (newest, {"step": 6})


def test_dangling_latest_falls_back_to_the_newest_complete_tag(ckpt):
    good = _tag(ckpt, 3)
    ckpt.pointer().write_text("step00000009")  # names a tag that does not exist
    tag, notes = ckpt.choose()
    assert tag == good
    assert len(notes) == 1 and "names step00000009 (no such folder); resuming from step00000003" in notes[0]


def test_missing_complete_marker_is_skipped_by_name(ckpt):
    good = _tag(ckpt, 3)
    _tag(ckpt, 6)
    ckpt.marker("step00000006").unlink()
    tag, notes = ckpt.choose()
    assert tag == good and "step00000006: skipped: no COMPLETE marker" in notes[0]


def test_truncated_or_changed_file_is_skipped_and_kept(ckpt):
    good = _tag(ckpt, 3)
    bad = _tag(ckpt, 6)
    states = ckpt.tag_dir(bad) / "mp_rank_00_model_states.pt"
    data = states.read_bytes()
    states.write_bytes(data[: len(data) // 2])
    tag, notes = ckpt.choose()
    assert tag == good and "step00000006: skipped: mp_rank_00_model_states.pt:" in notes[0] and "truncated" in notes[0]
    states.write_bytes(data[:-1] + b"\x00" if data[-1] else data[:-1] + b"\x01")  # same size, other bytes
    tag, notes = ckpt.choose()
    assert tag == good and "checksum differs" in notes[0]
    assert ckpt.prune(1) == [] and ckpt.tag_dir(bad).is_dir()  # the damaged tag is never deleted


def test_missing_file_and_unverifiable_pointer(ckpt):
    only = _tag(ckpt, 3)
    (ckpt.tag_dir(only) / "universal" / "model.safetensors.index.json").unlink()
    assert ckpt.choose()[0] is None
    with pytest.raises(CheckpointError, match="names no complete checkpoint"):
        CheckpointDir.tag_of(ckpt.path)


def test_tags_without_manifest_verify_by_their_marker(ckpt):
    old = _tag(ckpt, 3, manifest=False)  # written before manifests existed
    assert ckpt.choose() == (old, [])


def test_prune_keeps_the_newest_verified_and_everything_damaged(ckpt):
    for step in (3, 6, 9):
        _tag(ckpt, step)
    _tag(ckpt, 12, complete=False)  # an interrupted save
    assert ckpt.prune(2) == ["step00000003"]
    assert ckpt.tags() == ["step00000006", "step00000009", "step00000012"]


def test_divergence_guard():
    g = DivergenceGuard(True, 3, "train.stage1", skipped_now=0)
    assert g.problem(1, 2.5, 1.0, 0) is None
    assert g.problem(2, float("nan"), 1.0, 0) == "diverged: loss nan at step 2"
    assert "gradient norm inf at step 3" in g.problem(3, 2.5, float("inf"), 0)
    assert [g.problem(s, 2.5, None, s - 3) for s in (4, 5, 6)][-1].startswith("diverged: 3 optimizer steps skipped")
    assert DivergenceGuard(False, 0, "x", 0).problem(1, float("nan"), float("inf"), 5) is None
    h = DivergenceGuard(True, 3, "x", skipped_now=0)
    assert [h.problem(s, 1.0, 1.0, k) for s, k in ((1, 1), (2, 2), (3, 2), (4, 3), (5, 4))] == [None] * 5  # not in a row


def test_collapse_guard_stops_on_a_zero_gradient_norm_in_a_row():
    """Issue 28: `lr: 1e4` on the tiny recipe left the loss at ln(vocab) and the gradient norm at
    exactly 0.0 from step 3, and the run wrote its expert with exit 0. Five zero norms in a row now
    stop it; a zero broken by any other norm, or an unknown one (None), starts the count again."""
    g = DivergenceGuard(True, 0, "x", 0, collapse_steps=5)
    norms = [0.1, 2.5, 0.0, 0.0, 0.0, 0.0, 0.0]
    got = [g.problem(s, 6.909, n, 0) for s, n in enumerate(norms, 1)]
    assert got[:-1] == [None] * 6
    assert got[-1] == ("collapsed: gradient norm exactly 0 for 5 steps in a row up to step 7 (loss 6.909; "
                       "train.stop_on_collapse, train.collapse_steps: 5)")
    h = DivergenceGuard(True, 0, "x", 0, collapse_steps=3)
    assert [h.problem(s, 1.0, n, 0) for s, n in enumerate([0.0, 0.0, 1e-9, 0.0, 0.0, None, 0.0, 0.0], 1)] == [None] * 8
    assert all(DivergenceGuard(True, 0, "x", 0).problem(s, 1.0, 0.0, 0) is None for s in range(1, 20))  # off


def test_run_lock_refuses_a_second_owner_and_takes_over_from_a_dead_one(tmp_path):
    import multiprocessing
    import os

    from trinityx_ds.train.lock import FolderLocked, RunLock

    ctx = multiprocessing.get_context("fork")
    held, done = ctx.Event(), ctx.Event()

    def owner():
        RunLock(tmp_path).acquire()
        held.set()
        done.wait(30)
        os._exit(0)  # dies holding it: the kernel releases the flock

    child = ctx.Process(target=owner)
    child.start()
    assert held.wait(30)
    with pytest.raises(FolderLocked, match=rf"another training job owns this folder \(host \S+ pid {child.pid} since"):
        RunLock(tmp_path).acquire()
    done.set()
    child.join(30)
    lock = RunLock(tmp_path)
    note = lock.acquire()
    assert note is not None and f"pid {child.pid}" in note and "taken over" in note
    lock.release()
    assert RunLock(tmp_path).acquire() is None  # released cleanly: nothing to take over


def test_metrics_are_cut_back_to_the_step_a_run_resumes_from(tmp_path):
    """Issue 28: after a resume from step 2, the rows of steps 3-4 that the dead attempt had logged
    stayed, and the resumed run logged them again. Cut back, with a row torn by the crash."""
    import json

    from trinityx_ds.train.metrics import keep_until

    path = tmp_path / "metrics.jsonl"
    rows = [json.dumps({"step": s, "train/loss": 1.0 / s}) + "\n" for s in (1, 2, 3, 4)]
    path.write_text("".join(rows) + '{"step": 5, "tra')
    keep_until(path, 2)
    assert path.read_text() == "".join(rows[:2])
    keep_until(path, 9)
    assert path.read_text() == "".join(rows[:2])
    keep_until(tmp_path / "absent.jsonl", 3)
    assert not (tmp_path / "absent.jsonl").exists()

