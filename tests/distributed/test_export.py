"""HF export of models built and trained at TP/EP: the exported folder, loaded by transformers in a
fresh process (registered via trinityx_ds, or trust_remote_code without it), computes the
training model's logits for routed, dense and single-expert routing."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests import dist
from tests.dist import ROOT
from trinityx_ds.convert.write import export_hf
from trinityx_ds.model.tiny import make_tiny_model
from trinityx_ds.storage.sources import SafetensorsSource

WORKER = Path(__file__).parent / "workers" / "export_worker.py"
pytestmark = pytest.mark.distributed
TOL = 1e-4  # fp32


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return str(make_tiny_model(tmp_path_factory.mktemp("export") / "tiny"))


def hf_eval(folder: Path, ref: Path, cwd: Path, **opt) -> dict:
    """The folder loaded in a fresh process, offline; PYTHONPATH is cleared for `remote`, so
    nothing of this repository is on the path beyond the installed package."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(cwd / "hf_modules"),
           "PYTHONPATH": "" if opt.get("remote") else str(ROOT)}
    proc = subprocess.run([sys.executable, str(WORKER), "hf", str(folder), str(ref), json.dumps(opt)],
                          capture_output=True, text=True, env=env, cwd=cwd, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(proc.stdout.split("RESULT ", 1)[1])


def check_trinityx(res: dict, remote: bool) -> None:
    assert res["class"] == "TrinityXForCausalLM" and res["generated"] == 4
    assert res["trinityx_ds_imported"] is not remote
    for case in ("routed", "dense", "forced"):
        assert res[case] <= TOL, (case, res)


def test_full_experts_tp2_ep2_export(run_dist, tiny, tmp_path):
    run = tmp_path / "run"
    opts = {"kind": "full", "tp": 2, "ep": 2, "experts": 4, "top_k": 1, "norm": True, "force": 2}
    info = run_dist(WORKER, 4, "build", tiny, str(run), json.dumps(opts), timeout=240)
    assert info["n_tensors"] == 2 * (4 * 3 + 3 + 1)  # per layer: 4 experts x 3 FFN, router x 3, post-norm
    out = export_hf(run, tmp_path / "hf", max_shard_bytes=300_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 3
    assert sum(".mlp.experts." in k for k in index["weight_map"]) == 2 * 4 * 3
    ref = run / "reference.pt"
    check_trinityx(hf_eval(out, ref, tmp_path), remote=False)
    check_trinityx(hf_eval(out, ref, tmp_path, remote=True), remote=True)


def test_lora_tp2_export_and_dense(run_dist, tiny, tmp_path):
    run = tmp_path / "run"
    opts = {"kind": "lora", "tp": 2, "experts": 3, "top_k": 2, "importance": [1.0, 2.0, 0.5], "force": 1}
    run_dist(WORKER, 2, "build", tiny, str(run), json.dumps(opts))
    ref = run / "reference.pt"
    check_trinityx(hf_eval(export_hf(run, tmp_path / "hf"), ref, tmp_path), remote=False)
    dense = export_hf(run, tmp_path / "dense", fmt="dense", expert="e1")
    res = hf_eval(dense, ref, tmp_path, dense_of="e1", remote=True)
    assert res["class"] == "LlamaForCausalLM" and res["forced"] <= TOL, res


def test_trained_run_export_end_to_end(run_dist, tiny, tmp_path):
    """`trinityx train router` (ZeRO-3, 2 processes) on the tiny recipe, exported from its output dir."""
    from trinityx_ds.train.tiny_run import write_config, write_random_experts

    cfg = write_config(tmp_path / "train", Path(tiny), **{"router": {"top_k": 2, "normalize_output": True},
                                                          "train.stage2": {"steps": 3, "micro_batch": 2}})
    write_random_experts(cfg)
    run_dist(Path(__file__).parent / "workers" / "train_worker.py", 2, "cli", str(cfg), "router", timeout=240)
    run = tmp_path / "train" / "out"
    run_dist(WORKER, 2, "rebuild", str(run))
    out = export_hf(run, tmp_path / "hf")
    check_trinityx(hf_eval(out, run / "reference.pt", tmp_path), remote=False)
    card = (out / "README.md").read_text()
    assert "help, harm, honest" in card and "## Calibration" in card and "ECE" in card


def _train_stage2(root: Path, tiny: str, steps: int) -> Path:
    """Stage 2 at TP=2 x EP=2 (4 processes, DP=2), ZeRO-3, four `full` experts trained with the
    router (SGD), a checkpoint every 2 steps; writes reference.pt from the live training model.
    warmup_steps 1 makes the first two steps' learning rates independent of `steps`."""
    from trinityx_ds.train.tiny_run import FOUR_FULL_EXPERTS, write_config, write_random_experts

    cfg = write_config(root, Path(tiny), **FOUR_FULL_EXPERTS, **{
        "parallel": {"tp": 2, "ep": 2, "zero_stage": 3}, "router": {"top_k": 1, "normalize_output": True},
        "output": {"tensorboard": False},
        "train.stage2": {"steps": steps, "warmup_steps": 1, "lr": 0.5, "optimizer": "sgd", "grad_clip": 0.0,
                         "micro_batch": 2},
        "train.checkpoint_every": 2, "train.keep_last": 3})
    write_random_experts(cfg)
    dist.run_dist(WORKER, 4, "train", str(cfg), "2", timeout=300)
    return root / "out"


@pytest.fixture(scope="module")
def trained_4_experts(tiny, tmp_path_factory):
    return _train_stage2(tmp_path_factory.mktemp("ckpt"), tiny, steps=4)


def test_zero3_tp2_ep2_checkpoint_exports_the_live_model(trained_4_experts, tmp_path):
    """export-hf of a training checkpoint (the run's checkpoints/ folder: its latest tag), not of
    the stage outputs: transformers computes the live training model's logits; every expert
    tensor of the checkpoint is in the export, unchanged."""
    from safetensors.torch import load_file

    run = trained_4_experts
    out = export_hf(run / "stage2" / "checkpoints", tmp_path / "hf", max_shard_bytes=300_000)
    copy = SafetensorsSource(run / "stage2" / "checkpoints" / "step00000004" / "universal")
    held = {k for k in copy.keys() if ".mlp.experts." in k and not k.startswith("optimizer.")}
    exported = SafetensorsSource(out)
    assert len(held) == 2 * 4 * 3 and {k for k in exported.keys() if ".mlp.experts." in k} == held
    assert all(torch.equal(exported.read(k), copy.read(k)) for k in held)
    # the trained experts moved away from their stage-1 files (which export from outputs used to read)
    stage1 = load_file(run / "stage1" / "instruct" / "expert.safetensors")
    assert all(not torch.equal(stage1[k], exported.read(k)) for k in stage1)
    check_trinityx(hf_eval(out, run / "reference.pt", tmp_path), remote=False)
    check_trinityx(hf_eval(out, run / "reference.pt", tmp_path, remote=True), remote=True)


def test_mid_run_checkpoint_exports_as_the_stage_outputs_of_its_step(trained_4_experts, tiny, tmp_path):
    """The step-2 tag of the 4-step run equals, tensor for tensor, the stage outputs of the same
    run stopped at step 2 (identical first two steps), exported from its output dir."""
    short = _train_stage2(tmp_path / "short", tiny, steps=2)
    mid = export_hf(trained_4_experts / "stage2" / "checkpoints" / "step00000002", tmp_path / "mid")
    outputs = export_hf(short, tmp_path / "outputs")
    a, b = SafetensorsSource(mid), SafetensorsSource(outputs)
    assert sorted(a.keys()) == sorted(b.keys()) and sum(".mlp.experts." in k for k in a.keys()) == 2 * 4 * 3
    assert all(torch.equal(a.read(k), b.read(k)) for k in a.keys())
    final = SafetensorsSource(trained_4_experts / "stage2" / "checkpoints" / "step00000004" / "universal")
    assert not torch.equal(final.read("model.layers.0.mlp.router.weight"), a.read("model.layers.0.mlp.router.weight"))


def test_stage1_tp2_checkpoint_exports_its_expert(tiny, tmp_path):
    """A stage-1 checkpoint at TP=2, ZeRO-1 (one DeepSpeed zero_to_fp32 refuses): its tag exports
    as the one-expert model stage 1 trains, holding the expert stage 1 wrote, bit for bit."""
    from safetensors.torch import load_file

    from trinityx_ds.train.tiny_run import write_config

    cfg = write_config(tmp_path / "s1", Path(tiny), **{"parallel": {"tp": 2, "zero_stage": 1},
                                                      "train.stage1": {"steps": 2, "micro_batch": 2}})
    dist.run_dist(Path(__file__).parent / "workers" / "train_worker.py", 2, "cli", str(cfg), "experts --only help")
    stage1 = tmp_path / "s1" / "out" / "stage1" / "help"
    out = export_hf(stage1 / "checkpoints", tmp_path / "hf")
    expert, exported = load_file(stage1 / "expert.safetensors"), SafetensorsSource(out)
    assert len(expert) == 2 * 3 * 2 and {k for k in exported.keys() if ".mlp.experts." in k} == set(expert)
    assert all(torch.equal(exported.read(k), v) for k, v in expert.items())
    assert json.loads((out / "config.json").read_text())["mocae"]["expert_names"] == ["help"]
    dense = export_hf(stage1 / "checkpoints" / "step00000002", tmp_path / "dense", fmt="dense", expert="help")
    assert json.loads((dense / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
