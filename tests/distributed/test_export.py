"""HF export of models built and trained at TP/EP: the exported folder, loaded by transformers in a
fresh process (registered via trinityx_ds, or trust_remote_code without it), computes the
training model's logits for routed, dense and single-expert routing."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.dist import ROOT
from trinityx_ds.convert.export import export_hf
from trinityx_ds.model.tiny import make_tiny_model

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
    from tests.train_setup import write_config, write_random_experts

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
