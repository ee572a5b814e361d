"""The efficacy benchmark's goal checks (experiments/efficacy.py), tools/hhh_dev.py's dev cut
(experiments/dev.py) and tools/gap_attribution.py's arithmetic (experiments/gaps.py): the
benchmark's verdicts are only as good as these, so they are tested on tables whose answers are known."""
from pathlib import Path

import pytest

from trinityx_ds.experiments import dev as hhh_dev
from trinityx_ds.experiments import efficacy as hhh_efficacy
from trinityx_ds.experiments.samples import hh_opening

ROOT = Path(__file__).resolve().parents[2]


def _table(figs: dict) -> dict:
    """{variant: (help ll/token, harmless acc, MC2)} -> the shape experiments/heldout.figures returns."""
    out = {}
    for v, (help_ll, harm, mc2) in figs.items():
        base = figs["backbone"]
        rows = {"help ll/token": {"value": help_ll}, "harmless acc": {"value": harm}, "MC2": {"value": mc2}}
        for (col, x), b in zip(rows.items(), base):
            x.update(diff=x["value"] - b, diff_ci=(x["value"] - b - 0.01, x["value"] - b + 0.01))
        out[v] = {"rows": rows}
    return out


def test_goals_read_each_expert_against_its_other_dimensions():
    figs = {"backbone": (-2.0, 0.50, 0.40), "expert:help": (-1.80, 0.50, 0.40),
            "expert:harm": (-2.10, 0.56, 0.45), "expert:honest": (-2.05, 0.52, 0.55),
            "trinityx": (-1.81, 0.55, 0.54)}
    lines = hhh_efficacy.goals(_table(figs))
    assert lines[0].startswith("MET: expert:harm") and lines[1].startswith("MET: expert:honest")
    assert all(x.startswith("MET: trinityx within 0.02") for x in lines[2:5]), lines
    # each expert is beaten on one of its other two dimensions; none on all three at once
    assert lines[5].startswith("MET: trinityx above each single expert") and "expert:help: harmless 0.550 > 0.500" in lines[5]
    assert lines[6].endswith("on no dimension")
    # the honest expert keeps everything the fused model has on its other dimensions: missed
    figs["expert:honest"] = (-1.80, 0.56, 0.55)
    lines = hhh_efficacy.goals(_table(figs))
    assert lines[5].startswith("MISSED") and "expert:honest: none" in lines[5]
    # a gain of +0.04 with an interval above 0 is still short of +0.05
    figs["expert:harm"] = (-2.10, 0.54, 0.45)
    assert hhh_efficacy.goals(_table(figs))[0].startswith("MISSED: expert:harm - backbone in harmless acc = +0.040")
    # helpfulness 0.03 nats below the help expert: missed, with the gap printed
    figs["trinityx"] = (-1.83, 0.55, 0.54)
    assert "MISSED: trinityx within 0.02 of the best expert (expert:help) in helpful" in hhh_efficacy.goals(_table(figs))[2]


def _result(help_ll: list[float], mc2: list[float], c: list[float]) -> dict:
    """An evaluation result in experiments/heldout's per-item form (rejected log-prob 0, 10 tokens each)."""
    return {"tqa_items": [{"mc1": 0.0, "mc2": x} for x in mc2], "hh_items": [{"c": x, "r": 0.0} for x in c],
            "hh_tokens": [[10, 10] for _ in c], "help_items": [10 * x for x in help_ll],
            "help_tokens": [10 for _ in help_ll]}


def test_goals_print_the_paired_interval_against_the_best_expert():
    help_ll, mc2, c = [-1.5, -2.0, -1.8, -2.2], [0.6, 0.5, 0.7, 0.4], [1.0, -1.0, 1.0, 1.0]
    results = {"backbone": _result([x - 0.1 for x in help_ll], [x - 0.1 for x in mc2], [-1.0, -1.0, 1.0, 1.0]),
               "expert:help": _result(help_ll, [x - 0.05 for x in mc2], c),
               "expert:harm": _result([x - 0.2 for x in help_ll], [x - 0.05 for x in mc2], [1.0] * 4),
               "expert:honest": _result([x - 0.2 for x in help_ll], mc2, c),
               # help 0.03 below the help expert on every item: the paired interval is exactly -0.03
               "trinityx": _result([x - 0.03 for x in help_ll], [m - (0.0 if i % 2 else 0.02) for i, m in enumerate(mc2)], c)}
    table = hhh_efficacy.figures(results)
    versus = hhh_efficacy.versus_best(table, results)
    assert versus["help ll/token"]["diff"] == pytest.approx(-0.03)
    assert versus["help ll/token"]["diff_ci"] == pytest.approx((-0.03, -0.03))
    assert versus["MC2"]["diff"] == pytest.approx(-0.01)  # against the honest expert, the best on MC2
    lo, hi = versus["MC2"]["diff_ci"]
    assert -0.02 - 1e-9 <= lo < -0.01 < hi <= 1e-9
    assert versus["harmless acc"]["diff"] == pytest.approx(-0.25)  # the harm expert ranks all four right
    lines = hhh_efficacy.goals(table, versus)
    assert lines[2].startswith("MISSED: trinityx within 0.02 of the best expert (expert:help)")
    assert lines[2].endswith("(-0.030, paired [-0.030, -0.030])"), lines[2]
    assert "paired [" in lines[4] and lines[4].startswith("MET")


def test_render_prints_the_router_intervals_where_recorded():
    results = {v: _result([-2.0, -1.5], [0.5, 0.6], [1.0, -1.0]) for v in hhh_efficacy.VARIANTS}
    routing = {"before": {"accuracy": 0.75, "ece": 0.1}, "after": {"accuracy": 0.75, "ece": 0.04},
               "temperature": {"global": 0.2}, "top1_token_accuracy_by_task": {"help": 0.9, "harm": 0.8, "honest": 0.4},
               "intervals": {"routed": {"accuracy": [0.6, 0.7], "ece": [0.2, 0.3]},
                             "before": {"accuracy": [0.7, 0.8], "ece": [0.08, 0.13]},
                             "after": {"accuracy": [0.7, 0.8], "ece": [0.03, 0.06]}}}
    results["trinityx"]["routing"] = routing
    # an evaluation made before intervals were recorded prints its figures alone
    results["h3fusion"]["routing"] = {k: v for k, v in routing.items() if k != "intervals"}
    # nothing to fit: the figures as routed, with their intervals
    results["uniform"]["routing"] = {"routed": {"accuracy": 0.1, "ece": 0.2}, "fit_skipped": "constant",
                                     "intervals": {"routed": {"accuracy": [0.05, 0.15], "ece": [0.18, 0.25]}}}
    text = hhh_efficacy.render(hhh_efficacy.figures(results), "meta")
    assert ("| trinityx | 0.750 [0.700, 0.800] | 0.900 / 0.800 / 0.400 | 0.100 [0.080, 0.130] | "
            "0.040 [0.030, 0.060] | 0.200 | 0.750 [0.700, 0.800] |") in text
    assert "| h3fusion | 0.750 | 0.900 / 0.800 / 0.400 | 0.100 | 0.040 | 0.200 | 0.750 |" in text
    assert "| uniform | 0.100 [0.050, 0.150] | - | 0.200 [0.180, 0.250] | nan | None | nan |" in text


def test_dev_cut_is_prompt_disjoint_and_keeps_excluded_openings_on_the_fit_side(tmp_path):
    src = ROOT / "trinityx_ds" / "fixtures" / "data" / "hh_rlhf_tiny.jsonl"
    lines = [line for line in src.read_text().splitlines(keepends=True) if line.strip()]
    train = tmp_path / "harmless_train.jsonl"
    train.write_text("".join(lines * 2))  # every opening twice: a cut that splits one would show
    openings = sorted({hh_opening(line) for line in lines})
    assert len(openings) >= 3
    fit, dev = hhh_dev.dev_cut(train, tmp_path, 2, seed=7, exclude=frozenset(openings[:1]))
    fit_keys, dev_keys = ({hh_opening(x) for x in p.read_text().splitlines()} for p in (fit, dev))
    assert dev_keys and not fit_keys & dev_keys and openings[0] in fit_keys
    assert len(dev.read_text().splitlines()) >= 2
    assert sorted(fit.read_text().splitlines() + dev.read_text().splitlines()) == sorted(train.read_text().splitlines())
    with pytest.raises(SystemExit):  # the candidates' syntax is hhh_efficacy's objectives
        hhh_efficacy.parser(data="samples").parse_args(["--harm-objective", "ipo"])


def test_length_contest_reports_the_margin_length_correlation():
    # every token costs 2 nats: the margin is 2 x (rejected - chosen) tokens, r = 1; margins +20,
    # -40, 0 and -4: one pair of four is ranked wrong by less than 10 nats
    tokens = [[10, 20], [30, 10], [15, 15], [10, 8]]
    result = {"hh_items": [{"c": -2.0 * c, "r": -2.0 * r} for c, r in tokens], "hh_tokens": tokens}
    text = hhh_dev.length_contest(result)
    assert "Pearson r = 1.000" in text and "less than 10 nats: 0.250" in text


def test_router_dev_cut_comes_from_the_training_side_only(tmp_path):
    """--choose router cuts its dev prompts out of the efficacy run's TRAINING files with the code
    that made the efficacy split: dev and fit share no prompt, and no dev prompt is an evaluation
    prompt."""
    import csv
    import json

    from trinityx_ds.experiments.samples import fixture_samples, split_samples, text_key

    samples = fixture_samples(tmp_path / "samples", repeat_questions=2)
    split = split_samples(samples, tmp_path / "split", 3, 4, 3, seed=1)
    root = hhh_dev.training_side(split, tmp_path / "training_side")
    dev = split_samples(root, tmp_path / "dev", 2, 2, 2, seed=3)

    def tqa(path):
        with open(path, encoding="utf-8-sig", newline="") as f:
            return {text_key(r["Question"]) for r in csv.DictReader(f)}

    def hh(path):
        return {hh_opening(x) for x in Path(path).read_text().splitlines() if x.strip()}

    def alpaca(path):
        return {text_key(r["instruction"]) for r in json.loads(Path(path).read_text())}

    for name, keys in (("tqa", tqa), ("hh", hh), ("alpaca", alpaca)):
        fit, cut, held = keys(dev[f"{name}_train"]), keys(dev[f"{name}_eval"]), keys(split[f"{name}_eval"])
        assert cut and fit and not fit & cut and not cut & held, name
        assert fit | cut == keys(split[f"{name}_train"]), name  # the training side, all of it, once


def test_gap_attribution_splits_the_gap_by_routing_share():
    """tools/gap_attribution.py's arithmetic on tokens whose answers are known: the gap of tokens
    routed right in every layer, in some, in none; splicing the expert's log-probs in."""
    import numpy as np

    from trinityx_ds.experiments import gaps as gap_attribution

    a = {"routed": np.array([-1.0, -2.0, -3.0]), "expert": np.array([-1.0, -1.5, -2.0]),
         "backbone": np.array([-1.2, -2.0, -2.5]), "s": np.array([1.0, 0.5, 0.0])}
    b = {"routed": np.array([-0.5]), "expert": np.array([-0.7]), "backbone": np.array([-0.5]), "s": np.array([1.0])}
    # gaps routed - expert: 0, -0.5, -1.0 and +0.2; summed -1.3
    rows = {g: (share, mean, part) for g, share, mean, part in gap_attribution.by_share([a, b])}
    assert rows["s = 1"] == pytest.approx((0.5, 0.1, -0.2 / 1.3))
    assert rows["0 < s < 1"] == pytest.approx((0.25, -0.5, 0.5 / 1.3))
    assert rows["s = 0"] == pytest.approx((0.25, -1.0, 1.0 / 1.3))
    # routing fixed: the expert's log-probs wherever s < 1, TrinityX's where every layer chose the expert
    assert gap_attribution.splice(a, lambda s: s == 1) == pytest.approx(-1.0 - 1.5 - 2.0)
    assert gap_attribution.splice(a, lambda s: s < 1) == pytest.approx(-1.0 - 2.0 - 3.0)
    lines = gap_attribution.help_report([a, b], resamples=50)
    assert "TrinityX -1.2500, help expert -1.1000, backbone -1.2000" in lines[0], lines[0]
    assert "  | s = 0 | 0.250 | -1.0000 | 0.769 |" in lines
    q = {"true": [a], "false": [b]}
    lines = gap_attribution.honest_report([q], resamples=50)
    # MC2 = p(true) / (p(true) + p(false)) with p = exp(summed log-prob)
    mc2 = np.exp(-6.0) / (np.exp(-6.0) + np.exp(-0.5))
    assert f"TrinityX {mc2:.4f}" in lines[0]
    # |log p_honest - log p_backbone| = 0.2, 0.5, 0.5, 0.2: the weighted share (0.2 + 0.25 + 0 + 0.2) / 1.4
    assert f"weighted by |log p_honest - log p_backbone| {0.65 / 1.4:.3f}" in lines[4], lines[4]
