"""Our training steps against what a user would run instead, side by side in one run (CPU).

    .venv/bin/python tools/bench_steps.py                     # every variant, 3 rounds
    .venv/bin/python tools/bench_steps.py --variants peft_sft,sft_z1 --rounds 5 --profile /tmp/prof

Every variant runs in a process of its own (its peak RSS is its own), in rounds: each round runs
every variant once, the order rotated from round to round, so a machine that slows down during the
run slows every variant alike. A variant's figure is the median over rounds of its median step;
each ratio is taken within a round (neighbours in time) and given as the median and the range over
rounds. Variants (trinityx_ds/experiments/steps.py): the same random SmolLM2-135M-shaped weights,
the same tokens, fp32, LoRA r8 alpha 16 on gate/up/down of every layer:

  peft_sft  transformers + PEFT, torch AdamW           sft_z1 / sft_z3  ours, stage 1, ZeRO-1 / ZeRO-3
  sft_tp2   ours, ZeRO-1, TP=2 on 2 ranks (1 thread each: the same 2 cores)
  trl_dpo   TRL DPOTrainer.compute_loss on PEFT        dpo_z1  ours, stage 1 DPO, ZeRO-1
  dpo_noshare  dpo_z1 with the policy forward computing every layer (the reference prefix not shared)
  router    ours, stage 2: the router over 3 LoRA experts, top-1, router losses on
  backbone  our backbone's forward + backward with every weight frozen (the floor)

Targets (issue 30): sft_z1 <= 0.9x peft_sft, sft_z3 <= 1.0x peft_sft, dpo_z1 <= 0.9x trl_dpo,
router <= 1.1x sft_z1. `--profile DIR` adds one profiled step per variant (torch profiler, CPU ops by
self time and by input shape) written to DIR/<variant>.txt; the profiled step adds to that round's peak
RSS, so figures to quote come from a run without it.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from trinityx_ds.experiments import steps as S

TARGETS = [("sft_z1", "peft_sft", 0.9), ("sft_z3", "peft_sft", 1.0), ("sft_tp2", "peft_sft", None),
           ("dpo_z1", "trl_dpo", 0.9), ("dpo_z1", "dpo_noshare", None), ("router", "sft_z1", 1.1),
           ("router", "backbone", None), ("sft_z1", "backbone", None)]


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def layer_list(spec: str) -> list[int] | None:
    """--layers: all, or first-last, or a comma list."""
    if spec == "all":
        return None
    if "-" in spec:
        lo, hi = spec.split("-")
        return list(range(int(lo), int(hi) + 1))
    return [int(x) for x in spec.split(",")]


def worker(args) -> int:
    import torch

    torch.set_num_threads(args.threads)
    kw = {"micro_batch": args.micro_batch, "seq": args.seq, "warmup": args.warmup, "steps": args.steps,
          "prompt": args.prompt, "layers": layer_list(args.layers),
          "profile": Path(args.profile) / f"{args.worker}.txt" if args.profile else None}
    model = Path(args.model)
    if args.worker in ("peft_sft", "trl_dpo"):
        out = S.run_peer(args.worker, model, **kw)
    elif args.worker == "backbone":
        out = S.run_backbone(model, **kw)
    else:
        out = S.run_ours(args.worker, Path(args.root), model, **kw)
    if os.environ.get("RANK", "0") == "0":
        print("BENCH " + json.dumps(out), flush=True)
    return 0


def run_one(variant: str, args, work: Path, rnd: int) -> dict:
    from trinityx_ds.launch.torchrun import cpu_env, launch_torchrun

    nproc = S.VARIANTS[variant][1]
    root = work / f"{variant}-{rnd}"
    argv = [__file__, "--worker", variant, "--model", str(work / "model"), "--root", str(root),
            "--micro-batch", str(args.micro_batch), "--seq", str(args.seq), "--warmup", str(args.warmup),
            "--steps", str(args.steps), "--threads", str(2 // nproc), "--prompt", str(args.prompt),
            "--layers", args.layers]
    if args.profile and rnd == 0:
        argv += ["--profile", args.profile]
    env = cpu_env({"OMP_NUM_THREADS": str(2 // nproc)})
    if nproc > 1:
        proc = launch_torchrun(argv, nproc, timeout=args.timeout, env=env)
    else:
        proc = subprocess.run([sys.executable, *argv], env=env, capture_output=True, text=True, timeout=args.timeout)
        proc.stdout = (proc.stdout or "") + (proc.stderr or "")
    line = next((x for x in proc.stdout.splitlines() if x.startswith("BENCH ")), None)
    if proc.returncode or line is None:
        raise RuntimeError(f"bench_steps: {variant} failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}")
    return json.loads(line[6:])


def report(results: dict[str, list[dict]], args) -> str:
    lines = [(f"bench_steps: {cpu_model()}, {args.rounds} rounds x ({args.warmup} warm-up + {args.steps} timed "
              f"steps); {args.shape} shape, fp32, micro-batch {args.micro_batch} x {args.seq} tokens (DPO: "
              f"{args.micro_batch} pairs = {2 * args.micro_batch} rows), prompt {args.prompt:.0%} of each row "
              f"(unlabelled), LoRA r{S.LORA['rank']} on gate/up/down of layers {args.layers}"),
             f"{'variant':<12}{'what':<50}{'step s':>8}{'range over rounds':>20}{'peak RSS MiB':>14}"
             "  (RSS: median over rounds)"]
    for v, rows in results.items():
        med, rss = [r["step_s"] for r in rows], statistics.median(r["peak_rss_mib"] for r in rows)
        lines.append(f"{v:<12}{S.VARIANTS[v][0]:<50}{statistics.median(med):>8.3f}"
                     f"{f'{min(med):.3f}-{max(med):.3f}':>20}{rss:>14,.0f}")
    lines += ["", f"{'ratio':<26}{'median':>8}{'range':>14}  target"]
    for a, b, target in TARGETS:
        if a not in results or b not in results:
            continue
        ratios = [x["step_s"] / y["step_s"] for x, y in zip(results[a], results[b])]
        med = statistics.median(ratios)
        verdict = "" if target is None else f"<= {target:.2f}: {'met' if med <= target else 'MISSED'}"
        lines.append(f"{a + ' / ' + b:<26}{med:>8.2f}{f'{min(ratios):.2f}-{max(ratios):.2f}':>14}  {verdict}")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", default=",".join(v for v in S.VARIANTS if v != "dpo_noshare"),
                    help=f"comma-separated, among {','.join(S.VARIANTS)} [all but dpo_noshare]")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--micro-batch", type=int, default=4, help="rows per step (DPO: pairs) [4]")
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--prompt", type=float, default=0.5,
                    help="the prompt's share of each row, unlabelled as the data pipeline leaves it [0.5; 0: "
                         "every token a target]")
    ap.add_argument("--layers", default="all", help="the adapted layers, e.g. 20-29 (the efficacy runs') [all]")
    ap.add_argument("--shape", default="smollm2-135m", help="a `trinityx plan` preset [smollm2-135m]")
    ap.add_argument("--profile", default=None, help="folder for one profiled step per variant (first round)")
    ap.add_argument("--json", default=None, help="also write every figure to this file")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per variant process")
    ap.add_argument("--work", default=None, help="folder for the model and runs [a temporary one]")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--root", help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in S.VARIANTS]
    if unknown:
        ap.error(f"--variants: {','.join(unknown)} — among {','.join(S.VARIANTS)}")
    if args.profile:
        Path(args.profile).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        work = Path(tmp)
        t0 = time.time()
        S.write_model(work / "model", args.shape)
        results: dict[str, list[dict]] = {v: [] for v in variants}
        for rnd in range(args.rounds):
            order = variants[rnd % len(variants):] + variants[:rnd % len(variants)]
            for v in order:
                r = run_one(v, args, work, rnd)
                results[v].append(r)
                print(f"round {rnd + 1}/{args.rounds} {v}: {r['step_s']:.3f} s/step "
                      f"({', '.join(f'{t:.2f}' for t in r['steps_s'])}), {time.time() - t0:.0f} s", flush=True)
    print(report(results, args))
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "cpu": cpu_model(), "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
