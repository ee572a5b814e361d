"""RunLayout, the one place a run's paths are spelled: the folders it gained for export, evaluation,
Slurm and the demo, one meaning of the eval folder for `trinityx eval` and the Slurm pipeline, and
CheckpointError where every room can raise it (errors.py)."""
from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from trinityx_ds import errors
from trinityx_ds.storage import layout
from trinityx_ds.storage.layout import CheckpointDir, RunLayout, SlurmDir, model_eval_dir


def test_the_folders_of_a_run():
    run = RunLayout("/r")
    assert run.expert_file("help") == Path("/r/stage1/help/expert.safetensors")
    assert run.checkpoints(1, "help").path == Path("/r/stage1/help/checkpoints")
    assert run.router_file == Path("/r/stage2/router.safetensors")
    assert run.checkpoints(2).path == Path("/r/stage2/checkpoints")
    assert run.metrics_file(1, "harm") == Path("/r/stage1/harm/metrics.jsonl")
    assert run.tensorboard_dir(2) == Path("/r/stage2/tensorboard")
    assert run.export_dir == Path("/r/hf")
    assert isinstance(run.slurm_dir, SlurmDir) and run.slurm_dir.path == Path("/r/slurm")
    assert run.slurm_dir.log_dir == Path("/r/slurm/logs") and SlurmDir("/x").log_dir == Path("/x/logs")
    assert Path(run.slurm_dir) == Path("/r/slurm")  # os.PathLike, as CheckpointDir
    demo = (run.imported_dir, run.parity_file, run.tiny_model_dir, run.eval_data_dir, run.heldout_dir,
            run.heldout_report_file)
    assert demo == tuple(Path("/r") / p for p in ("imported", "parity.json", "models/tiny-llama", "eval_data",
                                                   "hhh_heldout", "hhh_heldout.json"))


def test_eval_dir_is_the_folder_and_a_variant_its_sub_folder():
    run = RunLayout("/r")
    assert run.eval_dir() == Path("/r/eval")
    assert run.eval_dir("trinityx") == run.eval_dir() / "trinityx"
    assert run.eval_dir("expert:help") == run.eval_dir() / "expert-help"  # no colon in a path
    assert model_eval_dir("/models/SmolLM2", "expert:help") == Path("runs/eval/SmolLM2-expert-help")


def test_trinityx_eval_writes_where_the_layout_says(tmp_path):
    """Without --out, `trinityx eval` writes RunLayout.eval_dir(variant) of a run (the Slurm eval
    job passes no --out by default, so it lands there too), model_eval_dir for a plain model."""
    from trinityx_ds.eval.runner import default_out

    run = RunLayout(tmp_path / "run")
    run.stage_dir(2).mkdir(parents=True)
    assert default_out(argparse.Namespace(checkpoint=str(run.root), variant="expert:harm")) == \
        run.eval_dir("expert:harm")
    plain = tmp_path / "model"
    assert default_out(argparse.Namespace(checkpoint=str(plain), variant="backbone")) == \
        model_eval_dir(plain, "backbone")


def test_a_run_and_its_checkpoints():
    run = RunLayout("/r")
    assert not run.is_run()
    assert RunLayout.of_checkpoint("/r/stage2/checkpoints/step00000004", 2).root == Path("/r").resolve()
    assert RunLayout.of_checkpoint("/r/stage1/help/checkpoints/step00000004", 1).root == Path("/r").resolve()
    with pytest.raises(ValueError, match="name the expert"):
        run.stage_dir(1)


def test_checkpoint_error_lives_in_errors(tmp_path):
    """CheckpointError is errors.py's (below storage, so storage raises it too), a ValueError that
    every entry point reports in one line; storage/layout.py no longer defines it."""
    assert issubclass(errors.CheckpointError, ValueError)
    assert "CheckpointError" not in vars(layout) or layout.CheckpointError is errors.CheckpointError
    (tmp_path / CheckpointDir.LATEST).write_text("step00000001")
    with pytest.raises(errors.CheckpointError, match="names no complete checkpoint"):
        CheckpointDir.tag_of(tmp_path)
