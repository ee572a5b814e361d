"""TruthfulQA MC1/MC2, HH-RLHF preference accuracy and win-rate arithmetic, computed by hand."""

import math

import pytest

from trinityx_ds.eval.metrics import Judgement, mc1, mc2, preference_accuracy, win_rate

ln = math.log

# Two questions, log-likelihoods written as ln(probability) so the sums are easy by hand.
# Q1: best answer .2, other correct .1; incorrect .3, .4
# Q2: best answer .5 (only correct one); incorrect .25, .25
MC1_TARGETS = [[ln(0.2), ln(0.3), ln(0.4)],   # best first: .2 < .4 -> 0
               [ln(0.5), ln(0.25), ln(0.25)]]  # .5 > .25 -> 1
MC2_TRUE = [[ln(0.2), ln(0.1)], [ln(0.5)]]
MC2_FALSE = [[ln(0.3), ln(0.4)], [ln(0.25), ln(0.25)]]


def test_mc1_by_hand():
    assert mc1(MC1_TARGETS) == 0.5  # (0 + 1) / 2
    assert mc1([[-1.0, -1.0, -3.0]]) == 0.0  # a tie with an incorrect answer is not a win
    with pytest.raises(ValueError):
        mc1([[-1.0]])


def test_mc2_by_hand():
    # Q1: (.2 + .1) / (.2 + .1 + .3 + .4) = .3; Q2: .5 / (.5 + .25 + .25) = .5; mean .4
    assert mc2(MC2_TRUE, MC2_FALSE) == pytest.approx(0.4)


def test_mc2_is_stable_for_long_answers():
    # exp(-1000) underflows to 0 (the plain formula gives 0/0); masses 1 : 1/3 -> 0.75
    assert mc2([[-1000.0]], [[-1000.0 - ln(3)]]) == pytest.approx(0.75)


def test_preference_accuracy_counts_a_tie_as_not_preferred():
    out = preference_accuracy([-1.0, -2.0, -3.0, -4.0], [-2.0, -2.0, -1.0, -6.0])
    # margins 1, 0 (tie), -2, 2 -> 2 of 4 preferred; mean margin 1/4
    assert out == {"accuracy": 0.5, "mean_margin": 0.25, "n": 4}


def test_win_rate_ties_count_half():
    js = [Judgement("model", 10, 10), ("reference", 10, 10), ("tie", 10, 10), ("model", 10, 10)]
    out = win_rate(js)
    assert out["win_rate"] == 0.625 and out["n"] == 4  # (1 + 0 + .5 + 1) / 4
    assert out["lc_win_rate"] == pytest.approx(0.625, abs=1e-3)  # equal lengths: nothing to control


def test_length_control_removes_a_length_bias():
    # whichever output is longer wins 3 times in 4, and the model is longer in 12 of 16 comparisons:
    # raw (9 + 1) / 16 = .625, but at equal length the two sides are even (logit .75 and .25 average to 0)
    biased = ([("model", 20, 10)] * 9 + [("reference", 20, 10)] * 3
              + [("model", 10, 20)] * 1 + [("reference", 10, 20)] * 3) * 10
    out = win_rate(biased)
    assert out["win_rate"] == 0.625 and out["lc_win_rate"] == pytest.approx(0.5, abs=0.02)
    # longer wins but the model is longer exactly half the time: symmetric, 0.5 either way
    balanced = [("model", 20, 10)] * 6 + [("reference", 10, 20)] * 6 + [("model", 10, 20), ("reference", 20, 10)] * 2
    assert win_rate(balanced) == pytest.approx({"win_rate": 0.5, "lc_win_rate": 0.5, "n": 16})
    with pytest.raises(ValueError, match="winner"):
        win_rate([("draw", 1, 1)])
