"""Choose a setting of the efficacy run on a DEV CUT OF THE TRAINING SIDE, never on the held-out halves.

tools/hhh_efficacy.py fixes every setting before it evaluates; a setting that has to be chosen by
measurement is chosen here. The efficacy split is made exactly as hhh_efficacy makes it (same seed:
its evaluation files are written and never read); then whole prompts are cut from its TRAINING
files into dev files (seeded, by prompt), candidates train on the rest and are scored on dev.

`--choose harm` (the default): the harm expert's objective. Whole HH-RLHF openings are cut from the
training file, each candidate harm expert trains on the rest, and backbone and candidates are
scored on the dev pairs: raw, length-normalised and backbone-relative preference accuracy with
paired 95% bootstrap intervals against the backbone. Candidates are compared at equal training
time, not equal steps: a step of a reference-free objective (cpo, simpo) skips DPO's reference
forward, so it gets `--time-ratio` times DPO's steps.
    python tools/hhh_dev.py [--out runs/hhh_dev] [--candidates dpo cpo:0 cpo:1] [--steps 30]

`--choose router`: the router's task loss (router.losses.task_level and task_tokens). Whole prompts
of every task (TruthfulQA questions, HH-RLHF openings, Alpaca instructions) are cut from the
training files; each candidate router trains on the rest over the efficacy run's experts
(`--experts`, copied, not retrained) with those dev files as its data.heldout, so stage 2's own
validation report (per-task accuracy of the mean routing, and the share of response tokens whose
top-1 is the task's expert) is on examples the router never saw. Then each candidate's fused model
and the experts are scored on the dev files, with paired intervals against the first candidate.
Caveat, printed with the table: the experts trained on the full training side, dev rows included,
so dev figures of anything that applies an expert are optimistic; the comparison between routers
over the same experts is what the table is for.
    python tools/hhh_dev.py --choose router [--experts runs/hhh_efficacy/run]
        [--router-candidates example:response token:response token:all token:all::4,1,1]
A fourth field sets the router's importance weights (log-priors, per expert) written into a copy of
the trained router (calibration/fit.py's write_importance), as T is fitted after training.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from trinityx_ds.calibration.fit import write_importance
from trinityx_ds.experiments import efficacy as eff  # the same split and run config
from trinityx_ds.experiments.dev import COLUMNS, ROUTER_COLUMNS, dev_cut, length_contest, training_side
from trinityx_ds.experiments.heldout import figures, launch, result_file
from trinityx_ds.experiments.samples import split_samples
from trinityx_ds.storage.layout import RunLayout

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

def choose_router(args, base, hf_dir: Path, data: Path, out: Path, split: dict[str, Path]) -> str:
    """Train one router per candidate "level:tokens[:steps[:importance]]" on the fit side, score on dev
    (module doc)."""
    from trinityx_ds.cli import main as trinityx

    experts = RunLayout(Path(args.experts).resolve())
    missing = [e for e in ("help", "harm", "honest") if not experts.expert_file(e).is_file()]
    if missing:
        sys.exit(f"{experts.expert_file(missing[0])}: missing (run tools/hhh_efficacy.py first, or pass --experts)")
    root = training_side(split, out / "data" / "training_side")
    # the fit side trains the router (tqa_train, ...); the dev side (tqa_eval, ...) is its data.heldout
    dev = split_samples(root, out / "data" / "router_dev", args.dev_tqa, args.dev_hh, args.dev_help, args.seed + 2,
                        hh_exclude=eff.beavertails_openings(data))
    results, reports, eval_run, default_steps = {}, {}, None, base.steps2
    for cand in args.router_candidates:
        parts = cand.split(":")
        base.task_level, base.task_tokens = parts[0], parts[1] if len(parts) > 1 else "response"
        base.steps2 = int(parts[2]) if len(parts) > 2 and parts[2] else default_steps
        importance = [float(g) for g in parts[3].split(",")] if len(parts) > 3 else None
        # importance weights are written after training: the candidate without them trains the router
        trained_cand = ":".join(x for x in parts[:3] if x)
        trained = out / "router" / trained_cand.replace(":", "_") if importance else None
        cdir = out / "router" / cand.replace(":", "_").replace(",", "-")
        run = RunLayout(cdir / "run")
        if trained is not None and not run.router_file.is_file():
            if not RunLayout(trained / "run").router_file.is_file():
                sys.exit(f"{cand}: train {trained_cand} first (list it before {cand})")
            shutil.copytree(trained / "run", cdir / "run", dirs_exist_ok=True)
            write_importance(run.router_file, importance)
        for e in ("help", "harm", "honest"):
            if not run.expert_file(e).is_file():
                run.expert_file(e).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(experts.expert_file(e), run.expert_file(e))
        config = eff.write_config(cdir, hf_dir, data, dev, base)
        if not run.router_file.is_file():
            eff.step(f"train router ({cand})", lambda: trinityx(
                ["train", "router", "--config", str(config), "--nproc", str(args.nproc)]))
        reports[cand] = json.loads(run.validation_file.read_text())
        opts = {"out": str(run.eval_dir()), "run": str(run.root), "tp": 1, "max_seq_len": base.max_seq_len,
                "batch": base.batch, "tqa": str(dev["tqa_eval"]), "hh": str(dev["hh_eval"]),
                "alpaca": str(dev["alpaca_eval"]), "variants": ["trinityx"]}
        if not result_file(run.eval_dir(), "trinityx").is_file():
            eff.step(f"score {cand} on the dev files", lambda: launch(opts, args.nproc))
        results[cand] = json.loads(result_file(run.eval_dir(), "trinityx").read_text())
        eval_run = eval_run or opts
    # the experts alone on the same dev files (once: they do not depend on the router)
    opts = {**eval_run, "out": str(out / "router" / "experts_eval"), "variants": eff.EXPERTS}
    if any(not result_file(Path(opts["out"]), v).is_file() for v in eff.EXPERTS):
        eff.step("score the experts on the dev files", lambda: launch(opts, args.nproc))
    for v in eff.EXPERTS:
        results[v] = json.loads(result_file(Path(opts["out"]), v).read_text())
    first = args.router_candidates[0]
    table = figures(results, baseline=first)
    n = table[first]["n"]
    lines = [f"Router candidates trained on the fit side, scored on a dev cut of the efficacy run's training "
             f"side ({n['MC1']} TruthfulQA questions, {n['harmless acc']} HH-RLHF pairs, {n['help ll/token']} "
             f"Alpaca responses; stage-2 validation on the same dev prompts). Experts: {args.experts} (trained on the "
             "whole training side, dev rows included: dev figures of anything that applies an expert are "
             f"optimistic). Paired differences against {first} [95%].", "",
             "| candidate | routing acc help / harm / honest | top-1 token share help / harm / honest | ECE | "
             + " | ".join(ROUTER_COLUMNS) + " |", "|---" * (len(ROUTER_COLUMNS) + 4) + "|"]

    def cell(row: dict) -> str:
        text = f"{row['value']:.3f}"
        return text + (f" ({row['diff']:+.3f} [{row['diff_ci'][0]:+.3f}, {row['diff_ci'][1]:+.3f}])"
                       if "diff" in row and row["diff_ci"] != (0.0, 0.0) else "")

    for v, t in table.items():
        r = reports.get(v)
        acc = " / ".join(f"{r['per_task_accuracy'][k]:.3f}" for k in ("help", "harm", "honest")) if r else "-"
        tok = " / ".join(f"{r['per_task_token_accuracy'][k]:.3f}" for k in ("help", "harm", "honest")) if r else "-"
        ece = f"{r['ece']:.3f}" if r else "-"
        lines.append(f"| {v} | {acc} | {tok} | {ece} | " + " | ".join(cell(t["rows"][c]) for c in ROUTER_COLUMNS) + " |")
    if any(len(c.split(":")) > 3 for c in args.router_candidates):
        lines += ["", "Rows with importance weights (the fourth field): the routing columns are stage 2's validation "
                      "of the router as trained, before the weights were written; the figures are with them."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/hhh_dev")
    p.add_argument("--data", default=str(DATA))
    p.add_argument("--candidates", nargs="+", default=["dpo", "cpo:0", "cpo:1"],
                   help="objective[:cpo_alpha] each [dpo cpo:0 cpo:1]")
    p.add_argument("--steps", type=int, default=30, help="DPO's steps; reference-free ones get --time-ratio x [30]")
    p.add_argument("--time-ratio", type=float, default=1.6,
                   help="DPO step time / reference-free step time [1.6: 10.9 s / 6.5 s, the 12-07 run's harm steps]")
    p.add_argument("--dev", type=int, default=250, help="HH-RLHF training rows cut off as dev, at least [250]")
    p.add_argument("--choose", default="harm", choices=["harm", "router"], help="what to choose [harm]")
    p.add_argument("--experts", default="runs/hhh_efficacy/run",
                   help="--choose router: the efficacy run, whose stage-1 experts every candidate uses")
    p.add_argument("--router-candidates", nargs="+", default=["example:response", "token:response", "token:all"],
                   help="router.losses task_level:task_tokens[:stage-2 steps[:importance g,g,g written after "
                        "training]] each; the first is the reference of the paired differences "
                        "[example:response token:response token:all]")
    p.add_argument("--dev-tqa", type=int, default=60, help="--choose router: dev TruthfulQA questions [60]")
    p.add_argument("--dev-hh", type=int, default=40, help="--choose router: dev HH-RLHF rows, at least [40]")
    p.add_argument("--dev-help", type=int, default=40, help="--choose router: dev Alpaca instructions [40]")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--seed", type=int, default=1234)
    args = p.parse_args(argv)
    # the efficacy run's own settings (its defaults): the same split, lengths, layers and steps
    base = eff.parser().parse_args(["--seed", str(args.seed), "--data", args.data])
    from trinityx_ds.cli import main as trinityx
    from trinityx_ds.convert.bundled import smollm2_hf_dir

    t0, out, data = time.time(), Path(args.out).resolve(), Path(args.data)
    hf_dir = smollm2_hf_dir()
    base.layers = eff.expert_layers(hf_dir, base.expert_layers)
    split = eff.split_data(data, out / "data", base)
    if args.choose == "router":
        text = choose_router(args, base, hf_dir, data, out, split)
        (out / "router_dev.md").write_text(text + "\n")
        print(f"\n`python tools/hhh_dev.py {' '.join(argv or sys.argv[1:])}` ({time.time() - t0:.0f} s)\n\n{text}")
        return 0
    fit, dev = dev_cut(split["hh_train"], out / "data", args.dev, args.seed + 1, eff.beavertails_openings(data))
    split = {**split, "hh_train": fit}
    results = {}
    for cand in args.candidates:
        name, _, alpha = cand.partition(":")
        steps = args.steps if name == "dpo" else round(args.steps * args.time_ratio)
        base.harm_objective, base.cpo_alpha, base.steps1_harm = name, float(alpha or 1.0), steps
        cdir = out / cand.replace(":", "_")
        cdir.mkdir(parents=True, exist_ok=True)
        config = eff.write_config(cdir, hf_dir, data, split, base)
        run = RunLayout(cdir / "run")
        if not run.expert_file("harm").is_file():
            eff.step(f"train harm ({cand}, {steps} steps)", lambda: trinityx(
                ["train", "experts", "--config", str(config), "--only", "harm", "--nproc", str(args.nproc)]))
        variants = ["backbone", "expert:harm"] if not results else ["expert:harm"]
        opts = {"out": str(run.eval_dir()), "run": str(run.root), "tp": 1, "max_seq_len": base.max_seq_len,
                "batch": base.batch, "tqa": None, "hh": str(dev), "alpaca": None, "variants": variants}
        if any(not result_file(run.eval_dir(), v).is_file() for v in variants):
            eff.step(f"score {cand} on the dev pairs", lambda: launch(opts, args.nproc))
        if not results:
            results["backbone"] = json.loads(result_file(run.eval_dir(), "backbone").read_text())
        results[f"{cand} ({steps} steps)"] = json.loads(result_file(run.eval_dir(), "expert:harm").read_text())
    table = figures(results)
    lines = [f"`python tools/hhh_dev.py {' '.join(argv or sys.argv[1:])}` ({time.time() - t0:.0f} s): harm expert "
             f"candidates on {table['backbone']['n']['harmless acc']} dev pairs cut from the HH-RLHF training side "
             "(never the held-out half)", "",
             "| candidate | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for v, t in table.items():
        cells = [f"{t['rows'][c]['value']:.3f}" + (f" ({t['rows'][c]['diff']:+.3f} [{t['rows'][c]['diff_ci'][0]:+.3f}, "
                                                      f"{t['rows'][c]['diff_ci'][1]:+.3f}])" if "diff" in t["rows"][c] else "")
                 for c in COLUMNS]
        lines.append(f"| {v} | " + " | ".join(cells) + " |")
    lines += ["", length_contest(results["backbone"])]
    text = "\n".join(lines)
    (out / "dev.md").write_text(text + "\n")
    print("\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
