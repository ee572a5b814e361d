"""The real templates on a real two-node Slurm cluster (tools/slurm_lab): the expert array and
the dependent multi-node router job complete where the scripts say; a router job sent USR1
mid-training checkpoints, requeues itself and ends with the weights of an uninterrupted run; an
impossible job is refused at submission with a clear message."""
import re
import shutil
import time

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.slurm.lab import cli_commands
from trinityx_ds.storage.layout import RunLayout
from trinityx_ds.train.tiny_run import write_config

pytestmark = pytest.mark.slurm

# Long enough for a signal to land mid-run on any machine; checkpoints every 5 steps.
TRAIN = {"train.stage1": {"steps": 3}, "train.stage2": {"steps": 40, "grad_accum": 2},
         "train.checkpoint_every": 5}
SLURM = {"nodes": 2, "cpus_per_task": 1, "time": "00:10:00", "signal_seconds": 60}


def _job_ids(stdout: str) -> dict[str, str]:
    return dict(re.findall(r"^(\w+): job (\d+)", stdout, re.M))


def _slurm_yaml(root, **extra):
    path = root / "slurm.yaml"
    path.write_text(yaml.safe_dump({**SLURM, **extra}))
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from trinityx_ds.model.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("slurm_model") / "model")


def test_too_many_nodes_is_refused_at_submit(slurm_lab, tmp_path, model_dir):
    cfg = write_config(tmp_path, model_dir, **TRAIN)
    proc = slurm_lab.submit("--config", str(cfg), "--slurm", str(_slurm_yaml(tmp_path, nodes=3)),
                            "--jobs", "experts,router", cwd=tmp_path)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    err = proc.stderr.strip()
    assert len(err.splitlines()) == 1 and "router job (router.sbatch) refused by sbatch" in err, err
    assert "Node count specification invalid" in err, err
    held = re.search(r"cancelled the jobs already submitted \(experts (\d+)\)", err)
    assert held, err  # the held expert array never ran: nothing of a half-submitted chain is left
    assert {j["JobState"] for j in slurm_lab.jobs(held.group(1))} == {"CANCELLED"}


@pytest.fixture(scope="module")
def pipeline(slurm_lab, tmp_path_factory, model_dir):
    """The whole chain as submitted: experts (array of 3), the router on both nodes (torchrun
    launcher), then export (and eval, once the CLI has it) after the router."""
    root = tmp_path_factory.mktemp("pipeline")
    cfg = write_config(root, model_dir, **TRAIN)
    jobs = ["experts", "router", "export"] + (["eval"] if "eval" in cli_commands() else [])
    proc = slurm_lab.submit("--config", str(cfg), "--slurm", str(_slurm_yaml(root, eval_args=["--limit", "4"])),
                            "--jobs", ",".join(jobs), cwd=root)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    ids = _job_ids(proc.stdout)
    assert list(ids) == jobs, proc.stdout
    logs = RunLayout(root / "out").slurm_dir.log_dir
    states = {job: slurm_lab.wait(ids[job], timeout=300, logs=logs) for job in reversed(jobs)}
    return {"root": root, "ids": ids, "logs": logs, "stdout": proc.stdout, "states": states}


def test_whole_chain_with_router_across_both_nodes(pipeline):
    ids, logs, states = pipeline["ids"], pipeline["logs"], pipeline["states"]
    run = RunLayout(pipeline["root"] / "out")
    assert f"router: job {ids['router']} (afterok {ids['experts']})" in pipeline["stdout"]
    assert f"export: job {ids['export']} (afterok {ids['router']})" in pipeline["stdout"]
    assert [j["JobState"] for j in states.pop("experts")] == ["COMPLETED"] * 3
    assert {job: s[0]["JobState"] for job, s in states.items()} == dict.fromkeys(states, "COMPLETED")
    assert (run.export_dir / "model.safetensors.index.json").is_file()  # export-hf RUN_DIR OUT
    if "eval" in ids:  # no --out: where `trinityx eval` writes the run's default variant
        assert (run.eval_dir("trinityx") / "report.json").is_file()
    for name in ("help", "harm", "honest"):
        assert run.expert_file(name).is_file(), name
    assert run.router_file.is_file()
    for task in range(3):  # one log per array task, where submit said
        assert "finished:" in (logs / f"test-experts-{ids['experts']}_{task}.out").read_text()
    router_log = (logs / f"test-router-{ids['router']}.out").read_text()
    hosts = dict(re.findall(r"^task (\d+)/2 on (\S+)$", router_log, re.M))
    assert hosts == {"0": "node1", "1": "node2"}, router_log  # one torchrun agent per node


def test_preempted_router_requeues_and_matches_uninterrupted(slurm_lab, pipeline, tmp_path, model_dir):
    cfg = write_config(tmp_path, model_dir, **TRAIN)  # the same run, its own output folder
    done, run = RunLayout(pipeline["root"] / "out"), RunLayout(tmp_path / "out")
    for name in ("help", "harm", "honest"):
        shutil.copytree(done.stage_dir(1, name), run.stage_dir(1, name))
    proc = slurm_lab.submit("--config", str(cfg), "--slurm", str(_slurm_yaml(tmp_path)), "--jobs", "router",
                            "--launcher", "srun", cwd=tmp_path)  # one task per rank (env://) this time
    assert proc.returncode == 0, proc.stdout + proc.stderr
    job, logs = _job_ids(proc.stdout)["router"], run.slurm_dir.log_dir
    metrics = run.metrics_file(2)
    deadline = time.time() + 180
    while not (metrics.is_file() and metrics.read_text().strip()):  # training has started
        assert time.time() < deadline, f"router job {job} never started training"
        time.sleep(0.1)
    # what --signal=USR1@N sends near the time limit: USR1 to every process of the job's steps
    slurm_lab.run("scancel", "--signal=USR1", job, tries=5)
    final = slurm_lab.wait(job, timeout=240, logs=logs)
    log = (logs / f"test-router-{job}.out").read_text()
    assert final[0]["JobState"] == "COMPLETED" and final[0]["Restarts"] == "1", (final, log)
    assert re.search(r"preempted at step0000\d{4}: requeueing job", log), log
    assert "resumed from" in log and "restart 1" in log, log
    finished, resumed = load_file(done.router_file), load_file(run.router_file)
    assert finished.keys() == resumed.keys() and finished
    for name in finished:
        assert torch.equal(finished[name], resumed[name]), name
