"""What request-level routing (vLLM serving one PEFT adapter per request, picked by `trinityx
route`) gives up against TrinityX's token-level routing, on held-out prompts.

    python tools/route_agreement.py RUN OUT [--data ../shared/data | --fixtures] [--n 40]

RUN: a training output dir with LoRA experts. It is exported into OUT as `--format peft` (what is
served) and `--format trinityx` (the token-level model). The held-out items are the run's own
held-out files (`data.heldout`: its TruthfulQA, HH-RLHF and Alpaca files, which the run refused to
train on), the first `--n` of each; a run without them gets eval/heldout.split_samples's
prompt-disjoint evaluation side of the real samples, or of the project's fixtures (`--fixtures`),
which only a run that did not train on those samples can be measured on. Per item,
rendered as evaluation renders them (eval/loglik.encode: prompt with the chat template, then the
reference response):

(a) agreement: the request-level pick (route's argmax of the mean calibrated probability over the
    prompt's tokens and the MoCaE layers, from the backbone's hidden states) against the majority
    of the token-level top-1 choices of the TrinityX model's routers over the same prompt tokens
    and layers (ties: lowest index);
(b) cost: the reference response's log-likelihood per token with the picked adapter (the TrinityX
    model with that expert forced: exactly the adapter on the backbone, tests/distributed/
    test_peft_export.py) minus with token-level routing (the TrinityX model as trained), summed
    over items and divided by their tokens; negative = request-level routing is worse.

Each figure with a 95% percentile-bootstrap interval over items (eval/metrics.bootstrap).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trinityx_ds.eval.metrics import bootstrap  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


SUITES = (("truthfulqa", "tqa_eval", "truthfulqa"), ("hh_harmless", "hh_eval", "hh_rlhf"), ("alpaca", "alpaca_eval", "alpaca"))


def run_heldout(run: Path) -> dict[str, str] | None:
    """{split key: file} of the run's own held-out files in the three formats, or None."""
    from trinityx_ds.config import load_config
    from trinityx_ds.storage.layout import RunLayout

    cfg = load_config(str(RunLayout(run).run_config_file()), check_paths=False)
    files = {src.format: src.path for sources in cfg.data.heldout.values() for src in sources}
    found = {key: files[fmt] for _, key, fmt in SUITES if fmt in files}
    return found if len(found) == len(SUITES) else None


def held_out_requests(root: Path, run: Path, data: Path | None, n: int, seed: int) -> tuple[dict[str, list], str]:
    """({suite: [Request]}, where they come from): the run's held-out files, else the evaluation
    side of a prompt-disjoint split of `data` (None: the fixtures)."""
    from trinityx_ds.config.schema import DataSource
    from trinityx_ds.data.formats import read_source
    from trinityx_ds.eval.heldout import fixture_samples, split_samples
    from trinityx_ds.eval.loglik import Request

    paths = run_heldout(run)
    where = "the run's data.heldout files"
    if paths is None:
        samples = data if data is not None else fixture_samples(root / "fixture_samples")
        paths = split_samples(samples, root / "split", n, n, n, seed)
        where = f"a prompt-disjoint split of {samples} (seed {seed})"
    out = {}
    for suite, key, fmt in SUITES:
        recs, _ = read_source(DataSource(str(paths[key]), fmt, split="validation"), suite, "skip")
        out[suite] = [Request(r["messages"][:-1], r["messages"][-1]["content"]) for r in recs][:n]
    return out, where


class TokenLevel:
    """The exported TrinityX model: its routers' top-1 per token, and continuation log-likelihoods."""

    def __init__(self, folder: Path):
        from trinityx_ds.convert.hf_model import TrinityXForCausalLM

        self.model = TrinityXForCausalLM.from_pretrained(folder).eval()
        self.top1: list[torch.Tensor] = []
        for m in self.model.modules():
            if type(m).__name__ == "TrinityXRouter":
                m.register_forward_hook(lambda mod, args, out: self.top1.append(out[0][:, 0]))

    @torch.no_grad()
    def loglik(self, ids: list[int], n: int, force: str | None = None) -> float:
        """log p of the last n tokens of ids; `force`: every token to that expert."""
        self.model.config.force_expert = force
        self.top1.clear()
        ids_1S = torch.tensor([ids])
        logp_SV = self.model(ids_1S).logits[0, :-1].double().log_softmax(-1)
        self.model.config.force_expert = None
        return float(logp_SV[-n:].gather(1, ids_1S[0, -n:, None]).sum())

    def majority(self, n_prompt: int, num_experts: int) -> int:
        """Most frequent top-1 over the prompt's tokens and every MoCaE layer of the last forward."""
        counts = torch.bincount(torch.cat([t[:n_prompt] for t in self.top1]), minlength=num_experts)
        return int(counts.argmax())


def measure(out: Path, requests: dict[str, list], max_len: int) -> dict[str, list[dict]]:
    from trinityx_ds.convert.route import RequestRouter
    from trinityx_ds.eval.loglik import encode

    router = RequestRouter(out / "peft")
    tok = TokenLevel(out / "trinityx")
    items = {}
    for suite, reqs in requests.items():
        items[suite] = []
        for r in reqs:
            ids, n = encode(router.tokenizer, r, max_len)
            pick, _ = router.pick(ids[:-n])
            routed = tok.loglik(ids, n)
            majority = router.names[tok.majority(len(ids) - n, len(router.names))]
            items[suite].append({"pick": pick, "majority": majority, "n": n, "routed": routed,
                                 "request": tok.loglik(ids, n, force=pick)})
    return items


def figures(rows: list[dict], resamples: int) -> dict:
    import numpy as np

    agree = np.array([r["pick"] == r["majority"] for r in rows], dtype=float)
    diff, n = np.array([r["request"] - r["routed"] for r in rows]), np.array([r["n"] for r in rows], dtype=float)
    routed = np.array([r["routed"] for r in rows])
    return {"items": len(rows), "tokens": int(n.sum()),
            "agreement": (agree.mean(), bootstrap(lambda i: agree[i].mean(), len(rows), resamples)),
            "ll/token routed": routed.sum() / n.sum(),
            "ll/token cost": (diff.sum() / n.sum(),
                              bootstrap(lambda i: diff[i].sum() / n[i].sum(), len(rows), resamples)),
            "picks": dict(Counter(r["pick"] for r in rows)), "majorities": dict(Counter(r["majority"] for r in rows))}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", help="training output dir (LoRA experts, stage 2 done)")
    p.add_argument("out", help="work folder: the two exports, the split, items.json")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--data", default=str(DATA), help="real samples folder [../shared/data]")
    src.add_argument("--fixtures", action="store_true", help="the project's fixtures instead of real samples")
    p.add_argument("--n", type=int, default=40, help="held-out items per suite [40]")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-len", type=int, default=256)
    p.add_argument("--resamples", type=int, default=2000)
    args = p.parse_args(argv)

    from trinityx_ds.convert.export import export_hf

    t0, out = time.time(), Path(args.out)
    for fmt in ("peft", "trinityx"):
        if not (out / fmt).is_dir():
            export_hf(args.run, out / fmt, fmt=fmt)
    requests, where = held_out_requests(out, Path(args.run), None if args.fixtures else Path(args.data), args.n,
                                        args.seed)
    items = measure(out, requests, args.max_len)
    (out / "items.json").write_text(json.dumps(items, indent=1))
    print(f"run {args.run}; held-out items from {where}; "
          f"95% bootstrap intervals over items ({args.resamples} resamples)")
    print("| suite | items | tokens | agreement (request pick = token top-1 majority) | ll/token routed | "
          "ll/token cost of request-level | picks | majorities |")
    print("|---|---|---|---|---|---|---|---|")
    for suite, rows in [*items.items(), ("all", [r for rows in items.values() for r in rows])]:
        f = figures(rows, args.resamples)
        (a, (alo, ahi)), (c, (clo, chi)) = f["agreement"], f["ll/token cost"]
        print(f"| {suite} | {f['items']} | {f['tokens']} | {a:.3f} [{alo:.3f}, {ahi:.3f}] | "
              f"{f['ll/token routed']:.4f} | {c:+.4f} [{clo:+.4f}, {chi:+.4f}] | {f['picks']} | {f['majorities']} |")
    print(f"({time.time() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
