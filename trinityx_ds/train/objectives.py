"""Stage 1's preference objectives (experts.objective: dpo | simpo | cpo), on sequence log-probabilities.

The batch holds pairs interleaved (data/dataset.py:collate_pairs): row 2i is pair i's chosen
sequence, row 2i + 1 its rejected one; labels are on the final response's tokens only.

- dpo: TRL's sigmoid loss (DPOTrainer, loss_type="sigmoid"), with cDPO's label smoothing as
  TRL defined it before 1.x: -(1 - ls) log s(b d) - ls log s(-b d), d = [log p(c) - log p_ref(c)]
  - [log p(r) - log p_ref(r)], mean over pairs. At ls = 0 it is TRL 1.16's sigmoid loss exactly
  (the parity test checks it against `DPOTrainer.compute_loss`). The reference is the frozen
  backbone, i.e. the same engine with the expert's delta switched off (RoutingContext.reference),
  computed under no_grad in the same step. Why in the step and not precomputed once per data set
  (TRL's precompute_ref_log_probs): it keeps no state, so resume, resharding and preemption stay
  exactly what they are for SFT, and it costs one forward without backward per step (measured in
  docs/DESIGN.md, "Preference objectives"); a precomputed table would have to be built before step 1 by a full pass over
  the data set, which costs more than the whole run whenever a run sees each pair less than about
  once (every run here).
- simpo: SimPO (Meng et al. 2024; TRL's CPOTrainer with loss_type="simpo", cpo_alpha=0): the
  length-normalised log-probability as the implicit reward, -log s(b (avg log p(c) - avg log p(r))
  - gamma), no reference at all. Chosen over ORPO because its reward is length-normalised: on the
  long-form pairs where the raw log-likelihood becomes a length contest, SimPO's does not, and it
  adds no SFT term that would fight the preference signal on refusals.
- cpo: CPO (Xu et al. 2024; TRL's CPOTrainer with loss_type="sigmoid"): DPO's sigmoid loss on the
  raw sequence log-probabilities with no reference, -log s(b (log p(c) - log p(r))), plus
  `cpo_alpha` times the mean NLL of the chosen responses' tokens (at cpo_alpha = 0 it is DPO with
  a uniform reference, TRL's former `reference_free=True`). Why a third one: DPO moves the
  reward it is given, log p(c) - log p(r) relative to the backbone's, and leaves the raw ranking
  of a pair whose backbone margin is far below 0 where it was; CPO's gradient weights each pair by
  how wrong its raw ranking is, which is what raw preference accuracy counts. It needs no reference
  forward, so a step costs about 60% of a DPO step (docs/RESULTS.md).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from trinityx_ds.config.schema import PREFERENCE_OBJECTIVES


def sequence_logps(token_loss_BS: torch.Tensor, labels_BS: torch.Tensor, average: bool = False) -> torch.Tensor:
    """Per-row log p(response) from the backbone's per-token losses (-log p of each target; 0 or
    ignored where labels < 0): the sum over response tokens, or their mean (`average`)."""
    mask = (labels_BS >= 0).to(token_loss_BS.dtype)
    logp_B = -(token_loss_BS.float() * mask).sum(1)
    return logp_B / mask.sum(1).clamp(min=1) if average else logp_B


def _sigmoid_losses(logits_P: torch.Tensor, beta: float, label_smoothing: float) -> torch.Tensor:
    """Per pair: -(1 - ls) log s(b x) - ls log s(-b x), the loss DPO, SimPO and CPO share."""
    return -F.logsigmoid(beta * logits_P) * (1 - label_smoothing) - F.logsigmoid(-beta * logits_P) * label_smoothing


def dpo_loss(chosen_P: torch.Tensor, rejected_P: torch.Tensor, ref_chosen_P: torch.Tensor,
             ref_rejected_P: torch.Tensor, beta: float, label_smoothing: float = 0.0
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(mean loss, per-pair scalars) of the DPO sigmoid loss; rewards are b (log p - log p_ref)."""
    delta_P = (chosen_P - ref_chosen_P) - (rejected_P - ref_rejected_P)
    losses_P = _sigmoid_losses(delta_P, beta, label_smoothing)
    chosen_reward = beta * (chosen_P - ref_chosen_P).detach()
    rejected_reward = beta * (rejected_P - ref_rejected_P).detach()
    return losses_P.mean(), {"chosen_reward": chosen_reward, "rejected_reward": rejected_reward}


def simpo_loss(chosen_avg_P: torch.Tensor, rejected_avg_P: torch.Tensor, beta: float, gamma: float,
               label_smoothing: float = 0.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(mean loss, per-pair scalars) of SimPO on length-normalised log-probs; rewards are b avg log p."""
    losses_P = _sigmoid_losses(chosen_avg_P - rejected_avg_P - gamma / beta, beta, label_smoothing)
    return losses_P.mean(), {"chosen_reward": beta * chosen_avg_P.detach(),
                             "rejected_reward": beta * rejected_avg_P.detach()}


def cpo_loss(chosen_P: torch.Tensor, rejected_P: torch.Tensor, chosen_nll: torch.Tensor, beta: float,
             alpha: float, label_smoothing: float = 0.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(mean loss, per-pair scalars) of CPO: the sigmoid loss on raw log-probs + alpha x the chosen
    tokens' mean NLL; rewards are b log p."""
    losses_P = _sigmoid_losses(chosen_P - rejected_P, beta, label_smoothing)
    loss = losses_P.mean() + alpha * chosen_nll if alpha else losses_P.mean()
    return loss, {"chosen_reward": beta * chosen_P.detach(), "rejected_reward": beta * rejected_P.detach()}


class Objective:
    """One expert's stage-1 loss on one micro-batch; `stats` are the scalars it logs."""

    def __init__(self, name: str, stage_cfg):
        self.name = name
        self.pairs = name in PREFERENCE_OBJECTIVES
        self.beta = getattr(stage_cfg, "beta", 0.1)
        self.label_smoothing = getattr(stage_cfg, "label_smoothing", 0.0)
        self.gamma = getattr(stage_cfg, "simpo_gamma", 0.5)
        self.cpo_alpha = getattr(stage_cfg, "cpo_alpha", 1.0)

    def needs_reference(self) -> bool:
        return self.name == "dpo"

    def loss(self, token_loss_BS: torch.Tensor, labels_BS: torch.Tensor,
             ref_token_loss_BS: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss to backpropagate and this micro-batch's per-pair means (`<objective>/...`)."""
        average = self.name == "simpo"
        logp_B = sequence_logps(token_loss_BS, labels_BS, average)
        chosen, rejected = logp_B[0::2], logp_B[1::2]
        if self.name == "dpo":
            ref_B = sequence_logps(ref_token_loss_BS, labels_BS)
            loss, r = dpo_loss(chosen, rejected, ref_B[0::2], ref_B[1::2], self.beta, self.label_smoothing)
        elif self.name == "cpo":
            # TRL's NLL term: the token-mean cross-entropy of the chosen half (chosen: its rows' sums)
            nll = -chosen.sum() / (labels_BS[0::2] >= 0).sum().clamp(min=1)
            loss, r = cpo_loss(chosen, rejected, nll, self.beta, self.cpo_alpha, self.label_smoothing)
        else:
            loss, r = simpo_loss(chosen, rejected, self.beta, self.gamma, self.label_smoothing)
        margin = r["chosen_reward"] - r["rejected_reward"]
        p = self.name
        # 0-dim tensors, not floats: train_step reads a step's scalars back in one copy, after backward
        stats = {f"{p}/loss": loss.detach(), f"{p}/reward_accuracy": (margin > 0).float().mean(),
                 f"{p}/reward_margin": margin.detach().mean(), f"{p}/logps_chosen": chosen.detach().mean(),
                 f"{p}/logps_rejected": rejected.detach().mean()}
        return loss, stats
