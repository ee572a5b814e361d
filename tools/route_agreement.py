"""What request-level routing (vLLM serving one PEFT adapter per request, picked by `trinityx
route`) gives up against TrinityX's token-level routing, on held-out prompts.

    python tools/route_agreement.py RUN OUT [--data ../shared/data | --fixtures] [--n 40]

RUN: a training output dir with LoRA experts. It is exported into OUT as `--format peft` (what is
served) and `--format trinityx` (the token-level model). The held-out items are the run's own
held-out files (`data.heldout`: its TruthfulQA, HH-RLHF and Alpaca files, which the run refused to
train on), the first `--n` of each; a run without them gets experiments/samples.split_samples's
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
from pathlib import Path

from trinityx_ds.convert.write import export_hf
from trinityx_ds.experiments.routing import figures, held_out_requests, measure

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


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
