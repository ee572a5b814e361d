"""The evaluation suites. Each takes an `EvalLM` (or anything with the same methods: the unit tests
pass a stub with fixed log-likelihoods) and returns (summary for report.json, one dict per item
for `<suite>.jsonl`). Every rank runs every suite (the model calls are collective); only rank 0
writes files and asks judges.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from trinityx_ds.calibration.fit import fit_routing
from trinityx_ds.calibration.metrics import as_tables, bin_ids, calibration_report
from trinityx_ds.calibration.plots import reliability_diagram, routing_heatmap
from trinityx_ds.config.schema import DataSource
from trinityx_ds.data import formats
from trinityx_ds.data.dataset import build_task_datasets, heldout_indices
from trinityx_ds.eval import metrics
from trinityx_ds.eval.judge import HFClassifierJudge, make_judge
from trinityx_ds.eval.loglik import Request

SAFE_LABELS = {"safe", "benign", "harmless", "ok", "neutral", "non-toxic", "non_toxic", "not_toxic", "not toxic"}


def is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _unique(texts: list[str]) -> list[str]:
    return list(dict.fromkeys(texts))


def mc_answers(item) -> tuple[list[str], list[str]]:
    """(correct answers, best first; incorrect answers that are not also correct), each once: the
    options MC2 weighs against each other."""
    correct = _unique([item.best_answer, *item.correct])
    return correct, [a for a in _unique(item.incorrect) if a not in correct]


def truthfulqa_mc(lm, path: str, limit: int | None = None) -> tuple[dict, list[dict]]:
    """MC1 (best answer vs incorrect ones) and MC2 (mass on the correct answers, best included), each
    answer scored once as log p(answer | question as the user turn)."""
    items, load = formats.truthfulqa_mc(path, max_rows=limit, on_malformed="skip")
    if not items:
        raise ValueError(f"{path}: no usable TruthfulQA item")
    answers = [_unique([it.best_answer, *it.correct, *it.incorrect]) for it in items]
    requests = [Request([{"role": "user", "content": it.question}], a) for it, a_list in zip(items, answers)
                for a in a_list]
    flat = iter(lm.logprobs(requests, desc="truthfulqa_mc"))
    details, mc1_lls, true_lls, false_lls = [], [], [], []
    for it, a_list in zip(items, answers):
        ll = dict(zip(a_list, flat))
        correct, incorrect = mc_answers(it)
        mc1_lls.append([ll[it.best_answer]] + [ll[a] for a in incorrect])
        true_lls.append([ll[a] for a in correct])
        false_lls.append([ll[a] for a in incorrect])
        details.append({"source": it.source, "question": it.question, "mc1": metrics.mc1_question(mc1_lls[-1]),
                        "mc2": metrics.mc2_question(true_lls[-1], false_lls[-1]), "ll": ll})
    return {"mc1": metrics.mc1(mc1_lls), "mc2": metrics.mc2(true_lls, false_lls), "n": len(items),
            "skipped_rows": len(load.problems), "source": path}, details


def hh_preference(lm, sources: list[tuple[str, str]], limit: int | None = None) -> tuple[dict, list[dict]]:
    """Per named HH-RLHF file: share of pairs with log p(chosen) > log p(rejected) after the shared
    dialogue, and the mean margin."""
    summary, details = {}, []
    for name, path in sources:
        pairs, load = formats.hh_rlhf_pairs(path, max_rows=limit, on_malformed="skip")
        if not pairs:
            raise ValueError(f"{path}: no usable HH-RLHF pair")
        requests = [Request(p.prompt, text) for p in pairs for text in (p.chosen, p.rejected)]
        lls = lm.logprobs(requests, desc=f"hh_preference {name}")
        chosen, rejected = lls[0::2], lls[1::2]
        summary[name] = {**metrics.preference_accuracy(chosen, rejected), "skipped_rows": len(load.problems),
                         "source": path}
        details += [{"set": name, "source": p.source, "ll_chosen": c, "ll_rejected": r}
                    for p, c, r in zip(pairs, chosen, rejected)]
    return summary, details


def heldout_rows(lm, limit: int | None, calib_fraction: float) -> tuple[list[dict], list[int], list[bool]]:
    """The run's held-out examples (its data config and seed), their task labels, and which ones
    form the validation part that T is fitted on (a seeded split per task, like the held-out one)."""
    cfg, names = lm.cfg, lm.moe.expert_names
    sets = build_task_datasets(cfg.data, lm.tokenizer, names, cfg.seed)
    rows, labels, val = [], [], []
    for task, name in enumerate(names):
        held = sets[name][1]
        held = held.select(range(min(len(held), limit))) if limit else held
        val_idx = set(heldout_indices(len(held), calib_fraction, cfg.seed + 1, task)[1])
        rows += [held[i] for i in range(len(held))]
        labels += [task] * len(held)
        val += [i in val_idx for i in range(len(held))]
    return rows, labels, val


def routing(lm, out_dir: Path, limit: int | None = None, calib_fraction: float = 0.5) -> tuple[dict, list[dict]]:
    """Calibration of the router's task prediction on held-out examples, before/after T scaling
    (see calibration/fit.py), with reliability diagram and per-layer routing-share heatmap."""
    if lm.moe is None or lm.moe.num_experts < 2:
        return {"skipped": f"variant {lm.variant} has no router"}, []
    rows, labels, val = heldout_rows(lm, limit, calib_fraction)
    if not rows:
        return {"skipped": "the run's data has no held-out example (data.heldout_fraction: 0)"}, []
    return routing_report(lm, lm.routing(rows), labels, val, out_dir)


def routing_report(lm, stats: list[dict], labels: list[int], val: list[bool], out_dir: Path) -> tuple[dict, list[dict]]:
    """The routing suite from per-example statistics (`EvalLM.routing`), apart so it is testable alone."""
    names = lm.moe.expert_names
    layers, temps, priors = lm.router_state()
    logits_NLE = torch.tensor([s["logits_LE"] for s in stats], dtype=torch.float64)
    probs_NE = torch.tensor([s["probs_LE"] for s in stats], dtype=torch.float64).mean(1)
    top1_LE = torch.tensor([s["top1_LE"] for s in stats], dtype=torch.float64).sum(0)
    labels_N, val_N = torch.tensor(labels), torch.tensor(val)
    share_LE = top1_LE / top1_LE.sum(1, keepdim=True).clamp(min=1)
    # per example, the share of its response tokens (over layers) whose top-1 is each expert
    own_NE = torch.tensor([s["top1_LE"] for s in stats], dtype=torch.float64).sum(1)
    own_NE = own_NE / own_NE.sum(1, keepdim=True).clamp(min=1)
    summary = {"n": len(stats), "experts": names, "layers": layers,
               "routed": calibration_report(probs_NE[~val_N], labels_N[~val_N]),
               "top1_share_by_layer": share_LE.tolist(),
               # what top-1 routing acts on: the mean over a task's examples of that share for its own expert
               "top1_token_accuracy_by_task": {n: own_NE[labels_N == t, t].mean().item()
                                               for t, n in enumerate(names) if (labels_N == t).any()},
               "mean_probs_by_task": {n: probs_NE[labels_N == t].mean(0).tolist()
                                      for t, n in enumerate(names) if (labels_N == t).any()}}
    before, after, y = probs_NE, None, labels_N
    if (logits_NLE == logits_NLE[..., :1]).all():
        summary["fit_skipped"] = "the router's logits are constant (uniform routing): T changes nothing"
    else:
        try:
            fit, (before, after, y) = fit_routing(logits_NLE.transpose(0, 1), labels_N, val_N, temps, priors, layers)
            summary.update(fit)
        except ValueError as e:  # too few held-out examples to split
            summary["fit_skipped"] = str(e)
    # 95% intervals over the test examples, so a routing-accuracy or ECE difference between two
    # routers can be read against its noise like every other figure of the benchmark
    test = [("routed", probs_NE[~val_N], labels_N[~val_N])]
    if "before" in summary:
        test += [("before", before, y), ("after", after, y)]
    summary["intervals"] = {name: calibration_intervals(p, t) for name, p, t in test}
    if is_main():
        summary["figures"] = [reliability_diagram(before, y, Path(out_dir) / "reliability.png",
                                                  f"Router reliability ({lm.variant})", probs_after_NC=after).name,
                              routing_heatmap(share_LE, names, Path(out_dir) / "routing_share.png",
                                              f"Top-1 routing share per layer ({lm.variant})").name]
    details = [{"label": names[t], "validation": v, "probs": p.tolist()}
               for t, v, p in zip(labels, val, probs_NE)]
    return summary, details


def calibration_intervals(probs_NC, labels_N, resamples: int = 2000, seed: int = 0, n_bins: int = 10) -> dict:
    """{"accuracy": [lo, hi], "ece": [lo, hi]}: 95% percentile-bootstrap intervals over the examples
    (eval/metrics.bootstrap, the same resampling as the benchmark's other figures). ECE is a biased
    estimator, and its bootstrap says how far it moves with the sample, not where the true ECE is.

    An example keeps its equal-width bin in every resample (the bin depends on its confidence
    only), so a resample's ECE is sum_b |sum_{i in b} (correct_i - conf_i)| / N: calibration.ece,
    as bincounts, 2000 times in well under a second."""
    probs_NC, labels_N = as_tables(probs_NC, labels_N)
    conf_N, pred_N = probs_NC.max(1)
    correct_N = (pred_N == labels_N).double().numpy()
    gap_N = correct_N - conf_N.numpy()
    bin_N = bin_ids(conf_N, n_bins, "width")[0].numpy()

    def ece_of(i):
        return float(np.abs(np.bincount(bin_N[i], gap_N[i], minlength=n_bins)).sum() / len(i))

    n = len(correct_N)
    return {"accuracy": list(metrics.bootstrap(lambda i: float(correct_N[i].mean()), n, resamples, seed)),
            "ece": list(metrics.bootstrap(ece_of, n, resamples, seed))}


def _split_prompt(messages: list[dict]) -> tuple[list[dict], str]:
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return messages[:last], messages[last]["content"]


def generate(lm, sources: list[tuple[str, str]], judge_cfg: dict | None = None, limit: int | None = None,
             max_new_tokens: int = 64, temperature: float = 0.0, seed: int = 0) -> tuple[dict, list[dict]]:
    """Answers to the prompts of data files (format, path): alpaca (AlpacaEval-style instruction/output),
    beavertails, truthfulqa, ...; the file's response is the reference. Scored when a judge is set."""
    records = []
    for fmt, path in sources:
        recs, _ = formats.read_source(DataSource(path=path, format=fmt, max_rows=limit), "eval", on_malformed="skip")
        records += [(path, *_split_prompt(r["messages"]), r["source"]) for r in recs]
    if not records:
        raise ValueError("generate: no prompt found (pass --prompts FORMAT=PATH)")
    outputs = lm.generate([r[1] for r in records], max_new_tokens, temperature, seed)
    details = [{"file": f, "source": s, "prompt": p, "reference": ref, "output": out}
               for (f, p, ref, s), out in zip(records, outputs)]
    summary = {"n": len(details), "max_new_tokens": max_new_tokens, "temperature": temperature,
               "mean_output_chars": sum(len(o) for o in outputs) / len(outputs)}
    if judge_cfg and is_main():
        summary["judge"] = judge(judge_cfg, details)
    return summary, details


def judge(judge_cfg: dict, details: list[dict]) -> dict:
    """HF classifier: safety rate (top label among `safe_labels`) or mean reward; HTTP: win rate vs references."""
    cfg = dict(judge_cfg)
    safe = cfg.pop("safe_labels", None)
    j = make_judge(cfg)
    instructions = [next((m["content"] for m in reversed(d["prompt"]) if m["role"] == "user"), "") for d in details]
    outputs = [d["output"] for d in details]
    if isinstance(j, HFClassifierJudge):
        scores = j.score(instructions, outputs)
        for d, s in zip(details, scores):
            d["judge"] = s
        if "reward" in scores[0]:
            return {"type": "hf_classifier", "mean_reward": sum(s["reward"] for s in scores) / len(scores)}
        safe = set(safe) if safe else {lab for lab in j.labels if lab.lower() in SAFE_LABELS}
        counts = Counter(s["label"] for s in scores)
        out = {"type": "hf_classifier", "labels": {k: v / len(scores) for k, v in counts.items()}}
        if safe:
            out["safety_rate"] = sum(counts[lab] for lab in safe) / len(scores)
        return out
    judgements = j.judge(instructions, outputs, [d["reference"] for d in details])
    for d, v in zip(details, judgements):
        d["judge"] = v.winner
    return {"type": "http", **metrics.win_rate(judgements), "retries": j.retries}
