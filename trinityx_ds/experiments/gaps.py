"""Where the fused model loses against each dimension's expert, token by token: the pieces of
tools/gap_attribution.py, whose docstring says what is measured and printed. A token's routing
share s is the fraction of MoCaE layers whose top-1 choice, at the position that predicts it, is
the dimension's expert; the gap is split by s and spliced ("routing fixed") to tell misrouted
tokens from the rest.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM

from trinityx_ds.config.schema import DataSource
from trinityx_ds.data import formats
from trinityx_ds.data.formats import read_source
from trinityx_ds.eval.loglik import Request
from trinityx_ds.eval.metrics import bootstrap, mc2_question
from trinityx_ds.eval.suites import mc_answers
from trinityx_ds.experiments.routing import TokenLevel, run_heldout

def _logprobs(model, ids: list[int], n: int) -> np.ndarray:
    """log p of each of the last n tokens of ids under an HF causal LM [n]."""
    ids_1S = torch.tensor([ids])
    logp_SV = model(ids_1S).logits[0, :-1].double().log_softmax(-1)
    return logp_SV[-n:].gather(1, ids_1S[0, -n:, None])[:, 0].numpy()


def _mean_ci(x: np.ndarray, resamples: int) -> str:
    lo, hi = bootstrap(lambda i: x[i].mean(), len(x), resamples)
    return f"{x.mean():+.4f} [{lo:+.4f}, {hi:+.4f}]"


class Scorer(TokenLevel):
    """Per-token log-probs of a continuation and, routed, each MoCaE layer's top-1 per token."""

    @torch.no_grad()
    def tokens(self, ids: list[int], n: int, force: str | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """(log p of each of the last n tokens [n], top-1 expert per MoCaE layer at the positions
        that predict them [L, n], None when forced)."""
        self.model.config.force_expert = force
        self.top1.clear()
        try:
            lp_N = _logprobs(self.model, ids, n)
        finally:
            self.model.config.force_expert = None
        # position p's routing shapes the prediction of token p + 1
        top1_LN = None if force else torch.stack([t[-n - 1:-1] for t in self.top1]).numpy()
        return lp_N, top1_LN


class Backbone:
    """The run's backbone as an HF model: per-token log-probs of a continuation."""

    def __init__(self, path: str):
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

    @torch.no_grad()
    def tokens(self, ids: list[int], n: int) -> np.ndarray:
        return _logprobs(self.model, ids, n)


def score(scorer: Scorer, backbone: Backbone, ids: list[int], n: int, expert: str, index: int) -> dict:
    routed, top1_LN = scorer.tokens(ids, n)
    return {"routed": routed, "expert": scorer.tokens(ids, n, force=expert)[0], "backbone": backbone.tokens(ids, n),
            "s": (top1_LN == index).mean(0)}


def requests(run: Path, n_tqa: int, n_help: int):
    """(Alpaca Requests, TruthfulQA items with their correct and incorrect answers) from the run's
    held-out files."""
    paths = run_heldout(run)
    if paths is None:
        raise SystemExit(f"{run}: its config lists no held-out TruthfulQA, HH-RLHF and Alpaca files "
                         "(data.heldout, as tools/hhh_efficacy.py writes them)")
    recs, _ = read_source(DataSource(paths["alpaca_eval"], "alpaca", split="validation"), "help", "skip")
    help_reqs = [Request(r["messages"][:-1], r["messages"][-1]["content"]) for r in recs][:n_help]
    items, _ = formats.truthfulqa_mc(paths["tqa_eval"], max_rows=n_tqa, on_malformed="skip")
    return help_reqs, [(it.question, *mc_answers(it)) for it in items]


def splice(item: dict, keep_routed) -> float:
    """Summed log-prob with TrinityX's per-token values where keep_routed(s) holds, the expert's elsewhere."""
    return float(np.where(keep_routed(item["s"]), item["routed"], item["expert"]).sum())


def by_share(tokens: list[dict]) -> list[tuple[str, float, float, float]]:
    """(group, share of tokens, mean gap routed - expert, share of the summed gap) for s = 1, 0 < s < 1, s = 0."""
    s = np.concatenate([t["s"] for t in tokens])
    gap = np.concatenate([t["routed"] - t["expert"] for t in tokens])
    total = gap.sum()
    rows = []
    for name, mask in (("s = 1", s == 1), ("0 < s < 1", (s > 0) & (s < 1)), ("s = 0", s == 0)):
        rows.append((name, mask.mean(), gap[mask].mean() if mask.any() else float("nan"),
                     gap[mask].sum() / total if total else float("nan")))
    return rows


def help_report(items: list[dict], resamples: int) -> list[str]:
    n = np.array([len(it["s"]) for it in items], float)
    fig = {k: np.array([it[k].sum() for it in items]) / n for k in ("routed", "expert", "backbone")}
    fixed = np.array([splice(it, lambda s: s == 1) for it in items]) / n
    only = np.array([splice(it, lambda s: s < 1) for it in items]) / n

    lines = [f"help: {len(items)} Alpaca reference responses, {int(n.sum())} tokens; help ll/token: TrinityX "
             f"{fig['routed'].mean():.4f}, help expert {fig['expert'].mean():.4f}, backbone {fig['backbone'].mean():.4f}",
             f"  gap TrinityX - help expert: {_mean_ci(fig['routed'] - fig['expert'], resamples)}",
             "  routing fixed (the expert's log-probs on tokens with s < 1): "
             f"{_mean_ci(fixed - fig['expert'], resamples)}",
             "  only the misrouted tokens' gap (the expert's log-probs on tokens with s = 1): "
             f"{_mean_ci(only - fig['expert'], resamples)}",
             "  | tokens | share | mean gap (nats) | share of the gap |", "  |---|---|---|---|"]
    lines += [f"  | {g} | {a:.3f} | {b:+.4f} | {c:.3f} |" for g, a, b, c in by_share(items)]
    return lines


def honest_report(questions: list[dict], resamples: int) -> list[str]:
    def mc2(get) -> np.ndarray:
        return np.array([mc2_question([get(o) for o in q["true"]], [get(o) for o in q["false"]]) for q in questions])

    fig = {k: mc2(lambda o, k=k: float(o[k].sum())) for k in ("routed", "expert", "backbone")}
    fixed = mc2(lambda o: splice(o, lambda s: s == 1))
    only = mc2(lambda o: splice(o, lambda s: s < 1))
    options = [o for q in questions for o in q["true"] + q["false"]]
    s = np.concatenate([o["s"] for o in options])
    delta = np.abs(np.concatenate([o["expert"] - o["backbone"] for o in options]))

    top = delta >= np.quantile(delta, 0.9)
    lines = [f"honest: {len(questions)} TruthfulQA questions, {len(options)} answer options, {len(s)} tokens; MC2: "
             f"TrinityX {fig['routed'].mean():.4f}, honest expert {fig['expert'].mean():.4f}, backbone "
             f"{fig['backbone'].mean():.4f}",
             f"  gap TrinityX - honest expert: {_mean_ci(fig['routed'] - fig['expert'], resamples)}",
             "  routing fixed (the expert's log-probs on tokens with s < 1): "
             f"{_mean_ci(fixed - fig['expert'], resamples)}",
             "  only the misrouted tokens' gap (the expert's log-probs on tokens with s = 1): "
             f"{_mean_ci(only - fig['expert'], resamples)}",
             f"  honest share s: mean {s.mean():.3f}; weighted by |log p_honest - log p_backbone| "
             f"{(s * delta).sum() / delta.sum():.3f}; on the 10% of tokens the expert changes most {s[top].mean():.3f}",
             "  | tokens | share | mean gap (nats) | share of the gap |", "  |---|---|---|---|"]
    lines += [f"  | {g} | {a:.3f} | {b:+.4f} | {c:.3f} |" for g, a, b, c in by_share(options)]
    return lines
