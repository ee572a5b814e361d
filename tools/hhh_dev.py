"""Choose the harm expert's objective on a DEV CUT OF THE TRAINING SIDE, never on the held-out halves.

tools/hhh_efficacy.py fixes every setting before it evaluates; a setting that has to be chosen by
measurement is chosen here. The efficacy split is made exactly as hhh_efficacy makes it (same seed:
its evaluation files are written and never read); then whole HH-RLHF openings are cut from its
TRAINING file into a dev file (seeded, by prompt), each candidate harm expert trains on the rest, and
backbone and candidates are scored on the dev pairs: raw, length-normalised and backbone-relative
preference accuracy with paired 95% bootstrap intervals against the backbone.

Candidates are compared at equal training time, not equal steps: a step of a reference-free
objective (cpo, simpo) skips DPO's reference forward, so it gets `--time-ratio` times DPO's steps.
    python tools/hhh_dev.py [--out runs/hhh_dev] [--candidates dpo cpo:0 cpo:1] [--steps 30]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import hhh_efficacy as eff  # noqa: E402  (the same split and run config)

from trinityx_ds.eval.heldout import figures, hh_opening, launch, result_file, take_groups  # noqa: E402

COLUMNS = ["harmless acc", "harmless acc (len-norm)", "harmless acc (vs backbone)", "harmless margin"]


def dev_cut(train: Path, out: Path, n: int, seed: int, exclude: frozenset) -> tuple[Path, Path]:
    """(fit, dev) files: whole openings of the HH-RLHF training file, at least n rows on the dev side;
    `exclude`: openings other training data holds (BeaverTails' prompts), kept on the fit side."""
    lines = [line for line in train.read_text().splitlines(keepends=True) if line.strip()]
    keys = [hh_opening(line) for line in lines]
    held = take_groups(keys, n, seed, exclude=exclude)
    fit, dev = out / "harmless_fit.jsonl", out / "harmless_dev.jsonl"
    fit.write_text("".join(line for line, k in zip(lines, keys) if k not in held))
    dev.write_text("".join(line for line, k in zip(lines, keys) if k in held))
    return fit, dev


def length_contest(result: dict) -> str:
    """How much of the raw accuracy is response length: the correlation of the backbone's raw margin
    log p(c) - log p(r) with the length difference (rejected - chosen tokens), and the share of pairs
    ranked wrong by less than 10 nats (what an expert could flip without rewriting the model)."""
    import numpy as np

    margin = np.array([x["c"] - x["r"] for x in result["hh_items"]])
    tokens = np.array(result["hh_tokens"], float)
    r = float(np.corrcoef(margin, tokens[:, 1] - tokens[:, 0])[0, 1])
    near = float(((margin < 0) & (margin > -10)).mean())
    return (f"Backbone on these pairs: raw margin vs (rejected - chosen) length in tokens, Pearson r = {r:.3f}; "
            f"pairs ranked wrong by less than 10 nats: {near:.3f}; median |margin| {np.median(np.abs(margin)):.1f} nats.")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/hhh_dev")
    p.add_argument("--data", default=str(eff.ROOT.parent / "shared" / "data"))
    p.add_argument("--candidates", nargs="+", default=["dpo", "cpo:0", "cpo:1"],
                   help="objective[:cpo_alpha] each [dpo cpo:0 cpo:1]")
    p.add_argument("--steps", type=int, default=30, help="DPO's steps; reference-free ones get --time-ratio x [30]")
    p.add_argument("--time-ratio", type=float, default=1.6,
                   help="DPO step time / reference-free step time [1.6: 10.9 s / 6.5 s, the 12-07 run's harm steps]")
    p.add_argument("--dev", type=int, default=250, help="HH-RLHF training rows cut off as dev, at least [250]")
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
        if not (cdir / "run" / "stage1" / "harm" / "expert.safetensors").is_file():
            eff._step(f"train harm ({cand}, {steps} steps)", lambda: trinityx(
                ["train", "experts", "--config", str(config), "--only", "harm", "--nproc", str(args.nproc)]))
        variants = ["backbone", "expert:harm"] if not results else ["expert:harm"]
        opts = {"out": str(cdir / "eval"), "run": str(cdir / "run"), "tp": 1, "max_seq_len": base.max_seq_len,
                "batch": base.batch, "tqa": None, "hh": str(dev), "alpaca": None, "variants": variants}
        if any(not result_file(cdir / "eval", v).is_file() for v in variants):
            eff._step(f"score {cand} on the dev pairs", lambda: launch(opts, args.nproc))
        if not results:
            results["backbone"] = json.loads(result_file(cdir / "eval", "backbone").read_text())
        results[f"{cand} ({steps} steps)"] = json.loads(result_file(cdir / "eval", "expert:harm").read_text())
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
