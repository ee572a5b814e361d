"""Calibration metrics on hand-computed tables, temperature scaling on a synthetic router, plots."""

import json
import math

import pytest
import torch
from PIL import Image

from trinityx_ds.calibration import (brier, calibrated_probs, calibration_report, ece, fit_per_layer,
                                     fit_temperature, mce, nll, reliability_table)
from trinityx_ds.calibration.plots import reliability_diagram, routing_heatmap

# five examples, two classes: confidence = max prob, correct = argmax == label
PROBS = [[0.95, 0.05],  # conf .95 bin (.9, 1]   correct
         [0.90, 0.10],  # conf .90 bin (.8, .9]  wrong   (.9 sits on an edge: right-closed bins)
         [0.15, 0.85],  # conf .85 bin (.8, .9]  correct
         [0.60, 0.40],  # conf .60 bin (.5, .6]  wrong   (edge again)
         [0.45, 0.55]]  # conf .55 bin (.5, .6]  correct
LABELS = [0, 1, 1, 1, 1]


def test_equal_width_ece_mce_by_hand():
    # bins: (.9,1] n=1 acc 1 conf .95 gap .05; (.8,.9] n=2 acc .5 conf .875 gap .375;
    #       (.5,.6] n=2 acc .5 conf .575 gap .075
    assert ece(PROBS, LABELS) == pytest.approx((1 * 0.05 + 2 * 0.375 + 2 * 0.075) / 5)  # 0.19
    assert mce(PROBS, LABELS) == pytest.approx(0.375)
    table = reliability_table(PROBS, LABELS)
    assert [b["count"] for b in table] == [0, 0, 0, 0, 0, 2, 0, 0, 2, 1]
    assert table[8] == pytest.approx(dict(lower=0.8, upper=0.9, count=2, accuracy=0.5, confidence=0.875))
    assert table[0]["accuracy"] is None


def test_equal_mass_ece_by_hand():
    # sorted confidences .55 .6 .85 | .9 .95: bin 0 acc 2/3 conf 2/3 gap 0; bin 1 acc .5 conf .925 gap .425
    assert ece(PROBS, LABELS, n_bins=2, binning="mass") == pytest.approx(2 * 0.425 / 5)  # 0.17
    table = reliability_table(PROBS, LABELS, n_bins=2, binning="mass")
    assert [(b["lower"], b["upper"], b["count"]) for b in table] == [(0.55, 0.85, 3), (0.9, 0.95, 2)]


def test_brier_nll_and_report_by_hand():
    # sum_c (p_c - y_c)^2 per example: .005, 1.62, .045, .72, .405
    assert brier(PROBS, LABELS) == pytest.approx((0.005 + 1.62 + 0.045 + 0.72 + 0.405) / 5)  # 0.559
    assert nll(PROBS, LABELS) == pytest.approx(-sum(map(math.log, [0.95, 0.10, 0.85, 0.40, 0.55])) / 5)
    report = json.loads(json.dumps(calibration_report(PROBS, LABELS)))
    assert report["accuracy"] == pytest.approx(0.6) and report["n"] == 5
    assert report["ece"] == pytest.approx(0.19) and report["mce"] == pytest.approx(0.375)
    assert len(report["reliability"]) == 10


def test_rejects_logits_and_bad_labels():
    with pytest.raises(ValueError, match="probability"):
        ece([[2.0, -1.0]], [0])
    with pytest.raises(ValueError, match="labels"):
        brier([[0.5, 0.5]], [2])


def synthetic_router(n=20000, c=3, scale=3.0, log_prior=None, seed=0):
    """Labels drawn from softmax(true logits [+ prior]); the router reports true logits x scale."""
    g = torch.Generator().manual_seed(seed)
    true_NC = torch.randn(n, c, generator=g, dtype=torch.float64) * 1.5
    prior_C = torch.zeros(c, dtype=torch.float64) if log_prior is None else torch.tensor(log_prior).double()
    labels_N = torch.multinomial((true_NC + prior_C).softmax(1), 1, generator=g).squeeze(1)
    return true_NC * scale, labels_N


def test_temperature_recovers_overconfidence_and_lowers_ece():
    logits_NC, labels_N = synthetic_router()
    t = fit_temperature(logits_NC, labels_N)
    assert t == pytest.approx(3.0, rel=0.05)
    before, after = ece(logits_NC.softmax(1), labels_N), ece(calibrated_probs(logits_NC, t), labels_N)
    assert before > 0.15 and after < 0.02
    assert nll(calibrated_probs(logits_NC, t), labels_N) < nll(logits_NC.softmax(1), labels_N)


def test_temperature_with_log_prior_calibrates_the_router_expression():
    log_gamma = [0.0, math.log(2.0), math.log(0.5)]
    logits_NC, labels_N = synthetic_router(log_prior=log_gamma, seed=1)
    t = fit_temperature(logits_NC, labels_N, log_prior_C=log_gamma)
    assert t == pytest.approx(3.0, rel=0.05)
    assert ece(calibrated_probs(logits_NC, t, log_gamma), labels_N) < 0.02


def test_per_layer_fit_and_bounds():
    logits_NC, labels_N = synthetic_router()
    layers_LNC = torch.stack([logits_NC, logits_NC / 3 * 0.5])  # over- and under-confident layers
    assert fit_per_layer(layers_LNC, labels_N) == pytest.approx([3.0, 0.5], rel=0.05)
    assert fit_per_layer(layers_LNC, labels_N, log_prior=[0.0, 0.0, 0.0]) == fit_per_layer(layers_LNC, labels_N)
    # a router right on every example wants T -> 0: the lower bound comes back
    separable_NC = torch.nn.functional.one_hot(labels_N[:100], 3).double()
    assert fit_temperature(separable_NC, labels_N[:100], t_min=0.05) == pytest.approx(0.05, rel=1e-6)


def test_plots_write_readable_pngs(tmp_path):
    logits_NC, labels_N = synthetic_router(n=2000)
    before_NC, after_NC = logits_NC.softmax(1), calibrated_probs(logits_NC, 3.0)
    one = reliability_diagram(before_NC, labels_N, tmp_path / "one.png", title="router")
    two = reliability_diagram(before_NC, labels_N, tmp_path / "sub/two.png", probs_after_NC=after_NC)
    heat = routing_heatmap([[0.5, 0.3, 0.2], [0.1, 0.8, 0.1], [0.3, 0.3, 0.4], [0.9, 0.05, 0.05]],
                           ["help", "harm", "honest"], tmp_path / "heat.png")
    # 5x5-inch panels at 100 dpi; heatmap (2.5 + 1.2 E) x (1.5 + 0.4 L) inches
    for path, size in ((one, (500, 500)), (two, (1000, 500)), (heat, (610, 310))):
        assert path.stat().st_size > 5000
        with Image.open(path) as im:
            assert im.format == "PNG" and im.size == size
    with pytest.raises(ValueError, match="names"):
        routing_heatmap([[0.5, 0.5]], ["help"], tmp_path / "bad.png")
