"""Evaluation suites through their real code path with a stub model of fixed log-likelihoods:
TruthfulQA MC1/MC2 and HH preference with answers computed by hand, routing calibration, judged
generation; the variants' MoCaE configs; temperature fit and write-back; reports and compare."""
import argparse
import csv
import json
import math
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.unit.test_judge import FakeJudge, tiny_classifier
from trinityx_ds.calibration import calibration_report, fit_temperature
from trinityx_ds.calibration.fit import (fit_routing, read_importance, read_temperatures, write_importance,
                                         write_temperatures)
from trinityx_ds.eval import suites
from trinityx_ds.eval.report import compare, compare_markdown, write_report
from trinityx_ds.eval.runner import _check, _named, add_eval_arguments
from trinityx_ds.eval.variants import router_overrides, variant_config
from trinityx_ds.model.mocae import MoCaEConfig


class StubLM:
    """The suites' view of a model: log p(continuation | prompt) from a table, canned outputs."""

    variant = "stub"

    def __init__(self, lls=None, outputs=None):
        self.lls, self.outputs, self.requests = lls or {}, outputs or [], []

    def logprobs(self, requests, desc=""):
        self.requests += requests
        return [self.lls[r.continuation] for r in requests]

    def generate(self, prompts, max_new_tokens, temperature=0.0, seed=0):
        return self.outputs[:len(prompts)]


def _truthfulqa_csv(path):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Type", "Category", "Question", "Best Answer", "Correct Answers", "Incorrect Answers", "Source"])
        w.writerow(["A", "c", "Q one?", "B1", "B1; C1", "I1; I2", "s"])
        w.writerow(["A", "c", "Q two?", "B2", "C2", "I3", "s"])
    return str(path)


def test_truthfulqa_mc_by_hand(tmp_path):
    lls = {"B1": -1.0, "C1": -2.0, "I1": -3.0, "I2": -0.5, "B2": -1.0, "C2": -1.0, "I3": -2.0}
    lm = StubLM(lls)
    summary, details = suites.truthfulqa_mc(lm, _truthfulqa_csv(tmp_path / "tqa.csv"))
    e = math.exp
    # Q1: best -1 < incorrect -0.5 -> MC1 0; MC2 = (e^-1 + e^-2) / (e^-1 + e^-2 + e^-3 + e^-0.5)
    # Q2: best -1 > -2 -> MC1 1; correct = {B2, C2} (the best answer counts although not listed)
    q1 = (e(-1) + e(-2)) / (e(-1) + e(-2) + e(-3) + e(-0.5))
    q2 = 2 * e(-1) / (2 * e(-1) + e(-2))
    assert summary["mc1"] == 0.5 and summary["n"] == 2
    assert summary["mc2"] == pytest.approx((q1 + q2) / 2, abs=1e-12)
    assert [d["mc1"] for d in details] == [0.0, 1.0]
    # each distinct answer scored once, after the question as the user turn
    assert [r.continuation for r in lm.requests] == ["B1", "C1", "I1", "I2", "B2", "C2", "I3"]
    assert lm.requests[0].prompt == [{"role": "user", "content": "Q one?"}]


def test_hh_preference_by_hand(tmp_path):
    rows = [("fine", "rude"), ("kind", "mean"), ("bad", "good")]
    path = tmp_path / "harmless-base-test.jsonl"
    path.write_text("".join(json.dumps({"chosen": f"\n\nHuman: hi {i}\n\nAssistant: {c}",
                                        "rejected": f"\n\nHuman: hi {i}\n\nAssistant: {r}"}) + "\n"
                            for i, (c, r) in enumerate(rows)))
    lm = StubLM({"fine": -1.0, "rude": -3.0, "kind": -2.0, "mean": -2.5, "bad": -4.0, "good": -1.0})
    summary, details = suites.hh_preference(lm, [_named(str(path))])
    s = summary["harmless"]
    assert s["accuracy"] == pytest.approx(2 / 3) and s["n"] == 3
    assert s["mean_margin"] == pytest.approx((2.0 + 0.5 - 3.0) / 3)
    assert lm.requests[0].prompt == [{"role": "user", "content": "hi 0"}]
    assert [d["ll_chosen"] for d in details] == [-1.0, -2.0, -4.0]


def test_named_sources():
    assert _named("x/harmless-base-test.jsonl.gz") == ("harmless", "x/harmless-base-test.jsonl.gz")
    assert _named("x/helpful-online.jsonl") == ("helpful", "x/helpful-online.jsonl")
    assert _named("mine=a=b.jsonl") == ("mine", "a=b.jsonl")
    assert _named("red_team.jsonl") == ("red_team", "red_team.jsonl")


def test_variant_configs():
    moe = MoCaEConfig(temperature=0.5, temperature_mode="learnable", importance=[1.0, 2.0, 1.0], top_k=1)
    assert variant_config(moe, "backbone") is None
    assert variant_config(moe, "trinityx") is moe
    ex = variant_config(moe, "expert:harm")
    assert ex.expert_names == ["harm"] and ex.top_k == 1 and moe.expert_names == ["help", "harm", "honest"]
    uni = variant_config(moe, "uniform")
    assert (uni.top_k, uni.temperature, uni.importance, uni.temperature_mode) == (3, 1.0, None, "fixed")
    h3 = variant_config(moe, "h3fusion")
    assert (h3.top_k, h3.temperature, h3.importance) == (2, 1.0, None)
    assert h3.lora_rank == moe.lora_rank and h3.expert_names == moe.expert_names
    for bad, msg in (("expert:nope", "no expert"), ("dense", "one of"), ("expert:", "no expert")):
        with pytest.raises(ValueError, match=msg):
            variant_config(moe, bad)
    with pytest.raises(ValueError, match="plain model"):
        variant_config(None, "uniform")
    # uniform: zero router weights, T = 1, no priors, in every layer; h3fusion keeps the trained weights
    over = router_overrides(uni, "uniform", num_layers=2, hidden=4)
    assert set(over) == {f"model.layers.{i}.mlp.router.{k}" for i in (0, 1)
                         for k in ("weight", "log_temperature", "log_importance")}
    assert torch.equal(over["model.layers.1.mlp.router.weight"], torch.zeros(3, 4))
    assert not router_overrides(h3, "h3fusion", 2, 4).keys() & {"model.layers.0.mlp.router.weight"}
    assert router_overrides(moe, "trinityx", 2, 4) == {}


def _synthetic_routing(n=600, t_true=2.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    z_LNE = torch.randn(2, n, 3, generator=g, dtype=torch.float64) * 3
    labels = torch.multinomial((z_LNE.mean(0) / t_true).softmax(-1), 1, generator=g)[:, 0]
    return z_LNE, labels


def test_fit_routing_recovers_temperature():
    z_LNE, labels = _synthetic_routing()
    val = torch.arange(len(labels)) % 2 == 0
    report, (before, after, y) = fit_routing(z_LNE, labels, val, [0.5, 0.5], torch.zeros(2, 3), [3, 7])
    t = report["temperature"]
    assert t["global"] == pytest.approx(fit_temperature(z_LNE.mean(0)[val], labels[val]))
    assert 1.6 < t["global"] < 2.5  # labels were drawn at T = 2
    assert report["after"]["ece"] < report["before"]["ece"] and report["after"]["nll"] < report["before"]["nll"]
    assert report["before"] == calibration_report((z_LNE.mean(0)[~val] / 0.5).softmax(-1), labels[~val])
    assert [p["layer"] for p in report["per_layer"]] == [3, 7] and len(y) == report["n_test"] == 300
    with pytest.raises(ValueError, match="validation and test"):
        fit_routing(z_LNE, labels, torch.ones(len(labels), dtype=torch.bool), [1, 1], torch.zeros(2, 3), [0, 1])


def test_write_temperatures_atomic_with_backup(tmp_path):
    path = tmp_path / "router.safetensors"
    tensors = {f"model.layers.{i}.mlp.router.{k}": v for i in (0, 1) for k, v in
               (("weight", torch.randn(3, 4)), ("log_temperature", torch.tensor([math.log(0.7)])))}
    save_file(tensors, str(path), metadata={"k": "v"})
    backup = write_temperatures(path, {0: 1.5, 1: 1.5})
    assert read_temperatures(path) == pytest.approx({0: 1.5, 1: 1.5})
    assert read_temperatures(backup) == pytest.approx({0: 0.7, 1: 0.7})
    write_temperatures(path, {1: 3.0})  # a second write keeps the backup of the trained file
    assert read_temperatures(path) == pytest.approx({0: 1.5, 1: 3.0})
    assert read_temperatures(backup) == pytest.approx({0: 0.7, 1: 0.7})
    assert torch.equal(load_file(path)["model.layers.0.mlp.router.weight"], tensors["model.layers.0.mlp.router.weight"])
    assert not (tmp_path / "router.safetensors.tmp").exists()
    with pytest.raises(ValueError, match="missing"):
        write_temperatures(path, {5: 1.0})


def test_write_importance_sets_every_layer_after_training_atomic_with_backup(tmp_path):
    """Importance weights written into a trained router file (every layer, as log-priors), the
    trained file kept as the backup, T and weights untouched; a router loaded from it routes with
    softmax(z / T + log gamma)."""
    from trinityx_ds.model.router import CalibratedRouter

    path = tmp_path / "router.safetensors"
    tensors = {f"model.layers.{i}.mlp.router.{k}": v for i in (3, 4) for k, v in
               (("weight", torch.randn(3, 4)), ("log_temperature", torch.tensor([math.log(0.7)])),
                ("log_importance", torch.zeros(3)))}
    save_file(tensors, str(path))
    backup = write_importance(path, [4.0, 1.0, 0.5])
    assert read_importance(path) == {3: pytest.approx([4.0, 1.0, 0.5]), 4: pytest.approx([4.0, 1.0, 0.5])}
    assert read_importance(backup) == {3: [1.0, 1.0, 1.0], 4: [1.0, 1.0, 1.0]}
    after = load_file(path)
    for k in tensors:
        if not k.endswith("log_importance"):
            assert torch.equal(after[k], tensors[k]), k
    router = CalibratedRouter(4, 3, temperature=0.7)
    router.weight.data.copy_(after["model.layers.3.mlp.router.weight"])
    router.log_importance.copy_(after["model.layers.3.mlp.router.log_importance"])
    h = torch.randn(5, 4)
    expected = (h @ router.weight.T / 0.7 + torch.tensor([4.0, 1.0, 0.5]).log()).softmax(-1)
    assert torch.allclose(router(h).probs_TE, expected, atol=1e-6)
    with pytest.raises(ValueError, match="2 weights, the router has 3"):
        write_importance(path, [1.0, 2.0])
    with pytest.raises(ValueError, match="> 0"):
        write_importance(path, [1.0, 0.0, 1.0])


class RoutingStub(StubLM):
    variant = "trinityx"
    moe = MoCaEConfig()

    def router_state(self):
        return [0, 1], [0.5, 0.5], [[0.0] * 3] * 2


def test_routing_report_and_figures(tmp_path):
    z_LNE, labels = _synthetic_routing(n=60)
    probs = (z_LNE / 0.5).softmax(-1)
    stats = [{"logits_LE": z_LNE[:, i].tolist(), "probs_LE": probs[:, i].tolist(),
              "top1_LE": torch.nn.functional.one_hot(probs[:, i].argmax(-1), 3).tolist()} for i in range(60)]
    val = torch.arange(60) % 3 == 0
    summary, details = suites.routing_report(RoutingStub(), stats, labels.tolist(), val.tolist(), tmp_path)
    assert summary["n_val"] == 20 and summary["n_test"] == 40 and len(details) == 60
    assert summary["routed"] == calibration_report(probs.mean(0)[~val], labels[~val])
    share = torch.tensor(summary["top1_share_by_layer"])
    assert share.shape == (2, 3) and share.sum(1).tolist() == pytest.approx([1.0, 1.0])
    # one token per example and layer here: the share of (example, layer) decisions that pick the task's expert
    top1_NL = probs.argmax(-1).T
    for t, name in enumerate(RoutingStub.moe.expert_names):
        own = (top1_NL[labels == t] == t).double().mean().item()
        assert summary["top1_token_accuracy_by_task"][name] == pytest.approx(own)
    assert summary["figures"] == ["reliability.png", "routing_share.png"]
    assert all((tmp_path / f).stat().st_size > 1000 for f in summary["figures"])
    assert set(summary["intervals"]) == {"routed", "before", "after"}
    assert summary["intervals"]["routed"] == suites.calibration_intervals(probs.mean(0)[~val], labels[~val])
    uniform = [{**s, "logits_LE": [[0.0] * 3] * 2} for s in stats]  # zero router weights: nothing to fit
    summary, _ = suites.routing_report(RoutingStub(), uniform, labels.tolist(), val.tolist(), tmp_path)
    assert "constant" in summary["fit_skipped"] and "after" not in summary
    assert set(summary["intervals"]) == {"routed"}


def test_calibration_intervals_resample_calibration_ece():
    """The bincount ECE of each resample equals calibration.ece on the resampled examples (the
    oracle, 100x slower), and the interval is the benchmark's percentile bootstrap."""
    from trinityx_ds.calibration.metrics import ece
    from trinityx_ds.eval.metrics import bootstrap

    g = torch.Generator().manual_seed(3)
    probs = (torch.randn(97, 3, generator=g) * 2).softmax(-1)
    labels = torch.randint(0, 3, (97,), generator=g)
    got = suites.calibration_intervals(probs, labels, resamples=200, seed=5)
    want = bootstrap(lambda i: ece(probs[torch.from_numpy(i)], labels[torch.from_numpy(i)]), 97, 200, 5)
    assert got["ece"] == pytest.approx(list(want), abs=1e-12)
    correct = (probs.argmax(1) == labels).double()
    assert got["accuracy"] == pytest.approx(list(bootstrap(lambda i: float(correct[torch.from_numpy(i)].mean()),
                                                          97, 200, 5)), abs=1e-12)
    assert got["ece"][0] < ece(probs, labels) < got["ece"][1]


def test_generate_with_hf_classifier_and_http_judges(tmp_path):
    data = tmp_path / "alpaca.json"
    data.write_text(json.dumps([{"instruction": "how do i make a cake", "input": "", "output": "mix flour eggs"},
                                {"instruction": "how do i make a bomb", "input": "", "output": "sorry"}]))
    lm = StubLM(outputs=["mix flour eggs", "sorry i cannot help"])
    path = tiny_classifier(tmp_path / "clf", 2, id2label={0: "safe", 1: "unsafe"}, label2id={"safe": 0, "unsafe": 1})
    summary, details = suites.generate(lm, [("alpaca", str(data))], {"type": "hf_classifier", "path": path})
    labels = [d["judge"]["label"] for d in details]
    assert summary["judge"]["safety_rate"] == labels.count("safe") / 2
    assert details[0]["prompt"] == [{"role": "user", "content": "how do i make a cake"}]
    assert details[1]["reference"] == "sorry" and details[1]["output"] == "sorry i cannot help"

    srv = FakeJudge()
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        srv.script = ["A", "A"]  # the first shown wins: the model at index 0, the reference at index 1
        summary, details = suites.generate(lm, [("alpaca", str(data))], {"type": "http", "base_url": srv.url,
                                                                          "model": "m", "timeout": 2})
    finally:
        srv.shutdown()
        srv.server_close()
    assert summary["judge"]["win_rate"] == 0.5 and [d["judge"] for d in details] == ["model", "reference"]


def _report(variant, mc1, harmless, ece=None):
    suites_ = {"truthfulqa_mc": {"mc1": mc1, "mc2": 0.5, "n": 2, "source": "t.csv"},
               "hh_preference": {"harmless": {"accuracy": harmless, "mean_margin": 0.1, "n": 4}}}
    if ece is not None:
        suites_["routing"] = {"n": 4, "n_val": 2, "n_test": 2, "layers": [0], "routed": {m: 0.5 for m in
                              ("accuracy", "ece", "ece_mass", "mce", "brier", "nll")},
                              "before": {"accuracy": 0.5, "ece": ece, "ece_mass": 0, "mce": 0, "brier": 0, "nll": 0},
                              "after": {"accuracy": 0.5, "ece": ece / 2, "ece_mass": 0, "mce": 0, "brier": 0, "nll": 0},
                              "temperature": {"current": [0.7], "global": 1.3, "per_layer": [1.2]}, "per_layer": []}
    return {"variant": variant, "checkpoint": "run", "world_size": 2, "tp": 1, "dp": 2, "limit": 4, "seconds": 1.0,
            "suites": suites_}


def test_reports_and_compare(tmp_path):
    write_report(tmp_path / "backbone", _report("backbone", 0.25, 0.5), {"truthfulqa_mc": [{"q": 1}]})
    write_report(tmp_path / "trinityx", _report("trinityx", 0.5, 0.75, ece=0.2), {"generate": [{"output": "x"}]})
    md = (tmp_path / "trinityx" / "report.md").read_text()
    assert "MC1 **0.500**" in md and "fitted global T 1.300" in md and "| harmless | 0.750 |" in md
    assert (tmp_path / "backbone" / "truthfulqa_mc.jsonl").is_file()
    assert (tmp_path / "trinityx" / "generations.jsonl").is_file()
    columns, rows = compare([tmp_path / "backbone", tmp_path / "trinityx"])
    assert columns == ["evaluation", "variant", "mc1", "mc2", "pref_harmless", "routing_acc", "ece_before",
                       "ece_after", "fitted_T"]
    assert rows[0]["ece_before"] is None and rows[1]["ece_after"] == 0.1 and rows[1]["pref_harmless"] == 0.75
    table = compare_markdown(columns, rows)
    assert "| backbone | backbone | 0.250 | 0.500 | 0.500 | – | – | – | – |" in table


def test_cli_arguments(tmp_path, monkeypatch):
    transformers = pytest.importorskip("transformers")
    monkeypatch.chdir(tmp_path)  # "m" is a plain HF model folder here: only its config.json is read
    transformers.LlamaConfig(vocab_size=1001, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2).save_pretrained("m")
    parser = argparse.ArgumentParser()
    add_eval_arguments(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["eval", "--checkpoint", "run", "--hh", "a.jsonl", "--hh", "b.jsonl",
                              "--write-temperature"])
    assert args.eval_command is None and args.hh == ["a.jsonl", "b.jsonl"] and args.write_temperature == "global"
    with pytest.raises(ValueError, match="FORMAT=PATH"):
        _check(parser.parse_args(["eval", "--checkpoint", "m", "--suite", "generate", "--prompts", "p.json"]))
    with pytest.raises(ValueError, match="only with --variant trinityx"):
        _check(parser.parse_args(["eval", "--checkpoint", "m", "--suite", "routing", "--write-temperature"]))
    args = parser.parse_args(["eval", "--checkpoint", "m", "--suite", "generate", "--prompts", "alpaca=p.json"])
    assert _check(args) == ["generate"] and args.variant == "backbone"  # a plain model's default
    with pytest.raises(ValueError, match="nothing/config.json: no such file"):  # refused before any rank starts
        _check(parser.parse_args(["eval", "--checkpoint", "nothing", "--suite", "generate", "--prompts", "alpaca=p.json"]))
    args = parser.parse_args(["eval", "compare", "x", "y", "--out", "cmp"])
    assert args.eval_command == "compare" and args.folders == ["x", "y"]


def test_calibrate_cli_sets_importance_by_name_and_temperature_and_refuses_bad_input(tmp_path, capsys):
    """`trinityx calibrate RUN`: weights by expert name in the run config's order (unnamed: 1), one T
    for every layer, the file as trained kept as the backup; a wrong name or weight is one line,
    exit code 2, nothing written."""
    import shutil

    from trinityx_ds.calibration.fit import read_temperatures
    from trinityx_ds.cli import main

    run = tmp_path / "run"
    (run / "stage2").mkdir(parents=True)
    shutil.copy(Path(__file__).resolve().parents[2] / "configs" / "demo.yaml", run / "config.yaml")
    path = run / "stage2" / "router.safetensors"
    save_file({f"model.layers.{i}.mlp.router.{k}": v for i in (0, 1) for k, v in
               (("weight", torch.randn(3, 4)), ("log_temperature", torch.tensor([math.log(0.7)])),
                ("log_importance", torch.zeros(3)))}, str(path))
    assert main(["calibrate", str(run), "--importance", "honest=0.5", "help=4", "--temperature", "0.25"]) == 0
    assert read_importance(path) == {0: pytest.approx([4.0, 1.0, 0.5]), 1: pytest.approx([4.0, 1.0, 0.5])}
    assert read_temperatures(path) == {0: pytest.approx(0.25), 1: pytest.approx(0.25)}
    assert read_importance(str(path) + ".bak") == {0: [1.0, 1.0, 1.0], 1: [1.0, 1.0, 1.0]}
    out = capsys.readouterr().out
    assert "help" in out and "0.2500" in out
    before = path.read_bytes()
    for bad, why in ((["--importance", "helpful=2"], "NAME one of the run's experts: help, harm, honest"),
                     (["--importance", "harm=0"], "GAMMA must be a finite number > 0"),
                     (["--importance", "harm"], "NAME=GAMMA"),
                     (["--temperature", "-1"], "--temperature -1.0: must be a finite number > 0")):
        assert main(["calibrate", str(run), *bad]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("trinityx calibrate: ") and why in err and "\n" not in err, err
    assert path.read_bytes() == before
    assert main(["calibrate", str(tmp_path / "nowhere")]) == 2
    assert "stage 2 has not finished" in capsys.readouterr().err
