"""Calibration metrics of a predicted distribution over classes (the router's task prediction).

Everything is computed in float64: ECE is a small difference of averages, and float32 sums over a
large held-out set would move it in the third decimal.
"""
from __future__ import annotations

from typing import Literal

import torch

Binning = Literal["width", "mass"]


def as_tables(probs_NC, labels_N) -> tuple[torch.Tensor, torch.Tensor]:
    probs_NC = torch.as_tensor(probs_NC, dtype=torch.float64)
    labels_N = torch.as_tensor(labels_N, dtype=torch.long)
    if probs_NC.ndim != 2 or labels_N.shape != probs_NC.shape[:1] or probs_NC.shape[0] == 0:
        raise ValueError(f"need probs [N, C] and labels [N] with N > 0, got {tuple(probs_NC.shape)} "
                         f"and {tuple(labels_N.shape)}")
    if labels_N.min() < 0 or labels_N.max() >= probs_NC.shape[1]:
        raise ValueError(f"labels must lie in 0..{probs_NC.shape[1] - 1}")
    # logits passed by mistake would give plausible-looking but meaningless numbers
    if (probs_NC < 0).any() or not torch.allclose(probs_NC.sum(1), torch.ones(1, dtype=torch.float64), atol=1e-4):
        raise ValueError("probs rows must be probability distributions (>= 0, summing to 1)")
    return probs_NC, labels_N


def bin_ids(conf_N: torch.Tensor, n_bins: int, binning: Binning) -> tuple[torch.Tensor, torch.Tensor]:
    """Bin index of each example, and the bins' [lower, upper] edges [B, 2]."""
    if n_bins < 1:
        raise ValueError(f"n_bins={n_bins} must be >= 1")
    if binning == "width":
        # i / B, not linspace: edges then equal the decimal literals (0.3, not 0.30000000000000004)
        edges_B1 = torch.arange(n_bins + 1, dtype=torch.float64) / n_bins
        # right-closed bins (lo, hi], the first one also holding 0
        ids_N = torch.bucketize(conf_N, edges_B1[1:-1], right=False)
        return ids_N, torch.stack([edges_B1[:-1], edges_B1[1:]], 1)
    if binning == "mass":
        # equal-count bins over the sorted confidences (sizes differ by at most one); edges are the
        # smallest and largest confidence in each bin
        order_N = torch.sort(conf_N, stable=True).indices
        ids_N = torch.empty_like(order_N)
        edges = []
        for b, chunk in enumerate(torch.tensor_split(order_N, n_bins)):
            ids_N[chunk] = b
            c = conf_N[chunk]
            edges.append([c.min(), c.max()] if len(chunk) else [float("nan")] * 2)
        return ids_N, torch.tensor(edges, dtype=torch.float64)
    raise ValueError(f"binning={binning!r}: 'width' or 'mass'")


def reliability_table(probs_NC, labels_N, n_bins: int = 10, binning: Binning = "width") -> list[dict]:
    """Per bin: lower, upper, count, accuracy, confidence (None for an empty bin)."""
    probs_NC, labels_N = as_tables(probs_NC, labels_N)
    conf_N, pred_N = probs_NC.max(1)
    correct_N = (pred_N == labels_N).double()
    ids_N, edges_B2 = bin_ids(conf_N, n_bins, binning)
    count_B = torch.bincount(ids_N, minlength=n_bins).double()
    acc_B = torch.bincount(ids_N, correct_N, minlength=n_bins) / count_B.clamp(min=1)
    conf_B = torch.bincount(ids_N, conf_N, minlength=n_bins) / count_B.clamp(min=1)
    return [dict(lower=float(lo), upper=float(hi), count=int(n),
                 accuracy=float(a) if n else None, confidence=float(c) if n else None)
            for (lo, hi), n, a, c in zip(edges_B2.tolist(), count_B.tolist(), acc_B.tolist(), conf_B.tolist())]


def _gaps(table: list[dict]) -> list[tuple[int, float]]:
    return [(b["count"], abs(b["accuracy"] - b["confidence"])) for b in table if b["count"]]


def ece(probs_NC, labels_N, n_bins: int = 10, binning: Binning = "width") -> float:
    """Expected calibration error: sum_b |B_b|/N * |acc_b - conf_b|, confidence = max prob."""
    gaps = _gaps(reliability_table(probs_NC, labels_N, n_bins, binning))
    return sum(n * g for n, g in gaps) / sum(n for n, _ in gaps)


def mce(probs_NC, labels_N, n_bins: int = 10, binning: Binning = "width") -> float:
    """Maximum calibration error: the largest |acc_b - conf_b| over non-empty bins."""
    return max(g for _, g in _gaps(reliability_table(probs_NC, labels_N, n_bins, binning)))


def brier(probs_NC, labels_N) -> float:
    """Multi-class Brier score: mean over examples of sum_c (p_c - y_c)^2 (range 0..2)."""
    probs_NC, labels_N = as_tables(probs_NC, labels_N)
    onehot_NC = torch.nn.functional.one_hot(labels_N, probs_NC.shape[1]).double()
    return float(((probs_NC - onehot_NC) ** 2).sum(1).mean())


def nll(probs_NC, labels_N) -> float:
    """Mean -log p(label). A zero probability costs -log(float64 tiny) ~ 708, not inf, so reports
    stay valid JSON."""
    probs_NC, labels_N = as_tables(probs_NC, labels_N)
    p_N = probs_NC.gather(1, labels_N[:, None]).squeeze(1)
    return float(-p_N.clamp(min=torch.finfo(torch.float64).tiny).log().mean())


def calibration_report(probs_NC, labels_N, n_bins: int = 10) -> dict:
    """All metrics as plain floats (JSON-ready); ECE in both binnings, equal-width table."""
    probs_NC, labels_N = as_tables(probs_NC, labels_N)
    return {
        "n": int(labels_N.numel()),
        "accuracy": float((probs_NC.argmax(1) == labels_N).double().mean()),
        "ece": ece(probs_NC, labels_N, n_bins, "width"),
        "ece_mass": ece(probs_NC, labels_N, n_bins, "mass"),
        "mce": mce(probs_NC, labels_N, n_bins, "width"),
        "brier": brier(probs_NC, labels_N),
        "nll": nll(probs_NC, labels_N),
        "reliability": reliability_table(probs_NC, labels_N, n_bins, "width"),
    }
