"""`trinityx eval`: evaluate one variant of a run on the HHH suites; `trinityx eval compare`: tabulate.

With `--nproc N` it becomes N local torchrun processes (this module is their entry point, fed the
parsed options as JSON); under torchrun/srun/deepspeed it runs in place, one rank per process.
Items are spread over the data-parallel ranks, TP comes from the run config.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import get_args

import yaml

from trinityx_ds.config import load_config
from trinityx_ds.config.schema import DataFormat
from trinityx_ds.errors import one_line_errors
from trinityx_ds.eval.report import compare, compare_markdown, write_report
from trinityx_ds.launch.torchrun import relaunch
from trinityx_ds.storage.layout import RunLayout, model_eval_dir

# the suites `--suite` takes (eval/suites.py runs them); spelled here, not imported from there:
# suites.py loads megatron and torch, seconds that every `trinityx --help` would pay
SUITES = ("truthfulqa_mc", "hh_preference", "routing", "generate")

_RUN = RunLayout("RUN")  # the help texts name a run's paths as RunLayout lays them out


def add_eval_arguments(subparsers) -> argparse.ArgumentParser:
    """Adds `eval` (and its `compare` subcommand) to the CLI's subparsers; both call `cmd_eval`."""
    ev = subparsers.add_parser("eval", help="evaluate a run's variants on the HHH suites; `eval compare` tabulates",
                               description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ev.add_argument("--checkpoint", help="run output folder (a run's output.dir) or a plain HF / imported model folder")
    ev.add_argument("--variant", help="backbone | expert:<name> | uniform | h3fusion | trinityx "
                                      "[trinityx; backbone for a plain model]")
    ev.add_argument("--suite", default="truthfulqa_mc,hh_preference,routing",
                    help=f"comma-separated among {', '.join(SUITES)} [truthfulqa_mc,hh_preference,routing]")
    ev.add_argument("--out", help=f"report folder [{_RUN.eval_dir('<variant>')}; "
                                  f"{model_eval_dir('<model>', '<variant>')} for a plain model]")
    ev.add_argument("--config", help="run config to use [the one saved with the run's latest checkpoint]")
    ev.add_argument("--truthfulqa", help="TruthfulQA CSV/JSONL (or hub:truthfulqa/truthful_qa) for truthfulqa_mc")
    ev.add_argument("--hh", action="append", default=[], metavar="[NAME=]PATH",
                    help="HH-RLHF file for hh_preference, repeatable; NAME defaults to harmless/helpful from the path")
    ev.add_argument("--prompts", action="append", default=[], metavar="FORMAT=PATH",
                    help="prompts for generate (alpaca, beavertails, truthfulqa, hh_rlhf, chat_jsonl), repeatable")
    ev.add_argument("--judge", help="judge config for generate (JSON/YAML, see eval/judge.make_judge)")
    ev.add_argument("--limit", type=int, help="at most N items per data file (per task for routing)")
    ev.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass [8]")
    ev.add_argument("--max-seq-len", type=int, help="tokens per sequence [the run's data.max_seq_len]")
    ev.add_argument("--max-new-tokens", type=int, default=64, help="generate: new tokens per prompt [64]")
    ev.add_argument("--temperature", type=float, default=0.0, help="generate: sampling temperature, 0 = greedy [0]")
    ev.add_argument("--seed", type=int, default=0, help="generate: sampling seed [0]")
    ev.add_argument("--calib-fraction", type=float, default=0.5,
                    help="routing: share of held-out examples T is fitted on; metrics on the rest [0.5]")
    ev.add_argument("--write-temperature", nargs="?", const="global", choices=("global", "per_layer"),
                    help=f"routing, trinityx: write the fitted T into {_RUN.router_file} (backup kept)")
    ev.add_argument("--tp", type=int, help="tensor-parallel size [the run's parallel.tp; 1 for a plain model]")
    ev.add_argument("--nproc", type=int, default=0, help="launch N local processes")
    ev.set_defaults(fn=cmd_eval, eval_command=None)
    sub = ev.add_subparsers(dest="eval_command")
    cmp = sub.add_parser("compare", help="tabulate evaluation folders side by side (Markdown + JSON)")
    cmp.add_argument("folders", nargs="+", help="folders written by `trinityx eval`")
    cmp.add_argument("--out", help="also write OUT.md and OUT.json")
    return ev


def _named(spec: str) -> tuple[str, str]:
    """'NAME=PATH' -> (NAME, PATH); a bare path is named harmless/helpful when its file name says so."""
    name, sep, path = spec.partition("=")
    if sep:
        return name, path
    stem = Path(spec).name.lower()
    return next((k for k in ("harmless", "helpful") if k in stem), Path(spec).name.split(".")[0]), spec


def _check(args) -> list[str]:
    """The suites asked for; fills the default variant. Fails before any process starts."""
    suites = [s.strip() for s in args.suite.split(",") if s.strip()]
    unknown = [s for s in suites if s not in SUITES]
    if unknown:
        raise ValueError(f"--suite: {', '.join(unknown)} — one of {', '.join(SUITES)}")
    if not args.checkpoint:
        raise ValueError("--checkpoint: required (a run output folder or a model folder)")
    args.variant = args.variant or ("trinityx" if RunLayout(args.checkpoint).is_run() else "backbone")
    needs = {"truthfulqa_mc": args.truthfulqa, "hh_preference": args.hh, "generate": args.prompts}
    missing = {"truthfulqa_mc": "--truthfulqa", "hh_preference": "--hh", "generate": "--prompts"}
    for s in suites:
        if s in needs and not needs[s]:
            raise ValueError(f"--suite {s}: needs {missing[s]}")
    bad = [p for p in args.prompts if p.partition("=")[0] not in get_args(DataFormat)]
    if bad:
        raise ValueError(f"--prompts {bad[0]}: FORMAT=PATH, FORMAT one of {', '.join(get_args(DataFormat))}")
    if args.write_temperature and (args.variant != "trinityx" or "routing" not in suites):
        raise ValueError("--write-temperature: only with --variant trinityx and the routing suite")
    _check_model(args)
    return suites


def _check_model(args) -> None:
    """The model the evaluation builds, refused in one line if the backbone cannot reproduce it
    (a run's config names it; a run config with problems says so itself, ConfigError)."""
    from trinityx_ds.eval.variants import checkpoint_problem  # torch
    from trinityx_ds.model.weights import check_model_folders

    problem = checkpoint_problem(args.checkpoint, args.variant)
    if problem:
        raise ValueError(problem)
    layout = RunLayout(args.checkpoint)
    if layout.is_run():
        cfg = load_config(str(args.config or layout.run_config_file()), check_paths=False)
        folder, tp, seq_len = cfg.model.checkpoint or cfg.model.hf_path, args.tp or cfg.parallel.tp, cfg.data.max_seq_len
    elif (Path(args.checkpoint) / "config.json").is_file() and \
            json.loads((Path(args.checkpoint) / "config.json").read_text()).get("model_type") == "trinityx":
        return  # an exported TrinityX folder: checked by ModelArch when it is opened
    else:
        folder, tp, seq_len = args.checkpoint, args.tp or 1, None
    check_model_folders([folder], tp, args.max_seq_len or seq_len, key="--max-seq-len" if args.max_seq_len else "data.max_seq_len")


def default_out(args) -> Path:
    run = RunLayout(args.checkpoint)
    if run.is_run():
        return run.eval_dir(args.variant)
    return model_eval_dir(args.checkpoint, args.variant)


def run_eval(args) -> dict:
    """The evaluation on this rank (every rank of the job calls it); rank 0 writes the report."""
    import torch.distributed as dist  # here, not at the top: `trinityx --help` builds this module's parser

    from trinityx_ds.eval import suites as S
    from trinityx_ds.eval.lm import load_lm
    from trinityx_ds.parallel.groups import destroy_parallel

    t0, names = time.time(), _check(args)
    out = Path(args.out) if args.out else default_out(args)
    try:
        lm = load_lm(args.checkpoint, args.variant, config=args.config, tp=args.tp, max_len=args.max_seq_len,
                     batch_size=args.batch_size)
        judge = None
        if args.judge:
            judge = yaml.safe_load(Path(args.judge).read_text())
        run = {"truthfulqa_mc": lambda: S.truthfulqa_mc(lm, args.truthfulqa, args.limit),
               "hh_preference": lambda: S.hh_preference(lm, [_named(h) for h in args.hh], args.limit),
               "routing": lambda: S.routing(lm, out, args.limit, args.calib_fraction),
               "generate": lambda: S.generate(lm, [p.split("=", 1) for p in args.prompts], judge, args.limit,
                                              args.max_new_tokens, args.temperature, args.seed)}
        summaries, details = {}, {}
        for name in names:
            summaries[name], details[name] = run[name]()
        report = {"variant": args.variant, "checkpoint": str(args.checkpoint), "world_size": lm.dims.world_size,
                  "tp": lm.dims.tp, "dp": lm.dims.dp, "limit": args.limit, "suites": summaries}
        if S.is_main():
            if args.write_temperature and "temperature" in summaries.get("routing", {}):
                summaries["routing"]["written"] = _write_back(lm, summaries["routing"], args.write_temperature)
            report["seconds"] = time.time() - t0
            write_report(out, report, details)
            print(f"report: {out / 'report.md'}")
        if dist.is_initialized():
            dist.barrier()
    finally:
        destroy_parallel()  # gloo aborts at exit when a group is left open
    return report


def _write_back(lm, routing: dict, mode: str) -> dict:
    from trinityx_ds.calibration.fit import write_temperatures

    t = routing["temperature"]
    temps = dict(zip(routing["layers"], t["per_layer"] if mode == "per_layer" else [t["global"]] * len(t["per_layer"])))
    router = lm.layout.router_file  # a run: --write-temperature needs the trinityx variant
    backup = write_temperatures(router, temps)
    return {"file": str(router), "backup": str(backup), "mode": mode, "temperatures": temps}


def cmd_eval(args) -> int:
    if args.eval_command == "compare":
        columns, rows = compare(args.folders)
        text = compare_markdown(columns, rows)
        print(text, end="")
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out + ".md").write_text(text)
            Path(args.out + ".json").write_text(json.dumps(rows, indent=2))
        return 0
    _check(args)
    if args.nproc:
        opts = {k: v for k, v in vars(args).items() if k not in ("fn", "nproc")}
        return relaunch(["-m", "trinityx_ds.eval.runner", "--args-json", json.dumps(opts)], args.nproc,
                        tp=args.tp or 1)
    run_eval(args)
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m trinityx_ds.eval.runner [eval options]` (what torchrun starts), or `--args-json`."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--args-json"]:
        args = argparse.Namespace(**json.loads(argv[1]), fn=cmd_eval, nproc=0)
    else:
        parser = argparse.ArgumentParser(prog="trinityx")
        add_eval_arguments(parser.add_subparsers(dest="command", required=True))
        args = parser.parse_args(["eval", *argv])
    return one_line_errors("eval", lambda: args.fn(args), errors=(ValueError, FileNotFoundError))


if __name__ == "__main__":
    sys.exit(main())
