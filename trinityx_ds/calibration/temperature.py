"""Temperature scaling of the router: one scalar T per router, fitted on held-out labelled data.

The router computes p = softmax(z / T + log gamma) with fixed importance priors gamma, so the fit
takes the same `log_prior_C` and calibrates exactly that expression. The NLL is convex in 1/T, hence
unimodal in log T: a golden-section search over a bounded log T interval finds the optimum
deterministically, with no learning rate or initial guess to tune.
"""
from __future__ import annotations

import math

import torch

_INV_PHI = (math.sqrt(5) - 1) / 2


def calibrated_probs(logits_NC, temperature: float, log_prior_C=None) -> torch.Tensor:
    """softmax(logits / T + log_prior), float64: the router's calibrated distribution."""
    z_NC = torch.as_tensor(logits_NC, dtype=torch.float64) / temperature
    if log_prior_C is not None:
        z_NC = z_NC + torch.as_tensor(log_prior_C, dtype=torch.float64)
    return z_NC.softmax(-1)


def fit_temperature(logits_NC, labels_N, log_prior_C=None, t_min: float = 1e-2, t_max: float = 1e2,
                    tol: float = 1e-8) -> float:
    """T in [t_min, t_max] minimising the NLL of softmax(logits / T + log_prior) on the labels.

    An optimum at a bound means the data asks for T -> 0 or T -> inf (e.g. a held-out set the
    router gets entirely right, or constant logits); the bound is returned as is.
    """
    z_NC = torch.as_tensor(logits_NC, dtype=torch.float64)
    labels_N = torch.as_tensor(labels_N, dtype=torch.long)
    if z_NC.ndim != 2 or labels_N.shape != z_NC.shape[:1] or z_NC.shape[0] == 0:
        raise ValueError(f"need logits [N, C] and labels [N], got {tuple(z_NC.shape)} and {tuple(labels_N.shape)}")
    prior_C = torch.zeros(z_NC.shape[1], dtype=torch.float64) if log_prior_C is None else \
        torch.as_tensor(log_prior_C, dtype=torch.float64)
    z_label_N = z_NC.gather(1, labels_N[:, None]).squeeze(1)
    prior_label_N = prior_C[labels_N]

    def loss(log_t: float) -> float:
        beta = math.exp(-log_t)
        lse_N = torch.logsumexp(z_NC * beta + prior_C, 1)
        return float((lse_N - z_label_N * beta - prior_label_N).mean())

    lo, hi = math.log(t_min), math.log(t_max)
    a, b = hi - _INV_PHI * (hi - lo), lo + _INV_PHI * (hi - lo)
    fa, fb = loss(a), loss(b)
    while hi - lo > tol:
        if fa <= fb:  # the minimum lies in [lo, b]
            hi, b, fb = b, a, fa
            a = hi - _INV_PHI * (hi - lo)
            fa = loss(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + _INV_PHI * (hi - lo)
            fb = loss(b)
    return math.exp((lo + hi) / 2)


def fit_per_layer(logits_LNC, labels_N, log_prior=None, **kw) -> list[float]:
    """One T per router layer, all on the same labels. log_prior: None, [C] shared, or [L, C]."""
    logits_LNC = torch.as_tensor(logits_LNC, dtype=torch.float64)
    if logits_LNC.ndim != 3:
        raise ValueError(f"need logits [L, N, C], got {tuple(logits_LNC.shape)}")
    priors = [None] * len(logits_LNC) if log_prior is None else \
        torch.as_tensor(log_prior, dtype=torch.float64).expand(logits_LNC.shape[0], logits_LNC.shape[2])
    return [fit_temperature(z_NC, labels_N, prior_C, **kw) for z_NC, prior_C in zip(logits_LNC, priors)]
