"""Training throughput of MoCaE against the same backbone trained plainly, on one GPU.

    .venv/bin/python tools/bench_gpu.py                      # ~1B Llama, bf16, one GPU
    .venv/bin/python tools/bench_gpu.py --device cpu --tiny  # the same code path on a laptop

Three training steps, each with the project's own stack (megatron GPTModel from `build_model`, a
DeepSpeed engine from `train/engine.py`, bf16, ZeRO-1 on one rank):
  (a) the backbone alone, every parameter trainable (the reference)
  (b) MoCaE stage 1: one LoRA expert in every layer trains, the backbone is frozen
  (c) MoCaE stage 2: the calibrated router over 3 LoRA experts trains (router losses on)
The trainable parameters are chosen by the stages' own rule (`select_trainable`). Each variant runs
in a process of its own (its peak memory is its own) on random weights of a generated ~1B Llama
(hidden 2048, 16 layers, 32 heads, 8 KV heads, FFN 5632, vocab 32000; nothing downloaded) and a
fixed random batch, so the step itself is measured, not the data pipeline. MFU counts model FLOPs as
the planner does (6 N_active + 12 L H s per token) over the GPU's bf16 dense peak; the ratio of each
variant to (a) is the figure to quote. Targets: (a) MFU >= 40%; (b) within 10% of (a)'s tokens/s.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

BENCH_1B = dict(model_type="llama", hidden_act="silu", hidden_size=2048, intermediate_size=5632, num_hidden_layers=16,
                num_attention_heads=32, num_key_value_heads=8, vocab_size=32000, max_position_embeddings=4096,
                rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False)
VARIANTS = {"a": "backbone, all trainable", "b": "MoCaE stage 1 (LoRA expert)", "c": "MoCaE stage 2 (router)"}
TARGET_MFU, TARGET_STAGE1 = 0.40, 0.90


def run_variant(key: str, args) -> dict:
    """One variant's training steps in this process; its figures as a dict."""
    import torch

    from trinityx_ds.config.schema import RunConfig, StageConfig
    from trinityx_ds.model.arch import ModelArch
    from trinityx_ds.model.backbone import masked_mean_loss
    from trinityx_ds.model.build import build_model
    from trinityx_ds.model.mocae import MoCaEConfig, RoutingContext, set_router_loss_scale, set_routing_context
    from trinityx_ds.parallel.groups import destroy_parallel, init_parallel
    from trinityx_ds.plan import PRESETS, MoCaEPlan, flops_per_token
    from trinityx_ds.train.engine import initialize
    from trinityx_ds.train.metrics import peak_tflops
    from trinityx_ds.train.stages import select_trainable

    gpu = args.device == "cuda"
    arch = ModelArch.from_hf_dict(PRESETS["tiny-llama"] if args.tiny else BENCH_1B)
    stage = {"a": 0, "b": 1, "c": 2}[key]
    moe = None if stage == 0 else MoCaEConfig(lora_rank=args.lora_rank, top_k=1)
    if stage == 1:
        moe = moe.one_expert(moe.expert_names[0])  # stage 1 builds the one expert it trains, as StageRun does
    run = RunConfig()
    run.model.dtype, run.model.activation_checkpointing = args.dtype, args.act_ckpt
    run.parallel.zero_stage = args.zero
    step_cfg = StageConfig(steps=args.warmup + args.steps, lr=1e-4, micro_batch=args.micro_batch,
                           grad_accum=args.grad_accum, grad_clip=1.0)

    dims = init_parallel(tp=1, seed=0)
    try:
        model, blocks = build_model(arch, dims, moe, dtype=args.dtype, activation_checkpointing=args.act_ckpt,
                                    attention=args.attention)
        model.to("cuda" if gpu else "cpu")
        with torch.no_grad():  # random weights; RMSNorm weights 1 as in a real checkpoint
            for name, p in model.named_parameters():
                if p.dim() == 1 and "norm" in name:
                    p.fill_(1.0)
                else:
                    p.normal_(0.0, 0.02)
        if stage == 0:
            trainable = list(model.parameters())
        else:  # the parameters StageRun trains in that stage, chosen by its own rule
            trainable = select_trainable(model, stage, run.train.train_experts_in_stage2)
        engine = initialize(model, trainable, run, step_cfg, dims.dp)
        set_router_loss_scale(1.0 / args.grad_accum)
        g = torch.Generator().manual_seed(0)
        B, S, device = args.micro_batch, args.seq, engine.device
        ids = torch.randint(0, arch.vocab_size, (B, S), generator=g).to(device)
        labels = torch.randint(0, arch.vocab_size, (B, S), generator=g).to(device)
        examples = torch.arange(B, device=device)[:, None].expand(B, S)
        tasks = torch.randint(0, 3, (B,), generator=g).to(device)
        model.train()

        def step() -> float:
            for _ in range(args.grad_accum):
                if blocks:
                    set_routing_context(blocks, RoutingContext.from_batch(
                        labels, examples, tasks, force_expert=0 if stage == 1 else None, compute_losses=stage == 2))
                loss = masked_mean_loss(engine(ids, labels), labels)
                engine.backward(loss)
                engine.step()
            return loss.item()  # waits for the step, as a training loop's logging does

        for _ in range(args.warmup):
            step()
        if gpu:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        losses = [step() for _ in range(args.steps)]
        if gpu:
            torch.cuda.synchronize()
        seconds = (time.perf_counter() - t0) / args.steps
        plan = MoCaEPlan(layers=()) if moe is None else MoCaEPlan.from_mocae_config(moe)
        flops = flops_per_token(arch, plan, max(stage, 1), S, args.act_ckpt)[1]
        tokens_per_s = B * S * args.grad_accum / seconds
        peak = args.peak_tflops or (peak_tflops(None) if gpu else None)
        return {
            "variant": key, "params": sum(p.numel() for p in model.parameters()),
            "trainable": sum(p.numel() for p in trainable), "step_s": seconds, "tokens_per_s": tokens_per_s,
            "tflops": tokens_per_s * flops / 1e12, "mfu": tokens_per_s * flops / 1e12 / peak if peak else None,
            "peak_mib": torch.cuda.max_memory_allocated() / 2**20 if gpu
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "loss": losses[-1], "device": torch.cuda.get_device_name() if gpu else "cpu",
        }
    finally:
        destroy_parallel()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--tiny", action="store_true", help="the demo's tiny Llama instead of the ~1B one (CPU smoke)")
    ap.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    ap.add_argument("--seq", type=int, default=None, help="tokens per sequence [2048; tiny: 64]")
    ap.add_argument("--micro-batch", type=int, default=None,
                    help="[2; eager attention at 4 wants a 141 GB GPU: it keeps s x s scores; tiny: 2]")
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--zero", type=int, choices=(0, 1, 2, 3), default=1, help="ZeRO stage [1]")
    ap.add_argument("--act-ckpt", action="store_true", help="full activation checkpointing")
    ap.add_argument("--attention", choices=("sdpa", "eager", "te"), default="sdpa",
                    help="core attention (model.attention) [sdpa]")
    ap.add_argument("--lora-rank", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps [5; tiny: 1]")
    ap.add_argument("--steps", type=int, default=None, help="timed steps [20; tiny: 3]")
    ap.add_argument("--peak-tflops", type=float, default=None, help="GPU bf16 dense peak [by device name]")
    ap.add_argument("--variants", default="abc", help="which of a, b, c to run [abc]")
    ap.add_argument("--json", default=None, help="also write the figures to this file")
    ap.add_argument("--variant", help=argparse.SUPPRESS)  # the worker process
    args = ap.parse_args()
    for name, full, tiny in (("seq", 2048, 64), ("micro_batch", 2, 2), ("warmup", 5, 1), ("steps", 20, 3)):
        if getattr(args, name) is None:
            setattr(args, name, tiny if args.tiny else full)
    if args.variant:
        print("BENCH " + json.dumps(run_variant(args.variant, args)))
        return 0
    keys = [k for k in VARIANTS if k in args.variants]
    if not keys or set(args.variants) - set(VARIANTS):
        ap.error(f"--variants {args.variants!r}: letters among {''.join(VARIANTS)}")
    from trinityx_ds.launch.torchrun import cpu_env

    env = cpu_env({"OMP_NUM_THREADS": "2"}) if args.device == "cpu" else None
    rows = {}
    for key in keys:
        argv = [sys.executable, __file__, *sys.argv[1:], "--variant", key]
        proc = subprocess.run(argv, env=env, capture_output=True, text=True)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("BENCH ")), None)
        if proc.returncode or line is None:
            print(f"bench_gpu: variant ({key}) failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}",
                  file=sys.stderr)
            return 1
        rows[key] = json.loads(line[6:])
    print(report(rows, args))
    if args.json:
        Path(args.json).write_text(json.dumps({"args": {k: v for k, v in vars(args).items() if k != "variant"},
                                               "variants": rows}, indent=2))
    return 0


def report(rows: dict, args) -> str:
    """The table, ratios to (a), and the targets (met, missed, or not measurable here)."""
    first = next(iter(rows.values()))
    model = "tiny-llama" if args.tiny else "~1B Llama (h 2048, 16 layers, 32/8 heads, FFN 5632)"
    mem = "peak GPU MiB" if args.device == "cuda" else "peak RSS MiB"
    lines = [f"{model}: {first['params']:,} params (a); {args.dtype}, ZeRO-{args.zero}, micro-batch "
             f"{args.micro_batch} x seq {args.seq} x grad-accum {args.grad_accum}, {args.attention} attention, act-ckpt "
             f"{'on' if args.act_ckpt else 'off'}, {args.steps} timed steps after {args.warmup}; {first['device']}",
             f"{'variant':<34}{'trainable':>14}{'step s':>9}{'tokens/s':>11}{'x(a)':>7}{'TFLOP/s':>9}{'MFU':>7}"
             f"{'x(a)':>7}{mem:>14}{'x(a)':>7}"]
    a = rows.get("a")

    def ratio(r, k):
        return f"{r[k] / a[k]:.2f}" if a and r[k] is not None and a[k] else "-"

    for key, r in rows.items():
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"
        lines.append(f"({key}) {VARIANTS[key]:<30}{r['trainable']:>14,}{r['step_s']:>9.3f}{r['tokens_per_s']:>11,.0f}"
                     f"{ratio(r, 'tokens_per_s'):>7}{r['tflops']:>9.3g}{mfu:>7}{ratio(r, 'mfu'):>7}"
                     f"{r['peak_mib']:>14,.0f}{ratio(r, 'peak_mib'):>7}")
    lines.append("")
    if a:
        if a["mfu"] is None:
            lines.append(f"target (a) MFU >= {TARGET_MFU:.0%}: not measurable here (no GPU peak; "
                         "--peak-tflops sets one)")
        else:
            lines.append(f"target (a) MFU >= {TARGET_MFU:.0%}: {a['mfu']:.1%}, "
                         f"{'met' if a['mfu'] >= TARGET_MFU else 'MISSED'}")
        if "b" in rows:
            x = rows["b"]["tokens_per_s"] / a["tokens_per_s"]
            lines.append(f"target (b) within 10% of (a), tokens/s ratio >= {TARGET_STAGE1:.2f}: {x:.2f}, "
                         f"{'met' if x >= TARGET_STAGE1 else 'MISSED'}"
                         + ("" if args.device == "cuda" else " (CPU figures: the targets are for one GPU)"))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
