"""Calibrated router of the MoCaE block: p = softmax(z(h) / T + log gamma), then top-k.

The router runs in fp32 whatever the model dtype: a bf16 softmax over a few experts is coarse
enough to flip top-k decisions and to bias the calibration the temperature is fitted for.
"""

from __future__ import annotations

import contextlib

import math
from typing import Callable, Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

TemperatureMode = Literal["fixed", "learnable", "fitted"]


class RouterOutput(NamedTuple):
    logits_TE: torch.Tensor  # raw z(h), fp32 (z-loss, metrics)
    probs_TE: torch.Tensor  # full calibrated distribution (regularisers, metrics)
    topk_idx_TK: torch.Tensor  # chosen experts, long, best first
    topk_weight_TK: torch.Tensor  # combine weights: chosen probs, renormalised if asked


class CalibratedRouter(nn.Module):
    """Per-token routing over `num_experts` experts with temperature and importance priors.

    temperature_mode: "fixed" keeps T as given; "learnable" trains log T; "fitted" keeps T fixed
    during training and lets calibration code write it afterwards with `set_temperature`.
    importance: gamma_e > 0, added as log-priors (None: all 1, no prior).
    top_k: experts per token; `num_experts` (or "all") routes densely.
    The weight starts at zero (init_std=0) so routing starts neutral: p = normalised gamma.
    """

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        *,
        temperature: float = 0.7,
        temperature_mode: TemperatureMode = "fixed",
        importance: list[float] | None = None,
        top_k: int | Literal["all"] = 1,
        renormalize: bool = True,
        bias: bool = False,
        init_std: float = 0.0,
    ):
        super().__init__()
        top_k = num_experts if top_k == "all" else top_k
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k={top_k} must be in 1..{num_experts}")
        if temperature <= 0:
            raise ValueError(f"temperature={temperature} must be > 0")
        if temperature_mode not in ("fixed", "learnable", "fitted"):
            raise ValueError(f"temperature_mode={temperature_mode!r}: fixed, learnable or fitted")
        gamma = [1.0] * num_experts if importance is None else list(importance)
        if len(gamma) != num_experts or min(gamma) <= 0:
            raise ValueError(f"importance={importance}: one weight > 0 per expert ({num_experts})")
        self.num_experts, self.top_k, self.renormalize = num_experts, top_k, renormalize
        self.temperature_mode = temperature_mode

        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size, dtype=torch.float32))
        self.bias = nn.Parameter(torch.zeros(num_experts)) if bias else None
        self.init_std = init_std
        self.reset_parameters()
        # Shape [1], never 0-dim: DeepSpeed's parameter broadcast crashes on 0-dim tensors.
        log_t = torch.full((1,), math.log(temperature))
        if temperature_mode == "learnable":
            self.log_temperature = nn.Parameter(log_t)
        else:
            self.register_buffer("log_temperature", log_t)
        self.register_buffer("log_importance", torch.tensor(gamma, dtype=torch.float32).log())

    def reset_parameters(self) -> None:
        if self.init_std > 0:
            nn.init.normal_(self.weight, std=self.init_std)
        else:
            nn.init.zeros_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def _apply(self, fn, recurse=True):
        """Follow device moves but not dtype casts: model.bfloat16() (Megatron's Float16Module,
        DeepSpeed's bf16 engine) must leave the router, its temperature and priors in fp32."""

        def keep_fp32(t):
            out = fn(t)
            return out.float() if out.is_floating_point() else out

        return super()._apply(keep_fp32, recurse)

    @property
    def temperature(self) -> float:
        return self.log_temperature.exp().item()

    @torch.no_grad()
    def set_temperature(self, temperature: float) -> None:
        """Write T (e.g. fitted on held-out data after training)."""
        if temperature <= 0:
            raise ValueError(f"temperature={temperature} must be > 0")
        self.log_temperature.fill_(math.log(temperature))

    def forward(self, h_TH: torch.Tensor, shared: Callable[[torch.Tensor], torch.Tensor] | None = None) -> RouterOutput:
        """Route tokens h_TH [T, H] (leading dims, if any, are flattened into T).

        shared: applied to each parameter before use. Under sequence parallelism each TP rank routes
        only its own tokens, so the gradient it computes for the (replicated) router is a partial
        sum; the MoCaE block passes parallel/sequence.py's `sum_grad_over_tp` here, whose backward
        all-reduces it over TP, so every rank holds the whole gradient before any optimizer sees it.
        """
        h_TH = h_TH.reshape(-1, h_TH.shape[-1]).float()
        p = shared or (lambda t: t)  # noqa: E731
        # autocast would run the projection in bf16 again
        # (meta tensors have no autocast: shapes-only builds, plan/verify.py and tests/devices.py)
        no_autocast = (torch.autocast(h_TH.device.type, enabled=False) if h_TH.device.type != "meta"
                       else contextlib.nullcontext())
        with no_autocast:
            logits_TE = F.linear(h_TH, p(self.weight), None if self.bias is None else p(self.bias))
            log_t = p(self.log_temperature) if self.log_temperature.requires_grad else self.log_temperature
            calibrated_TE = logits_TE / log_t.exp() + self.log_importance
            probs_TE = calibrated_TE.softmax(dim=-1)
            # stable sort: among equal probabilities the lowest expert index wins, always
            # (torch.topk does not promise an order for ties; zero-init routing is all ties)
            topk_weight_TK, topk_idx_TK = probs_TE.sort(dim=-1, descending=True, stable=True)
            topk_weight_TK, topk_idx_TK = topk_weight_TK[:, : self.top_k], topk_idx_TK[:, : self.top_k]
            if self.renormalize:
                topk_weight_TK = topk_weight_TK / topk_weight_TK.sum(dim=-1, keepdim=True)
        return RouterOutput(logits_TE, probs_TE, topk_idx_TK, topk_weight_TK)

    def extra_repr(self) -> str:
        return (f"hidden={self.weight.shape[1]}, experts={self.num_experts}, top_k={self.top_k}, "
                f"temperature_mode={self.temperature_mode}, renormalize={self.renormalize}")
