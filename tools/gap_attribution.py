"""Where the fused model loses against each dimension's expert, token by token.

    python tools/gap_attribution.py RUN OUT [--n-tqa 400] [--n-help 100] [--max-len 192]

RUN: a training output dir with LoRA experts and a trained router whose config lists held-out
files (`data.heldout`, as tools/hhh_efficacy.py writes them). OUT: a work folder; RUN is exported
there once as `--format trinityx` (an OUT of tools/route_agreement.py, which holds that export
already, can be given). Items: the first --n-help held-out Alpaca reference responses and every
answer option of the first --n-tqa held-out TruthfulQA questions, rendered as the benchmark
renders them (eval/loglik.encode). For every scored token: its log-probability under TrinityX
(routed), under the dimension's expert alone (the export with `force_expert`: exactly the adapter
on the backbone) and under the backbone (the run's HF model), and s, the share of the MoCaE layers
whose top-1 choice at the position that predicts it is the dimension's expert.

Printed per dimension (help: the Alpaca responses against the help expert; honest: the TruthfulQA
options against the honest expert):

- the benchmark's figure for TrinityX, the expert and the backbone, recomputed here (help ll/token,
  the mean over items of each response's log-likelihood per token; MC2), a check that this is the
  benchmark's own measurement;
- tokens by s (1: the expert in every layer; between; 0: never): their share, the mean log-prob gap
  TrinityX - expert on them, and their share of the summed gap;
- "routing fixed": the figure with the expert's log-probs put in place of TrinityX's on every token
  with s < 1, i.e. what remains is the gap on tokens routed right in every layer (the effect of
  other tokens' routing through attention); and the reverse;
- honest: s's mean weighted by |log p_honest - log p_backbone|, where the honest expert changes an
  answer's probability most, next to its plain mean: whether the router sends to the honest
  expert the tokens its training changed.

Single process, batch 1, fp32 (HF models on the CPU), three forwards per item: 2861 s for 200
questions and 100 responses of SmolLM2-135M on one core (--threads 1). 95% bootstrap intervals over items (questions, responses).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from route_agreement import TokenLevel, run_heldout  # noqa: E402

from trinityx_ds.eval.metrics import bootstrap  # noqa: E402
from trinityx_ds.eval.metrics import mc2_question  # noqa: E402
from trinityx_ds.eval.suites import mc_answers  # noqa: E402


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
    def __init__(self, path: str):
        from transformers import AutoModelForCausalLM

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
    from trinityx_ds.config.schema import DataSource
    from trinityx_ds.data import formats
    from trinityx_ds.data.formats import read_source
    from trinityx_ds.eval.loglik import Request

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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", help="training output dir (LoRA experts, stage 2 done, data.heldout files)")
    p.add_argument("out", help="work folder: the trinityx export (made once), gap_items.json")
    p.add_argument("--n-tqa", type=int, default=400, help="held-out TruthfulQA questions [400]")
    p.add_argument("--n-help", type=int, default=100, help="held-out Alpaca responses [100]")
    p.add_argument("--max-len", type=int, default=192, help="tokens per sequence, as the benchmark [192]")
    p.add_argument("--resamples", type=int, default=2000)
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads [torch's default]; 1 next to other jobs: with more threads than free "
                        "cores each batch-1 forward waits on busy OpenMP threads (here 0.25 s against 4-20 s)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from transformers import AutoTokenizer

    from trinityx_ds.config import load_config
    from trinityx_ds.convert.export import export_hf
    from trinityx_ds.eval.loglik import Request, encode
    from trinityx_ds.storage.layout import RunLayout

    t0, run, out = time.time(), Path(args.run), Path(args.out)
    if not (out / "trinityx").is_dir():
        export_hf(str(run), out / "trinityx", fmt="trinityx")
    cfg = load_config(str(RunLayout(run).run_config_file()), check_paths=False)
    help_reqs, tqa = requests(run, args.n_tqa, args.n_help)
    scorer, backbone = Scorer(out / "trinityx"), Backbone(cfg.model.checkpoint or cfg.model.hf_path)
    tok = AutoTokenizer.from_pretrained(out / "trinityx")
    names = list(scorer.model.config.mocae["expert_names"])

    def one(req, expert):
        ids, n = encode(tok, req, args.max_len)
        return score(scorer, backbone, ids, n, expert, names.index(expert))

    helps = [one(r, "help") for r in help_reqs]
    questions = []
    for q, correct, incorrect in tqa:
        prompt = [{"role": "user", "content": q}]
        questions.append({"true": [one(Request(prompt, a), "honest") for a in correct],
                          "false": [one(Request(prompt, a), "honest") for a in incorrect]})
    (out / "gap_items.json").write_text(json.dumps(
        {"help": [{k: v.tolist() for k, v in it.items()} for it in helps],
         "honest": [{side: [{k: v.tolist() for k, v in o.items()} for o in q[side]] for side in q} for q in questions]}))
    print(f"run {run}; the run's held-out files; 95% bootstrap intervals over items ({args.resamples} resamples)")
    print("\n".join(help_report(helps, args.resamples) + [""] + honest_report(questions, args.resamples)))
    print(f"({time.time() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
