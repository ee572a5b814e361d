"""`trinityx plan`: will a layout fit, how fast will it go; or the fastest layout that fits.

The layout comes from flags, from a run config (`--config RUN.yaml`: what that run would do),
or is searched. `--verify` then builds the real model of every rank of the layout on the meta
device and checks the per-rank parameter counts (plan/verify.py).

Exit codes: 0 fits; 2 bad input (unknown model, impossible layout); 3 does not fit; 4 the built
model disagrees with the plan.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, replace

from trinityx_ds.config import load_config
from trinityx_ds.config.schema import ConfigError
from trinityx_ds.model.arch import ArchError
from trinityx_ds.plan.layout import GIB, Cluster, Layout, layout_problems
from trinityx_ds.plan.params import MoCaEPlan, backbone_params, per_rank_params, stage_moe
from trinityx_ds.plan.presets import PRESETS, load_arch
from trinityx_ds.plan.recommend import Plan, plan_layout, recommend

LAYOUT_FLAGS = ("tp", "pp", "ep", "zero")  # any of these given: check that one layout
# what a run config decides; None = not given on the command line (the value is the default)
RUN_FLAGS = {"tp": None, "pp": None, "ep": None, "zero": None, "offload": None, "act_ckpt": None,
             "micro_batch": None, "grad_accum": None, "seq_len": 4096, "sequence_parallel": False, "experts": "lora",
             "lora_rank": 8, "num_experts": 3, "top_k": 1, "train_experts_in_stage2": False}


def add_plan_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None,
                        help=f"preset ({', '.join(PRESETS)}) or HF config.json / folder [--config's model.hf_path]")
    parser.add_argument("--config", default=None,
                        help="a run config (YAML): plan the layout, batch, checkpointing, offload, sequence length "
                             "and MoCaE blocks that run uses (its layout and MoCaE flags are then refused)")
    parser.add_argument("--verify", action="store_true",
                        help="build every (TP, PP, EP) rank of the layout on the meta device and check its "
                             "parameter counts against the plan")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    parser.add_argument("--top", type=int, default=5, help="alternatives listed when recommending [5]")
    c = parser.add_argument_group("cluster")
    c.add_argument("--nodes", type=int, default=1)
    c.add_argument("--gpus-per-node", type=int, default=8)
    c.add_argument("--gpu-mem-gib", type=float, default=80.0)
    c.add_argument("--gpu-peak-tflops", type=float, default=989.0, help="bf16 dense peak [989: H100 SXM]")
    c.add_argument("--mfu", type=float, default=0.40, help="achievable fraction of peak on executed FLOPs [0.40]")
    c.add_argument("--nvlink-gbs", type=float, default=360.0, help="NCCL bus bandwidth inside a node, GB/s [360]")
    c.add_argument("--ib-gbs", type=float, default=40.0, help="NCCL bus bandwidth across nodes per GPU, GB/s [40]")
    c.add_argument("--context-gib", type=float, default=2.0, help="CUDA context + NCCL per GPU [2.0]")
    c.add_argument("--margin", type=float, default=0.10, help="fragmentation margin, fraction of tensors [0.10]")
    g = parser.add_argument_group("layout: any of --tp/--pp/--ep/--zero checks that one layout (others default "
                                  "to tp 1, pp 1, ep 1, ZeRO-3, no offload, micro-batch 1, no checkpointing); "
                                  "without them the fastest fitting layout is searched, other flags pin it")
    for flag in LAYOUT_FLAGS:
        g.add_argument(f"--{flag}", type=int, default=None, choices=(1, 2, 3) if flag == "zero" else None)
    g.add_argument("--offload", action=argparse.BooleanOptionalAction, default=None, help="optimizer on CPU")
    g.add_argument("--act-ckpt", nargs="?", const="full", default=None, choices=("none", "full", "selective"),
                   help="activation checkpointing, as model.activation_checkpointing: none, full (the flag "
                        "alone) or selective (core attention only; eager attention)")
    g.add_argument("--no-act-ckpt", dest="act_ckpt", action="store_const", const="none",
                   help="the same as --act-ckpt none")
    g.add_argument("--micro-batch", type=int, default=None)
    g.add_argument("--grad-accum", type=int, default=None, help="default: global batch / (micro-batch x dp)")
    g.add_argument("--global-batch", type=int, default=128, help="sequences per optimizer step [128]")
    g.add_argument("--seq-len", type=int, default=None, help="[4096]")
    g.add_argument("--sequence-parallel", action="store_true")
    g.add_argument("--attention", choices=("sdpa", "eager", "te"), default="sdpa",
                   help="as model.attention: sdpa / te are fused kernels (no s x s scores kept), eager "
                        "materialises the scores [sdpa, the run config's default]")
    m = parser.add_argument_group("MoCaE")
    m.add_argument("--experts", choices=("lora", "full"), default=None, help="[lora]")
    m.add_argument("--lora-rank", type=int, default=None, help="[8]")
    m.add_argument("--num-experts", type=int, default=None, help="[3]")
    m.add_argument("--top-k", type=int, default=None, help="[1]")
    m.add_argument("--train-experts-in-stage2", action="store_true")
    m.add_argument("--stage", choices=("1", "2", "both"), default="both")


def _fixed(args) -> dict:
    names = {"offload": args.offload, "act_ckpt": args.act_ckpt, "micro_batch": args.micro_batch,
             "grad_accum": args.grad_accum}
    return {k: v for k, v in names.items() if v is not None}


def _apply_run_config(args, stages: tuple[int, ...], world: int) -> None:
    """Fills the layout and MoCaE arguments from `--config`, as that run would use them."""
    given = [f"--{k.replace('_', '-')}" for k, default in RUN_FLAGS.items() if getattr(args, k) not in (None, default)]
    if given:
        raise ValueError(f"--config sets the layout and the MoCaE blocks: drop {', '.join(given)}")
    try:
        cfg = load_config(args.config, check_paths=False, world_size=world)
    except ConfigError as e:
        raise ValueError(f"{args.config}: " + "; ".join(e.problems)) from None
    batch = {(st.micro_batch, st.grad_accum) for s, st in ((1, cfg.train.stage1), (2, cfg.train.stage2)) if s in stages}
    if len(batch) > 1:
        raise ValueError(f"{args.config}: train.stage1 and train.stage2 differ in micro_batch / grad_accum: "
                         "plan them one at a time (--stage 1, --stage 2)")
    (args.micro_batch, args.grad_accum), = batch
    p, moe = cfg.parallel, MoCaEPlan.from_run_config(cfg)
    args.tp, args.pp, args.ep, args.zero, args.offload = p.tp, p.pp, p.ep, p.zero_stage, p.offload == "cpu"
    args.act_ckpt, args.seq_len = cfg.model.activation_checkpointing, cfg.data.max_seq_len
    args.sequence_parallel, args.moe = cfg.model.sequence_parallel, moe
    args.attention = cfg.model.attention
    if args.model is None:
        args.model = cfg.model.hf_path or cfg.model.checkpoint


def cmd_plan(args) -> int:
    try:
        stages = (1, 2) if args.stage == "both" else (int(args.stage),)
        cluster = Cluster(nodes=args.nodes, gpus_per_node=args.gpus_per_node, gpu_mem_gib=args.gpu_mem_gib,
                          context_gib=args.context_gib, margin=args.margin, peak_tflops=args.gpu_peak_tflops,
                          mfu=args.mfu, nvlink_gbs=args.nvlink_gbs, ib_gbs=args.ib_gbs)
        if args.config:
            _apply_run_config(args, stages, cluster.world)
        else:
            for k, default in RUN_FLAGS.items():
                setattr(args, k, default if getattr(args, k) is None else getattr(args, k))
            args.moe = MoCaEPlan(kind=args.experts, num_experts=args.num_experts, lora_rank=args.lora_rank,
                                 top_k=args.top_k, train_experts_in_stage2=args.train_experts_in_stage2)
        if args.model is None:
            raise ValueError("--model: required (a preset or an HF config), or --config with model.hf_path")
        name, arch = load_arch(args.model)
        moe = args.moe
        base = Layout(seq_len=args.seq_len, sequence_parallel=args.sequence_parallel, attention=args.attention)
        hardware = {k: v for k, v in asdict(cluster).items() if k not in ("nodes", "gpus_per_node", "gpu_mem_gib")}
        search = dict(moe=moe, seq_len=args.seq_len, global_batch=args.global_batch, stages=stages, top=args.top,
                      base=base, **hardware)
        if any(getattr(args, f) is not None for f in LAYOUT_FLAGS):
            plan = plan_layout(name, arch, moe, _given_layout(args, base, cluster), cluster, stages)
            alt = None if plan.fits else recommend(args.model, args.nodes, args.gpus_per_node, args.gpu_mem_gib,
                                                   **search).best
            return _report(args, plan, [alt] if alt else [], "check", None)
        rec = recommend(args.model, args.nodes, args.gpus_per_node, args.gpu_mem_gib, fixed=_fixed(args), **search)
    except (ArchError, ValueError) as e:  # UnknownModel is a ValueError
        print(f"trinityx plan: {e}", file=sys.stderr)
        return 2
    if rec.best is None and rec.closest is None:
        why = "; ".join(layout_problems(arch, moe, replace(base, **_fixed(args)), cluster)) or "these flags"
        print(f"trinityx plan: no runnable layout of {name} on {cluster.world} GPUs: {why}", file=sys.stderr)
        return 2
    return _report(args, rec.best or rec.closest, list(rec.top[1:]), "recommend", rec.considered)


def _given_layout(args, base: Layout, cluster: Cluster) -> Layout:
    lay = replace(base, **{f: getattr(args, f) for f in LAYOUT_FLAGS if getattr(args, f) is not None},
                  **{k: v for k, v in _fixed(args).items() if k != "grad_accum"})
    if args.grad_accum is not None:
        return replace(lay, grad_accum=args.grad_accum)
    per_step = lay.micro_batch * max(lay.dp(cluster.world), 1)
    return replace(lay, grad_accum=max(1, args.global_batch // per_step))


def _report(args, plan: Plan, others: list[Plan], mode: str, considered: int | None) -> int:
    refused = None if plan.fits else plan.refusal()
    checked = None
    if args.verify:
        from trinityx_ds.plan.verify import verify_layout  # torch, megatron: only for --verify

        lay = plan.layout
        checked = verify_layout(plan.arch, plan.moe, lay.tp, lay.pp, lay.ep, [s.stage for s in plan.stages])
    if args.json:
        out = {"mode": mode, "considered": considered, "refused": refused, "plan": plan.to_dict(),
               "alternatives": [p.to_dict() for p in others]}
        if checked is not None:
            out["verify"] = [asdict(c) | {"ok": c.ok} for c in checked]
        print(json.dumps(out, indent=2))
    else:
        print(format_plan(plan, others, mode, considered))
        if checked is not None:
            print(f"\nverify: the real model built on the meta device, {len(checked)} (stage, TP, PP, EP) ranks, "
                  "parameters per group (plan/params.py) planned vs built")
            print("\n".join(f"  {c.describe()}" for c in checked))
    if checked is not None and not all(c.ok for c in checked):
        bad = [c for c in checked if not c.ok]
        print(f"trinityx plan: the built model disagrees with the plan on {len(bad)} rank(s), first: "
              f"{bad[0].describe()}", file=sys.stderr)
        return 4
    if refused:
        print(f"trinityx plan: refused, {refused}", file=sys.stderr)
        return 3
    return 0


def format_plan(plan: Plan, others: list[Plan], mode: str, considered: int | None) -> str:
    """The human-readable table: one line per term and stage, with the inputs of its formula."""
    arch, lay, cl, moe, st = plan.arch, plan.layout, plan.cluster, plan.moe, plan.stages

    def row(name: str, values, fmt: str, note: str = "") -> str:
        return f"  {name:<32}" + "".join(f"{v:>10{fmt}}" for v in values) + (f"   {note}" if note else "")

    head = "".join(f"{'stage ' + str(s.stage):>10}" for s in st)
    moe_txt = (f"{moe.num_experts} x {moe.kind} experts" + (f" (rank {moe.lora_rank})" if moe.kind == "lora" else "")
               + f", top-k {moe.top_k}, MoCaE in {len(moe.chosen(arch.num_layers))} of {arch.num_layers} layers")
    if mode == "recommend":
        title = (f"fastest layout that fits ({considered} runnable layouts considered)" if plan.fits
                 else f"NO layout fits ({considered} considered); the closest")
    else:
        title = "layout as given" + ("" if plan.fits else ": DOES NOT FIT")
    lines = [f"{plan.model} on {cl.nodes} node(s) x {cl.gpus_per_node} GPUs x {cl.gpu_mem_gib:g} GiB = "
             f"{cl.world} GPUs; {moe_txt}",
             f"{title}: {lay.describe(cl.world)}",
             f"parameters: backbone {backbone_params(arch):,}; per GPU (worst pipeline stage):"]
    for s in st:
        rank = per_rank_params(arch, lay.tp, lay.pp, s.memory.pp_rank, *stage_moe(moe, s.stage, lay.ep))
        lines.append(f"  stage {s.stage} (pp rank {s.memory.pp_rank}): "
                     + ", ".join(f"{k} {v:,}" for k, v in rank.items()))
    lines += ["trainable (whole model): " + ", ".join(f"stage {s.stage} {s.trainable:,}" for s in st),
              "", f"{'memory per GPU, GiB':<34}{head}   formula (inputs)"]
    for i, term in enumerate(st[0].memory.terms):
        lines.append(row(term.name, [s.memory.terms[i].value / GIB for s in st], ".2f", term.formula))
        lines += [row("", [], "", f"{'':>{10 * len(st)}}stage {s.stage}: {s.memory.terms[i].formula}")
                  for s in st[1:] if s.memory.terms[i].formula != term.formula]
    lines += [row("total", [s.memory.total / GIB for s in st], ".2f",
                  f"of {cl.gpu_mem_gib:g} GiB, worst pipeline stage"),
              row("fits", ["yes" if s.memory.fits else "NO" for s in st], "",
                  ", ".join(f"stage {s.stage}: {-s.memory.over / GIB:+.1f} GiB headroom" for s in st))]
    if lay.offload:
        lines.append(row("CPU RAM per node, GiB", [s.memory.cpu_bytes_per_node / GIB for s in st], ".1f",
                         "16 B x trainable / d x GPUs per node"))
    t0 = st[0].throughput
    lines += ["", f"{'time per step, s':<34}{head}   formula (inputs)",
              row("compute", [s.throughput.compute_s for s in st], ".3f",
                  f"{t0.tokens_per_step:,} tokens x executed FLOP/token / ({cl.world} GPUs x {cl.peak_tflops:g} "
                  f"TFLOP/s x MFU {cl.mfu:g})"),
              row("pipeline bubble", [s.throughput.bubble_s for s in st], ".3f",
                  f"compute x (pp {lay.pp} - 1) / grad-accum {lay.grad_accum}")]
    lines += [row(term.name, [s.throughput.comm[i].value for s in st], ".3f", term.formula)
              for i, term in enumerate(t0.comm)]
    lines += [row("step", [s.throughput.step_s for s in st], ".3f", "compute + bubble + exposed communication"),
              row("executed GFLOP/token", [s.throughput.flops_per_token / 1e9 for s in st], ".1f",
                  "frozen 4N, trainable 6N, below the first MoCaE layer 2N"
                  + {"none": "", "full": ", + 2N recompute", "selective": ", + core attention recompute"}[lay.act_ckpt]
                  + "; attention 12 L H s"),
              row("model GFLOP/token", [s.throughput.model_flops_per_token / 1e9 for s in st], ".1f",
                  "6 N_active + 12 L H s (Megatron / torchtitan MFU count)"),
              row("tokens/s per GPU", [s.throughput.tokens_per_s_per_gpu for s in st], ".0f"),
              row("implied MFU", [s.throughput.mfu for s in st], ".3f", "model FLOPs / (step x GPUs x peak)")]
    if others:
        lines += ["", "next fastest that fit:" if mode == "recommend" else "fastest layout that fits instead:"]
        lines += [f"  {p.layout.describe(cl.world)}: " + " + ".join(f"{s.throughput.step_s:.2f}" for s in p.stages)
                  + " s per step (stage " + " + ".join(str(s.stage) for s in p.stages)
                  + f"), peak {max(s.memory.total for s in p.stages) / GIB:.1f} GiB" for p in others]
    return "\n".join(lines)
