"""Core attention side by side: megatron's eager DotProductAttention against `sdpa` (torch's
scaled_dot_product_attention), one training step each, on CPU or one GPU.

    .venv/bin/python tools/bench_attention.py                    # CPU, s = 2048 and 4096
    .venv/bin/python tools/bench_attention.py --device cuda --seqs 2048,4096,8192
    .venv/bin/python tools/bench_attention.py --sp                 # also sdpa at TP=2, SP off and on

The model: 4 layers of SmolLM2-135M's attention shape (hidden 576, 9 heads of 64, 3 KV groups,
FFN 1536), random weights, a vocabulary of 1024 instead of 49152 so the logits do not hide the
attention's share; batch 1, fp32 on CPU (bf16 on GPU), every parameter trained by SGD. Each
(attention, s) runs in a process of its own, one untimed step then one timed step, and reports:
- saved MiB: the bytes autograd keeps for backward (saved-tensor hooks, each storage once,
  parameters excluded): the activation memory;
- peak MiB: the peak over the steps above the memory held before them (CPU: resident set size;
  GPU: torch's peak allocation), which adds the step's transient tensors to the saved ones;
- step s: the timed step's wall time.
Targets (issue #14): sdpa's activation memory at s = 4096 at most 0.3x eager's, its step no slower.

--sp adds a second table: sdpa at TP=2 (2 processes, one thread each on CPU), sequence parallelism
off and on, with what a MoCaE run trains: LoRA experts (rank 8, top-1) in every layer and their
router, the backbone frozen. Figures are rank 0's (every rank holds the same shapes).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

SMOLLM2_4L = dict(model_type="llama", hidden_act="silu", hidden_size=576, intermediate_size=1536, num_hidden_layers=4,
                  num_attention_heads=9, num_key_value_heads=3, vocab_size=1024, max_position_embeddings=8192,
                  rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True)
TARGET_MEMORY, TARGET_TIME = 0.3, 1.0


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def run_one(attention: str, seq: int, device: str, tp: int = 1, sp: bool = False) -> dict:
    import torch

    from trinityx_ds.model.arch import ModelArch
    from trinityx_ds.model.backbone import masked_mean_loss
    from trinityx_ds.model.build import build_model
    from trinityx_ds.model.mocae import MoCaEConfig
    from trinityx_ds.model.mocae_spec import mocae_role
    from trinityx_ds.parallel.groups import destroy_parallel, init_parallel

    gpu = device == "cuda"
    if gpu and tp > 1:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dims = init_parallel(tp=tp, seed=0)
    try:
        arch = ModelArch.from_hf_dict(SMOLLM2_4L)
        moe = MoCaEConfig(kind="lora", top_k=1) if tp > 1 else None
        model, _ = build_model(arch, dims, moe, dtype="bf16" if gpu else "fp32", attention=attention,
                               sequence_parallel=sp)
        model.to(device)
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.fill_(1.0) if p.dim() == 1 and "norm" in name else p.normal_(0.0, 0.02)
                if moe is not None:
                    p.requires_grad_(mocae_role(name) is not None)
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, arch.vocab_size, (1, seq), generator=g).to(device)
        labels = torch.randint(0, arch.vocab_size, (1, seq), generator=g).to(device)
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        saved: dict[int, int] = {}

        def pack(t):
            s = t.untyped_storage()
            if s.data_ptr() not in params:
                saved[s.data_ptr()] = s.nbytes()
            return t

        def step() -> float:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                loss = masked_mean_loss(model(ids, labels), labels)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss.item()

        if gpu:
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated() / 2**20
            torch.cuda.reset_peak_memory_stats()
        else:
            before = _rss_mib()
        step()  # untimed: first-touch allocations, the eager module's score buffer, kernel choice
        saved.clear()
        if gpu:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = step()
        if gpu:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated() / 2**20 if gpu else \
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        kind = attention if tp == 1 else f"{attention} tp{tp}{' SP' if sp else ''}"
        return {"attention": kind, "seq": seq, "step_s": seconds, "saved_mib": sum(saved.values()) / 2**20,
                "peak_mib": peak - before, "loss": loss, "device": torch.cuda.get_device_name() if gpu else "cpu",
                "core": type(model.decoder.layers[0].self_attention.core_attention).__name__}
    finally:
        destroy_parallel()


def _table(by: dict, seqs: list[int], kinds: tuple[str, str], against: str, width: int) -> list[str]:
    """Header and rows of `kinds` at each s, each figure also as a ratio to the first kind's."""
    lines = [f"{'s':>6}{'attention':>{width}}{'saved MiB':>11}{against:>9}{'peak MiB':>10}{against:>9}"
             f"{'step s':>9}{against:>9}{'loss':>9}"]
    for s in seqs:
        base = by[(kinds[0], s)]
        for kind in kinds:
            r = by[(kind, s)]
            lines.append(f"{s:>6}{kind:>{width}}{r['saved_mib']:>11,.0f}{r['saved_mib'] / base['saved_mib']:>9.2f}"
                         f"{r['peak_mib']:>10,.0f}{r['peak_mib'] / base['peak_mib']:>9.2f}{r['step_s']:>9.2f}"
                         f"{r['step_s'] / base['step_s']:>9.2f}{r['loss']:>9.4f}")
    return lines


def report(rows: list[dict], seqs: list[int]) -> str:
    by = {(r["attention"], r["seq"]): r for r in rows}
    lines = [f"4-layer SmolLM2-shaped model (hidden 576, 9 heads x 64, 3 KV groups, FFN 1536, vocab 1024), "
             f"batch 1, one training step; {rows[0]['device']}",
             *_table(by, seqs, ("eager", "sdpa"), "x eager", 11)]
    s = max(seqs)
    e, d = by[("eager", s)], by[("sdpa", s)]
    mem, peak, t = d["saved_mib"] / e["saved_mib"], d["peak_mib"] / e["peak_mib"], d["step_s"] / e["step_s"]
    lines += ["", f"target at s = {s}: sdpa activation memory <= {TARGET_MEMORY}x eager: saved {mem:.2f}x, "
                  f"peak {peak:.2f}x, {'met' if max(mem, peak) <= TARGET_MEMORY else 'MISSED'}; "
                  f"step no slower: {t:.2f}x, {'met' if t <= TARGET_TIME else 'MISSED'}"]
    if ("sdpa tp2", s) in by:
        lines += ["", "sdpa at TP=2, LoRA MoCaE blocks in every layer trained (router + experts), backbone frozen; "
                      "rank 0 of 2", *_table(by, seqs, ("sdpa tp2", "sdpa tp2 SP"), "x no SP", 15)]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--seqs", default="2048,4096", help="sequence lengths, comma-separated [2048,4096]")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads per run [2]")
    ap.add_argument("--json", default=None, help="also write the figures to this file")
    ap.add_argument("--sp", action="store_true", help="also sdpa at TP=2 with sequence parallelism off and on")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # the worker: ATTENTION:SEQ[:TP:SP]
    args = ap.parse_args()
    if args.one:
        attention, seq, *par = args.one.split(":")
        tp, sp = (int(par[0]), par[1] == "1") if par else (1, False)
        row = run_one(attention, int(seq), args.device, tp, sp)
        if int(os.environ.get("RANK", 0)) == 0:
            print("BENCH " + json.dumps(row))
        return 0
    from trinityx_ds.launch.torchrun import cpu_env

    seqs = [int(s) for s in args.seqs.split(",")]
    env = cpu_env({"OMP_NUM_THREADS": str(args.threads)}) if args.device == "cpu" else dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]),
                                                      os.environ.get("PYTHONPATH")]))
    rows = []
    runs = [("eager", 1, False), ("sdpa", 1, False)] + ([("sdpa", 2, False), ("sdpa", 2, True)] if args.sp else [])
    for seq in seqs:
        for attention, tp, sp in runs:
            argv = [sys.executable, __file__, "--device", args.device, "--one", f"{attention}:{seq}:{tp}:{int(sp)}"]
            run_env = env
            if tp > 1:  # one process per TP rank; on CPU the same two cores, one thread each
                argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={tp}",
                        *argv[1:]]
                run_env = {**env, "OMP_NUM_THREADS": str(max(1, args.threads // tp))} if args.device == "cpu" else env
            proc = subprocess.run(argv, env=run_env, capture_output=True, text=True)
            line = next((x for x in proc.stdout.splitlines() if x.startswith("BENCH ")), None)
            if proc.returncode or line is None:
                print(f"bench_attention: {attention} tp {tp} sp {sp} at s = {seq} failed (exit {proc.returncode}):\n"
                      f"{proc.stderr[-3000:]}", file=sys.stderr)
                return 1
            rows.append(json.loads(line[6:]))
            print(f"  {attention:>5} s={seq}: {rows[-1]['step_s']:.2f} s, saved {rows[-1]['saved_mib']:,.0f} MiB",
                  file=sys.stderr, flush=True)
    print(report(rows, seqs))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
