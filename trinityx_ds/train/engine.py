"""The DeepSpeed engine of a stage: ZeRO knobs from ds_configs/, everything the run decides
(batch sizes, clipping, precision, optimizer, schedule) from the run's YAML."""
from __future__ import annotations

import json
import math
from pathlib import Path

import deepspeed
import torch

from trinityx_ds.parallel.deepspeed_compat import load_weights_only
from trinityx_ds.parallel.groups import DeepSpeedMPU
from trinityx_ds.storage.resources import data_file



def zero_file(parallel) -> Path | None:
    """The ds_configs file a run uses: its own `parallel.ds_config`, else the stock one shipped as
    package data (storage/resources.py: found the same way in a checkout and an installed wheel).
    None only where no stock file exists for the setting (e.g. zero1 with offload)."""
    if parallel.ds_config:
        return Path(parallel.ds_config)
    name = f"zero{parallel.zero_stage}{'_offload' if parallel.offload == 'cpu' else ''}.json"
    path = data_file("ds_configs", name)
    return path if path.is_file() else None


def deepspeed_config(run, stage, dp: int) -> dict:
    """A complete DeepSpeed config for one stage of `run` on `dp` data-parallel ranks."""
    base_file = zero_file(run.parallel)
    cfg = json.loads(base_file.read_text()) if base_file else {}
    zero = cfg.setdefault("zero_optimization", {})
    zero["stage"] = run.parallel.zero_stage  # the run's YAML wins over the file
    if run.parallel.offload == "cpu":
        zero.setdefault("offload_optimizer", {"device": "cpu"})
    cfg.update({
        "train_micro_batch_size_per_gpu": stage.micro_batch,
        "gradient_accumulation_steps": stage.grad_accum,
        "train_batch_size": stage.micro_batch * stage.grad_accum * dp,
        # DeepSpeed silently clips at 1.0 when this is absent: always say it (0 = off)
        "gradient_clipping": stage.grad_clip,
        "bf16": {"enabled": run.model.dtype == "bf16"},
        "fp16": {"enabled": run.model.dtype == "fp16", "initial_scale_power": 16},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
    })
    if run.model.dtype == "bf16":
        # gradients accumulated over the micro-batches in fp32, as megatron's main_grad: bf16 sums
        # of 8-16 micro-batches lose the small ones (ZeRO-1: DeepSpeed's BF16_Optimizer; ZeRO-2/3:
        # their fp32 accumulation buffer). fp16 keeps its loss-scaled fp16 path.
        cfg["data_types"] = {"grad_accum_dtype": "fp32"}
    if run.parallel.offload == "cpu":  # ZeRO-Offload needs DeepSpeed's own CPU Adam
        cfg["optimizer"] = {"type": "AdamW", "params": {"lr": stage.lr, "weight_decay": stage.weight_decay}}
    return cfg


def make_optimizer(params: list[torch.nn.Parameter], stage) -> torch.optim.Optimizer:
    if stage.optimizer == "sgd":
        return torch.optim.SGD(params, lr=stage.lr, weight_decay=stage.weight_decay)
    return torch.optim.AdamW(params, lr=stage.lr, weight_decay=stage.weight_decay)


def lr_lambda(stage):
    """Linear warm-up, then cosine decay to 10% of the peak over the remaining steps."""
    def f(step: int) -> float:
        if step < stage.warmup_steps:
            return (step + 1) / stage.warmup_steps
        span = max(stage.steps - stage.warmup_steps, 1)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(step - stage.warmup_steps, span) / span))
    return f


def initialize(model: torch.nn.Module, trainable: list[torch.nn.Parameter], run, stage, dp: int):
    """deepspeed.initialize with megatron's groups as DeepSpeed's mpu (TP-aware ZeRO)."""
    config = deepspeed_config(run, stage, dp)
    optimizer = None if "optimizer" in config else make_optimizer(trainable, stage)
    engine, optimizer, _, _ = deepspeed.initialize(
        model=model, model_parameters=trainable, optimizer=optimizer, config=config, mpu=DeepSpeedMPU(),
        lr_scheduler=(lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(stage))))
    load_weights_only(engine)  # resume never runs code a checkpoint file carries
    return engine
