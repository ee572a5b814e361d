"""Rendering the sbatch templates (no cluster needed): resources, both launch modes, CPU
fallback, commented-out empty settings, valid bash, and early refusal of bad settings."""
import os
import subprocess
from pathlib import Path

import pytest

from trinityx_ds.launch.slurm import JOBS, load_slurm_config, render, render_text
from trinityx_ds.storage.layout import RunLayout, SlurmDir
from trinityx_ds.train.tiny_run import write_config


@pytest.fixture(scope="module")
def run_config(tmp_path_factory):
    return write_config(tmp_path_factory.mktemp("render"), parallel={"tp": 2})


def test_empty_settings_are_commented_out_and_lines_dropped():
    text = "#SBATCH --partition={{P}}\n#SBATCH --nodes={{N}}\n{{EXTRA}}\nX={{Q|q}}\n"
    assert render_text(text, {"P": "", "N": "2", "EXTRA": "", "Q": "a b"}) == \
        "##SBATCH --partition=\n#SBATCH --nodes=2\nX='a b'\n"
    with pytest.raises(ValueError, match="N not set"):
        render_text("{{N}}", {})


def test_gpu_cluster_render(run_config, tmp_path):
    slurm = load_slurm_config(None, nodes=4, gpus_per_node=8, cpus_per_task=64, partition="gpu", account="proj",
                              time="2-00:00:00", container_image="nvcr.io#nvidia/pytorch:24.05-py3",
                              sbatch_args=["--exclusive"], env={"NCCL_DEBUG": "WARN"})
    out = render(run_config, slurm, tmp_path / "r")
    assert set(out.scripts) == set(JOBS)
    router = out.scripts["router"].read_text()
    for line in ("#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=1", "#SBATCH --gres=gpu:8",
                 "#SBATCH --partition=gpu", "#SBATCH --account=proj", "#SBATCH --time=2-00:00:00",
                 "#SBATCH --signal=USR1@300", "#SBATCH --requeue", "#SBATCH --exclusive", "##SBATCH --qos="):
        assert line + "\n" in router, line
    experts = out.scripts["experts"].read_text()
    assert "#SBATCH --array=0-2\n" in experts and "%x-%A_%a.out" in experts and "EXPERTS=(help harm honest)" in experts
    launch = (out.dir / "launch.sh").read_text()
    assert "PROCS_PER_NODE=8" in launch and "export NCCL_DEBUG=WARN" in launch
    assert "CONTAINER_IMAGE='nvcr.io#nvidia/pytorch:24.05-py3'" in launch
    evaluation = out.scripts["eval"].read_text()  # sized to the run's TP (2 here), not one GPU
    assert "#SBATCH --gres=gpu:2\n" in evaluation and "#SBATCH --ntasks=2\n" in evaluation
    assert "run_tasks 2 trinityx_ds.cli eval" in evaluation
    for path in [out.dir / "launch.sh", out.dir / "submit.sh", *out.scripts.values()]:
        assert subprocess.run(["bash", "-n", str(path)]).returncode == 0, path
        assert "{{" not in path.read_text(), path


def test_cpu_render_with_srun_launcher(run_config, tmp_path):
    slurm = load_slurm_config(None, nodes=2, procs_per_node=2, launcher="srun", python="/opt/venv/bin/python")
    out = render(run_config, slurm, tmp_path / "r")
    router = out.scripts["router"].read_text()
    assert "#SBATCH --ntasks-per-node=2\n" in router and "##SBATCH --gres=gpu:\n" in router
    launch = (out.dir / "launch.sh").read_text()
    assert "PY=/opt/venv/bin/python" in launch and "LAUNCHER=srun" in launch
    assert "DS_ACCELERATOR=cpu CUDA_VISIBLE_DEVICES=''" in launch  # CPU nodes: DeepSpeed's CPU accelerator, gloo


def test_bad_settings_fail_before_anything_is_written(run_config, tmp_path):
    path = tmp_path / "slurm.yaml"
    path.write_text("nodes: 2\ngpus: 8\n")
    with pytest.raises(ValueError, match="unknown Slurm setting.*gpus"):
        load_slurm_config(str(path))
    with pytest.raises(ValueError, match="slurm.nodes: 0"):
        load_slurm_config(None, nodes=0)
    path.write_text("nodes: two\nsbatch_args: --exclusive\n")
    with pytest.raises(ValueError, match="slurm.nodes: 'two' — an int >= 1; slurm.sbatch_args"):
        load_slurm_config(str(path))
    tp4 = write_config(tmp_path / "tp4", run_config.parent / "model", **{"parallel.tp": 4})
    with pytest.raises(ValueError, match="does not divide world size"):  # 1 process per expert task
        render(tp4, load_slurm_config(None, nodes=2), tmp_path / "r")
    assert not (tmp_path / "r").exists()


def test_gpu_job_on_a_node_without_gpus_stops_with_one_line(run_config, tmp_path):
    """A job that asked for GPUs but lands where neither nvidia-smi nor torch sees one stops
    (exit 1, one line) instead of training on CPU without a word (GPU_READINESS finding 11:
    b86774b exported the CPU environment there); a CPU job gets the CPU environment; a GPU job at
    TP > 1 sets CUDA_DEVICE_MAX_CONNECTIONS=1 (finding 18) and srun gets --cpus-per-task (20)."""
    import sys

    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "scontrol").write_text("#!/bin/sh\necho node1\n")
    (fake_bin / "scontrol").chmod(0o755)
    env = {"PATH": f"{fake_bin}:/usr/bin:/bin", "SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "node1",
           "SLURM_CPUS_PER_TASK": "16", "CUDA_VISIBLE_DEVICES": ""}
    probe = 'echo "CPU=${DS_ACCELERATOR:-} CONN=${CUDA_DEVICE_MAX_CONNECTIONS:-} SRUN=${SRUN_CPUS_PER_TASK:-}"'
    for gpus, want_rc in ((8, 1), (0, 0)):
        out = render(run_config, load_slurm_config(None, gpus_per_node=gpus, procs_per_node=2,
                                                   python=sys.executable), tmp_path / f"g{gpus}")
        proc = subprocess.run(["bash", "-c", f"source {out.dir / 'launch.sh'} && {probe}"], env=env,
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == want_rc, proc.stderr
        if gpus:
            lines = proc.stderr.strip().splitlines()
            assert len(lines) == 1 and "asked for 8 GPU(s) per node" in lines[0], proc.stderr
            assert "stopping instead of running on CPU" in lines[0]
        else:
            assert "CPU=cpu CONN=1 SRUN=16" in proc.stdout, proc.stdout  # CONN: CPU_ENV's, megatron's advice silenced
    launch = (tmp_path / "g8" / "launch.sh").read_text()
    assert '[ "2" -gt 1 ] && export CUDA_DEVICE_MAX_CONNECTIONS=1' in launch


def test_run_paths_are_rendered_from_the_run_layout(run_config, tmp_path):
    """The templates spell no path of the run (tests/unit/test_layout_spellings.py): render fills
    them in from RunLayout, each expert's as a bash array that the array task indexes like EXPERTS.
    The eval job passes --out only when the settings name eval_dir: otherwise its report lands
    where `trinityx eval` puts it from the command line, RunLayout.eval_dir(variant)."""
    import yaml

    run = RunLayout(Path(yaml.safe_load(run_config.read_text())["output"]["dir"]).resolve())
    out = render(run_config, load_slurm_config(None, procs_per_node=2, export_dir=str(tmp_path / "x")), tmp_path / "r")
    arrays = "\n".join(line for line in out.scripts["experts"].read_text().splitlines()
                       if line.startswith(("EXPERTS=", "EXPERT_FILES=", "EXPERT_CHECKPOINTS=")))
    for task, name in enumerate(("help", "harm", "honest")):
        probe = f'{arrays}\necho "${{EXPERTS[{task}]}}|${{EXPERT_FILES[{task}]}}|${{EXPERT_CHECKPOINTS[{task}]}}"'
        shown = subprocess.run(["bash", "-c", probe], check=False, capture_output=True, text=True).stdout.strip()
        assert shown == f"{name}|{run.expert_file(name)}|{run.checkpoints(1, name).path}", shown
    router = out.scripts["router"].read_text()
    assert f"ROUTER_FILE={run.router_file} " in router and f"ROUTER_CHECKPOINTS={run.checkpoints(2).path}" in router
    assert f"EXPORT_DIR={tmp_path / 'x'}\n" in out.scripts["export"].read_text()
    assert "EVAL_OUT=()\n" in out.scripts["eval"].read_text()
    assert out.log_dir == SlurmDir(tmp_path / "r").log_dir
    out = render(run_config, load_slurm_config(None, procs_per_node=2, eval_dir=str(tmp_path / "reports")), None)
    assert out.dir == run.slurm_dir.path and out.log_dir == run.slurm_dir.log_dir
    assert f"EXPORT_DIR={run.export_dir}\n" in out.scripts["export"].read_text()
    assert f"EVAL_OUT=(--out {tmp_path / 'reports'})\n" in out.scripts["eval"].read_text()


def test_log_dir_on_a_fresh_run_and_paths_with_spaces(run_config, tmp_path):
    """Issue 28: `trinityx slurm render --log-dir DIR` failed on every fresh run (its render folder was
    never made) and the #SBATCH paths were unquoted: a log folder with a space split the option.
    sbatch reads a double-quoted #SBATCH value as one word."""
    logs = tmp_path / "my logs"
    out = render(run_config, load_slurm_config(None, procs_per_node=2, log_dir=str(logs)),
                 tmp_path / "fresh" / "slurm")
    assert logs.is_dir() and out.log_dir == logs.resolve()
    for script in out.scripts.values():
        text = script.read_text()
        assert f'#SBATCH --output="{logs.resolve()}/' in text and f'#SBATCH --error="{logs.resolve()}/' in text
        assert f'#SBATCH --chdir="{os.getcwd()}"' in text
    with pytest.raises(ValueError, match=r'^--log-dir: .* — a path without double quotes or newlines$'):
        render(run_config, load_slurm_config(None, procs_per_node=2, log_dir=str(tmp_path / 'say "hi"')), tmp_path / "r2")
