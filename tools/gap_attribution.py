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

import torch
from transformers import AutoTokenizer

from trinityx_ds.config import load_config
from trinityx_ds.convert.write import export_hf
from trinityx_ds.eval.loglik import Request, encode
from trinityx_ds.experiments.gaps import Backbone, Scorer, help_report, honest_report, requests, score
from trinityx_ds.storage.layout import RunLayout


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
