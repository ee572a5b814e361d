"""Forward latency and memory of MoCaE variants against the plain backbone, side by side (CPU).

    .venv/bin/python tools/bench_mocae.py [--model smollm2-135m|tiny|HF_DIR] [--batch 4 --seq 256]

Each variant runs in its own process (so peak RSS is its own), on the same random weights of
the same architecture:
  (a) backbone alone                      (b) MoCaE lora, top-1 (TrinityX inference)
  (c) MoCaE full, top-1                   (d) dense mixing of 3 full experts
  (e) H3Fusion-style: top-2 of 3 full experts, uncalibrated linear router (T=1, no priors)
Prints ratios to (a) and of (b) to (e); ratios are the figures to quote on CPU. glibc's malloc is
set to keep freed memory, as a GPU's caching allocator does (`--glibc-default` to compare).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

VARIANTS = {
    "a": ("backbone alone", None),
    "b": ("MoCaE lora top-1", dict(kind="lora", top_k=1)),
    "c": ("MoCaE full top-1", dict(kind="full", top_k=1)),
    "d": ("dense mix of 3 full experts", dict(kind="full", top_k="all")),
    "e": ("H3Fusion-style top-2 of 3 full", dict(kind="full", top_k=2, temperature=1.0)),
}
MALLOC_CACHING = {"MALLOC_MMAP_THRESHOLD_": str(2**31), "MALLOC_TRIM_THRESHOLD_": str(2**31)}
ARCHS = {
    "smollm2-135m": dict(model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                         num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True,
                         rms_norm_eps=1e-5, rope_theta=100000.0, max_position_embeddings=8192),
    "tiny": dict(model_type="llama", vocab_size=1001, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256),
}


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_variant(key: str, model: str, batch: int, seq: int, iters: int) -> dict:
    import torch

    from trinityx_ds.model.arch import ModelArch
    from trinityx_ds.model.build import build_model
    from trinityx_ds.model.mocae_spec import MoCaEConfig
    from trinityx_ds.parallel.groups import init_parallel

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    dims = init_parallel(tp=1)
    arch = ModelArch.from_hf_dir(model) if os.path.isdir(model) else ModelArch.from_hf_dict(ARCHS[model])
    cfg = MoCaEConfig(**VARIANTS[key][1]) if VARIANTS[key][1] else None
    before = rss_mib()
    net, blocks = build_model(arch, dims, cfg)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.02)
    net.eval()
    ids = torch.randint(0, arch.vocab_size, (batch, seq))
    times = []
    with torch.no_grad():
        for i in range(iters + 1):
            t0 = time.perf_counter()
            net.logits(ids)
            if i:  # the first call warms up
                times.append(time.perf_counter() - t0)
    return {"variant": key, "latency_s": statistics.median(times), "peak_rss_mib": rss_mib() - before,
            "params": sum(p.numel() for p in net.parameters())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3, help="variants run round-robin this many times; medians [3]")
    ap.add_argument("--glibc-default", action="store_true", help="keep glibc's malloc thresholds (see main)")
    ap.add_argument("--variant", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args.variant, args.model, args.batch, args.seq, args.iters)))
        return
    from trinityx_ds.launch.torchrun import cpu_env

    runs: dict[str, list[dict]] = {key: [] for key in VARIANTS}
    # glibc returns every large freed tensor to the OS and faults it back in on the next forward,
    # which charges each variant for its temporaries' page faults; a GPU's caching allocator keeps
    # them. Raising glibc's thresholds keeps them here too (every variant alike).
    env = cpu_env({"RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(29600),
                   **({} if args.glibc_default else MALLOC_CACHING)})
    for _ in range(args.rounds):  # round-robin, so a noisy neighbour hits every variant alike
        for key in VARIANTS:
            out = subprocess.run([sys.executable, __file__, "--variant", key, "--model", args.model, "--batch",
                                  str(args.batch), "--seq", str(args.seq), "--iters", str(args.iters)],
                                 env=env, capture_output=True, text=True, check=True)
            runs[key].append(json.loads(out.stdout.strip().splitlines()[-1]))
    rows = {key: {"params": r[0]["params"],
                  "latency_s": statistics.median(x["latency_s"] for x in r),
                  "peak_rss_mib": statistics.median(x["peak_rss_mib"] for x in r)} for key, r in runs.items()}
    a, b, e = rows["a"], rows["b"], rows["e"]
    print(f"model={args.model} batch={args.batch} seq={args.seq} threads={os.environ.get('BENCH_THREADS', '2')} "
          f"malloc={'glibc default' if args.glibc_default else 'caching'}")
    print(f"{'variant':<36} {'params':>13} {'x(a)':>6} {'fwd s':>8} {'x(a)':>6} {'peak RSS MiB':>13} {'x(a)':>6}")
    for key, (name, _) in VARIANTS.items():
        r = rows[key]
        print(f"({key}) {name:<32} {r['params']:>13,} {r['params'] / a['params']:>6.2f} {r['latency_s']:>8.3f} "
              f"{r['latency_s'] / a['latency_s']:>6.2f} {r['peak_rss_mib']:>13.0f} {r['peak_rss_mib'] / a['peak_rss_mib']:>6.2f}")
    print(f"\n(b) vs (a): latency {b['latency_s'] / a['latency_s']:.2f}x (target <= 1.15), "
          f"params {b['params'] / a['params']:.3f}x (target <= 1.05)")
    print(f"(b) vs (e): latency {100 * (1 - b['latency_s'] / e['latency_s']):.0f}% lower, "
          f"memory {100 * (1 - b['peak_rss_mib'] / e['peak_rss_mib']):.0f}% lower, "
          f"params {100 * (1 - b['params'] / e['params']):.0f}% lower (target >= 50%)")


if __name__ == "__main__":
    main()
