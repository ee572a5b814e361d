"""experiments/samples.py and experiments/heldout.py: the prompt-disjoint cut of real samples, the per-item figures, and the paired
bootstrap the demo's HHH report and tools/hhh_efficacy.py print."""
import csv
import json
from pathlib import Path

import numpy as np
import pytest

from trinityx_ds.data.formats import hh_rlhf_pairs
from trinityx_ds.eval.metrics import bootstrap
from trinityx_ds.experiments.heldout import figures, per_item, side_by_side, significantly_negative
from trinityx_ds.experiments.samples import fixture_samples, hh_opening, split_samples

FIX = Path(__file__).resolve().parents[2] / "trinityx_ds" / "fixtures" / "data"
SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"


def _result(tqa, hh, help_ll, hh_tokens=None, help_tokens=None):
    return {"tqa_items": [{"mc1": a, "mc2": b} for a, b in tqa], "hh_items": [{"c": c, "r": r} for c, r in hh],
            "hh_tokens": hh_tokens or [[1, 1]] * len(hh), "help_items": help_ll,
            "help_tokens": help_tokens or [1] * len(help_ll)}


def test_figures_are_item_means_with_paired_differences():
    rng = np.random.default_rng(0)
    n = 60
    base_mc2 = rng.uniform(0.2, 0.8, n)
    fused_mc2 = base_mc2 + 0.02 + rng.normal(0, 0.01, n)  # a small, consistent gain on every question
    hh_b = [(float(c), float(c - 1 + rng.normal())) for c in rng.normal(-20, 5, n)]
    hh_f = [(c + 0.5, r) for c, r in hh_b]  # chosen up by 0.5 nats on every pair
    res = {"backbone": _result(list(zip([0.0] * n, base_mc2)), hh_b, list(-2.0 * np.arange(1, n + 1)),
                               help_tokens=list(range(1, n + 1))),
           "trinityx": _result(list(zip([1.0] * n, fused_mc2)), hh_f, list(-1.9 * np.arange(1, n + 1)),
                               help_tokens=list(range(1, n + 1)))}
    table = figures(res, resamples=500)
    b, f = table["backbone"]["rows"], table["trinityx"]["rows"]
    assert b["MC2"]["value"] == pytest.approx(base_mc2.mean()) and f["MC1"]["value"] == 1.0
    assert f["MC2"]["diff"] == pytest.approx((fused_mc2 - base_mc2).mean())
    assert b["help ll/token"]["value"] == pytest.approx(-2.0) and f["help ll/token"]["diff"] == pytest.approx(0.1)
    assert f["harmless margin"]["diff"] == pytest.approx(0.5)
    assert b["harmless acc (vs backbone)"]["value"] == 0.5 and f["harmless acc (vs backbone)"]["value"] == 1.0
    assert "diff" not in b["MC2"] and table["trinityx"]["n"]["MC2"] == n
    # pairing: the two intervals overlap, the paired difference's interval is above 0 and narrow
    lo, hi = f["MC2"]["diff_ci"]
    assert 0 < lo < f["MC2"]["diff"] < hi and hi - lo < 0.2 * (b["MC2"]["ci"][1] - b["MC2"]["ci"][0])
    assert f["MC2"]["ci"][0] < b["MC2"]["ci"][1]
    assert significantly_negative(table, ["MC2", "harmless margin"]) == []
    worse = figures({"backbone": res["trinityx"], "trinityx": res["backbone"]}, resamples=500)
    assert significantly_negative(worse, ["MC2", "harmless margin", "MC1"]) == \
        ["trinityx MC2", "trinityx harmless margin", "trinityx MC1"]
    text = side_by_side(table, ["backbone", "trinityx"], ["MC2", "harmless margin"])
    assert "MC2 (n=60)" in text and f"+{f['MC2']['diff']:.3f} [+{lo:.3f}, +{hi:.3f}]" in text


def test_length_normalised_accuracy_divides_by_response_tokens():
    # chosen -6 over 3 tokens (-2/token) vs rejected -4 over 1 token: raw prefers rejected, per token chosen
    items = per_item(_result([(0.0, 0.5)], [(-6.0, -4.0)], [-1.0], hh_tokens=[[3, 1]]), _result([(0.0, 0.5)], [(-6.0, -4.0)], [-1.0]))
    assert items["harmless acc"][0] == 0.0 and items["harmless acc (len-norm)"][0] == 1.0


def test_bootstrap_interval_covers_the_mean_and_shrinks_with_n():
    x_small, x_large = np.tile([0.0, 1.0], 10), np.tile([0.0, 1.0], 1000)
    lo_s, hi_s = bootstrap(lambda i: x_small[i].mean(), len(x_small))
    lo_l, hi_l = bootstrap(lambda i: x_large[i].mean(), len(x_large))
    assert lo_s < 0.5 < hi_s and lo_l < 0.5 < hi_l and (hi_l - lo_l) < 0.25 * (hi_s - lo_s)


def _check_split(paths: dict, n_tqa: int, n_hh: int, n_help: int, exclude: frozenset = frozenset()):
    def questions(p):
        with open(p, encoding="utf-8-sig", newline="") as f:
            return [" ".join(r["Question"].split()).casefold() for r in csv.DictReader(f)]

    tq_train, tq_eval = questions(paths["tqa_train"]), questions(paths["tqa_eval"])
    # whole questions until >= n_tqa rows (the fixture layout holds each question twice)
    assert n_tqa <= len(tq_eval) <= n_tqa + 1 and not set(tq_train) & set(tq_eval)
    hh_train, hh_eval = ([hh_opening(line) for line in paths[f"hh_{p}"].read_text().splitlines()] for p in ("train", "eval"))
    assert len(hh_eval) >= n_hh and not set(hh_train) & set(hh_eval) and not set(hh_eval) & exclude
    al_train, al_eval = (json.loads(paths[f"alpaca_{p}"].read_text()) for p in ("train", "eval"))
    assert len(al_eval) == n_help and not {r["instruction"] for r in al_train} & {r["instruction"] for r in al_eval}
    pairs, _ = hh_rlhf_pairs(str(paths["hh_eval"]), on_malformed="skip")
    assert pairs


def test_split_samples_is_by_prompt_on_the_fixture_layout(tmp_path):
    data = fixture_samples(tmp_path / "samples", repeat_questions=2)
    keep = frozenset({hh_opening((FIX / "hh_rlhf_tiny.jsonl").read_text().splitlines()[0])})
    paths = split_samples(data, tmp_path / "split", 5, 4, 4, seed=3, hh_exclude=keep)
    _check_split(paths, 5, 4, 4, keep)
    again = split_samples(data, tmp_path / "split2", 5, 4, 4, seed=3, hh_exclude=keep)
    assert all(paths[k].read_bytes() == again[k].read_bytes() for k in paths)  # seeded: the same cut
    with pytest.raises(FileNotFoundError, match=r"hh_rlhf/harmless-base-test.jsonl.gz: missing"):
        (data / "hh_rlhf/harmless-base-test.jsonl.gz").unlink()
        split_samples(data, tmp_path / "split3", 5, 4, 4, seed=3)


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data (the real samples) is absent on this machine")
def test_split_samples_on_the_real_samples(tmp_path):
    paths = split_samples(SHARED, tmp_path, 150, 200, 50, seed=1234)
    _check_split(paths, 150, 200, 50)


def test_per_token_figures_divide_by_the_tokens_that_were_scored(tmp_path):
    """The help ll/token and the length-normalised accuracy divide a response's log-likelihood by
    the tokens eval/loglik.encode scores: all of a response that fits, max_len of one that alone is
    longer (its prompt cut from the left first)."""
    from types import SimpleNamespace

    from transformers import AutoTokenizer

    from trinityx_ds.experiments.heldout import _n_scored
    from trinityx_ds.eval.loglik import Request
    from trinityx_ds.model.tiny import make_tiny_tokenizer

    tok = AutoTokenizer.from_pretrained(make_tiny_tokenizer(tmp_path / "tok"))
    lm = SimpleNamespace(tokenizer=tok, max_len=32, chat_template="default")

    def n(text):
        return len(tok(text, add_special_tokens=False)["input_ids"])

    short, long_prompt = "a short answer here", [{"role": "user", "content": " ".join(["question"] * 60)}]
    assert 1 < n(short) < 10 and _n_scored(lm, Request(long_prompt, short)) == n(short)
    long = " ".join(["answer"] * 60)
    assert n(long) > 32 and _n_scored(lm, Request([{"role": "user", "content": "hi"}], long)) == 32
    assert _n_scored(lm, Request([{"role": "user", "content": "hi"}], "")) == 1
