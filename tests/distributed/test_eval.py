"""Evaluation on a run trained by the real CLI (random stage-1 experts, router trained on 2 processes):
the suites on the real data samples through `trinityx eval`, DP=2 (launched with --nproc) equal to
DP=1 bit for bit, the fitted T written back; the loaded models against transformers."""
import json
import math
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.dist import run_dist
from tests.train_setup import write_config, write_random_experts
from trinityx_ds.calibration.fit import read_temperatures, write_temperatures
from trinityx_ds.eval.runner import main as eval_main

WORKERS = Path(__file__).parent / "workers"
DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalrun")
    cfg = write_config(root, **{"data.heldout_fraction": 0.5})
    write_random_experts(cfg)
    run_dist(WORKERS / "train_worker.py", 2, "cli", str(cfg), "router")
    return root


def _numbers(report: dict) -> dict:
    s = report["suites"]
    r = s["routing"]
    return {"tqa": s["truthfulqa_mc"], "hh": s["hh_preference"], "gen": s["generate"],
            "routing": {k: r[k] for k in ("routed", "before", "after", "temperature", "per_layer",
                                          "top1_share_by_layer")}}


def test_suites_on_real_samples_dp2_equals_dp1_and_temperature_written(trained, tmp_path):
    if not DATA.is_dir():
        pytest.skip(f"real data samples absent: {DATA} (the shared/ folder beside the project)")
    run = trained / "out"
    args = ["--checkpoint", str(run), "--suite", "truthfulqa_mc,hh_preference,routing,generate",
            "--truthfulqa", str(DATA / "truthfulqa/TruthfulQA_v1_817.csv"),
            "--hh", str(DATA / "hh_rlhf/harmless-base-test.jsonl.gz"),
            "--prompts", f"alpaca={DATA / 'alpaca/alpaca_200_first.json'}",
            "--prompts", f"beavertails={DATA / 'beavertails/artkit_beavertails_sample.csv'}",
            "--limit", "16", "--batch-size", "4", "--max-new-tokens", "4"]
    router = run / "stage2" / "router.safetensors"
    trained_router = load_file(router)
    run_dist(WORKERS / "eval_worker.py", 1, "cli", json.dumps(args + ["--out", str(tmp_path / "dp1")]))
    assert eval_main(args + ["--out", str(tmp_path / "dp2"), "--nproc", "2", "--write-temperature"]) == 0

    one, two = (json.loads((tmp_path / d / "report.json").read_text()) for d in ("dp1", "dp2"))
    assert (one["dp"], two["dp"], two["world_size"]) == (1, 2, 2)
    assert _numbers(one) == _numbers(two)  # exact: same batches, same padding, whatever the layout
    assert (tmp_path / "dp1/generations.jsonl").read_text() == (tmp_path / "dp2/generations.jsonl").read_text()
    for name in ("report.md", "reliability.png", "routing_share.png", "truthfulqa_mc.jsonl", "hh_preference.jsonl"):
        assert (tmp_path / "dp2" / name).stat().st_size > 0, name

    s = two["suites"]
    assert s["truthfulqa_mc"]["n"] == 16 and 0 <= s["truthfulqa_mc"]["mc1"] <= 1 and 0 < s["truthfulqa_mc"]["mc2"] < 1
    hh = s["hh_preference"]["harmless"]
    assert hh["n"] == 16 and 0 <= hh["accuracy"] <= 1 and math.isfinite(hh["mean_margin"])
    assert s["generate"]["n"] == 32
    r = s["routing"]
    assert r["n"] == 24 and r["n_val"] + r["n_test"] == 24  # 8 held-out rows per task
    assert 0 <= r["after"]["ece"] <= 1 and r["after"]["nll"] <= r["before"]["nll"] + 0.05
    assert r["temperature"]["current"] == pytest.approx([0.7, 0.7])

    # write-back: every layer holds the fitted global T; the backup is the file as trained
    t = r["temperature"]["global"]
    assert read_temperatures(router) == pytest.approx({0: t, 1: t})
    backup = load_file(r["written"]["backup"])
    assert backup.keys() == trained_router.keys() and all((backup[k] == v).all() for k, v in trained_router.items())


def test_models_match_transformers_and_reread_temperature(trained, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained / "out", run)  # a moved run still finds its experts and router
    write_temperatures(run / "stage2" / "router.safetensors", {0: 1.7, 1: 2.5})
    res = run_dist(WORKERS / "eval_worker.py", 1, "checks", str(run), str(trained / "model"))
    assert res["ours"] == pytest.approx(res["ref"], abs=1e-4)
    assert res["single"] == pytest.approx(res["ours"][1], abs=1e-5)  # alone vs in a padded batch
    assert res["gen_ours"] == res["gen_ref"] and all(res["gen_ours"])
    assert res["run_backbone"] == pytest.approx(res["ours"], abs=1e-9)
    assert res["temperatures"] == pytest.approx([1.7, 2.5])
    v = res["variants"]
    assert v["uniform"]["router"] == [[1.0, 0.0, [0.0] * 3, 3]] * 2  # T, |weight|, log-priors, top-k
    t, weight, _, top_k = v["h3fusion"]["router"][0]
    assert t == 1.0 and weight > 0 and top_k == 2  # the trained gate, uncalibrated
    assert v["expert:help"]["router"] == [[0.7, 0.0, [0.0], 1]] * 2  # one expert, its router unused
    for name, got in v.items():  # the experts are non-zero deltas: every variant moves the scores
        assert all(math.isfinite(x) for x in got["ll"]) and got["ll"] != pytest.approx(res["ours"], abs=1e-3), name
