"""`trinityx demo` end to end (tiny model, short stages): every output it promises is there."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.dist import ROOT
from trinityx_ds.launch.torchrun import cpu_env

pytestmark = pytest.mark.distributed


def _tags(folder) -> set[str]:
    acc = EventAccumulator(str(folder))
    acc.Reload()
    return set(acc.Tags()["scalars"])


def test_demo_runs_the_pipeline(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "trinityx_ds.cli", "demo", "--model", "tiny", "--steps", "4",
                           "--out", str(out)], cwd=ROOT, env=cpu_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "routing accuracy" in proc.stdout
    parity = json.loads((out / "parity.json").read_text())
    assert parity[0]["ok"] and parity[0]["logits"] <= 1e-4
    for name in ("help", "harm", "honest"):
        stage = out / "stage1" / name
        assert (stage / "expert.safetensors").stat().st_size > 0
        assert (stage / "checkpoints" / "latest").read_text() == "step00000004"
        assert {"train/loss", "train/lr", "train/tokens_per_s", "train/tflops_per_gpu", "train/grad_norm"} <= \
            _tags(stage / "tensorboard")  # no train/mfu on CPU: no peak to divide by
    for name in ("harm", "honest"):  # the demo's DPO experts: TensorBoard carries DPO's own figures
        assert {"dpo/loss", "dpo/reward_accuracy", "dpo/reward_margin", "dpo/logps_chosen", "dpo/logps_rejected",
                "time/reference_s"} <= _tags(out / "stage1" / name / "tensorboard")
    # the progress bar (tqdm on stderr) of a DPO expert, with the loss it shows
    assert re.search(r"stage 1 harm:[^\r\n]*loss=", proc.stderr), proc.stderr[-2000:]
    stage2 = out / "stage2"
    assert (stage2 / "router.safetensors").stat().st_size > 0
    tags = _tags(stage2 / "tensorboard")
    for tag in ("train/loss", "train/loss_help", "train/loss_harm", "train/loss_honest", "router/entropy",
                "router/kl_prev", "router/kl_uniform", "router/task_ce", "router/load_balance", "router/z_loss",
                "routing/layer00/help", "routing/layer01/honest", "val/routing_accuracy", "val/routing_ece",
                "train/grad_norm", "train/lr", "train/tokens_per_s", "train/tflops_per_gpu"):
        assert tag in tags, (tag, sorted(tags))
    report = json.loads((stage2 / "validation.json").read_text())
    assert report["n"] > 0 and 0 <= report["ece"] <= 1 and set(report["per_task_accuracy"]) == {"help", "harm", "honest"}
    lines = (stage2 / "metrics.jsonl").read_text().splitlines()
    assert len(lines) >= 4 and "router/entropy" in json.loads(lines[0])
    last = stage2 / "checkpoints" / (stage2 / "checkpoints" / "latest").read_text()
    assert last.name == "step00000004" and (last / "COMPLETE").is_file() and (last / "config.yaml").is_file()
    assert len(list(last.glob("*mp_rank_0[01]_model_states.pt"))) == 2  # TP=2: one file per TP rank
    assert json.loads((last / "trinityx_state.json").read_text())["step"] == 4
    # the HF export, loaded back by transformers in the demo itself
    hf = json.loads((out / "hf" / "config.json").read_text())
    assert hf["architectures"] == ["TrinityXForCausalLM"] and hf["mocae"]["expert_names"] == ["help", "harm", "honest"]
    assert "TrinityXForCausalLM: 'Give one tip" in proc.stdout
    # the held-out HHH report: both variants on the 12 embedded held-out items per dimension, and the
    # paired differences are those of the per-item figures each variant's evaluation wrote
    assert "[5/6] held-out HHH figures, backbone vs the fused model" in proc.stdout
    hhh = json.loads((out / "hhh_heldout.json").read_text())
    assert set(hhh["variants"]) == {"backbone", "trinityx"} and Path(hhh["files"]["honest"]).name == \
        "truthfulqa_heldout_tiny.jsonl"
    assert all(n == 12 for n in hhh["variants"]["trinityx"]["n"].values())
    items = {v: json.loads((out / "hhh_heldout" / f"{v}.json").read_text()) for v in ("backbone", "trinityx")}
    mc2 = {v: [x["mc2"] for x in r["tqa_items"]] for v, r in items.items()}
    diff = sum(a - b for a, b in zip(mc2["trinityx"], mc2["backbone"])) / 12
    row = hhh["variants"]["trinityx"]["rows"]["MC2"]
    assert abs(row["diff"] - diff) < 1e-12 and row["diff_ci"][0] <= row["diff"] <= row["diff_ci"][1]
    margin = [x["c"] - x["r"] for x in items["trinityx"]["hh_items"]]
    assert abs(hhh["variants"]["trinityx"]["rows"]["harmless margin"]["value"] - sum(margin) / 12) < 1e-9
    assert ("significantly below the backbone" in proc.stdout) == bool(hhh["significantly_negative"])
