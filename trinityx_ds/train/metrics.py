"""What a run reports, on rank 0 only: TensorBoard scalars, the same as JSON lines, a progress bar."""
from __future__ import annotations

import functools
import json
import time
import warnings
from pathlib import Path

import torch
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from trinityx_ds.plan.params import MoCaEPlan
from trinityx_ds.plan.throughput import flops_per_token, gpu_peak_tflops
from trinityx_ds.storage.atomic import write_text
from trinityx_ds.storage.layout import METRICS, TENSORBOARD

PROGRESS = ("train/loss", "train/tokens_per_s", "train/mfu", "train/lr")  # shown on the progress bar


@functools.cache
def peak_tflops(configured: float | None) -> float | None:
    """`train.peak_tflops`, else the bf16 dense peak of this process's GPU by its name; None on CPU
    (and, with a warning, for a GPU the table does not know)."""
    if configured is not None:
        return configured
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    peak = gpu_peak_tflops(name)
    if peak is None:
        warnings.warn(f"train.peak_tflops: not set, and {name!r} is not in the peak table "
                      "(plan/throughput.py): train/mfu is not logged", stacklevel=2)
    return peak


def step_flops(cfg, arch, moe_cfg, stage: int, tokens_per_s: float, seq_len: int, world: int) -> dict[str, float]:
    """`train/tflops_per_gpu` of a step and, where the GPU's peak is known, `train/mfu`.

    Model FLOPs per token as the planner counts them (`flops_per_token`: 6 N_active + 12 L H s,
    Megatron's and torchtitan's MFU count; recomputation and the weight gradients frozen weights
    skip are not counted), over `tokens_per_s` of the whole job (padding included) on `world` GPUs.
    """
    moe = MoCaEPlan.from_mocae_config(moe_cfg, cfg.train.train_experts_in_stage2)
    tflops = tokens_per_s * flops_per_token(arch, moe, stage, seq_len, cfg.model.activation_checkpointing)[1] \
        / world / 1e12
    peak = peak_tflops(cfg.train.peak_tflops)
    return {"train/tflops_per_gpu": tflops} | ({"train/mfu": tflops / peak} if peak else {})


def keep_until(path: Path, step: int) -> None:
    """Cut a metrics file back to the rows of steps <= `step` (the step a run resumes from): the
    steps logged after the last checkpoint by an attempt that then died are trained again, and
    their rows would otherwise appear twice. A row cut short by a crash ends what is kept."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
        try:
            row = json.loads(line)
        except ValueError:
            break
        if not line.endswith("\n"):
            break
        if row.get("step", 0) <= step:
            kept.append(line)
    text = "".join(kept)
    if text != path.read_text(encoding="utf-8"):
        write_text(path, text)


class MetricsLogger:
    def __init__(self, out_dir: str | Path, total_steps: int, start_step: int, enabled: bool,
                 tensorboard: bool = True, desc: str = "train"):
        self.enabled = enabled
        if not enabled:
            return
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        keep_until(out_dir / METRICS, start_step)
        self.jsonl = open(out_dir / METRICS, "a")
        self.tb = None
        if tensorboard:
            # events after the step resumed from are the lost attempt's: TensorBoard drops them
            self.tb = SummaryWriter(str(out_dir / TENSORBOARD), purge_step=start_step + 1 if start_step else None)
        self.bar = tqdm(total=total_steps, initial=start_step, desc=desc, dynamic_ncols=True)

    def log(self, step: int, scalars: dict[str, float], progress: bool = True) -> None:
        if not self.enabled:
            return
        for tag, value in scalars.items():
            if self.tb is not None:
                self.tb.add_scalar(tag, value, step)
        self.jsonl.write(json.dumps({"step": step, "time": time.time(), **scalars}) + "\n")
        self.jsonl.flush()
        if progress:
            self.bar.update(1)
            shown = {k.split("/", 1)[-1]: f"{v:.4g}" for k, v in scalars.items() if k in PROGRESS}
            self.bar.set_postfix(shown, refresh=False)

    def close(self) -> None:
        if self.enabled:
            self.bar.close()
            self.jsonl.close()
            if self.tb is not None:
                self.tb.close()
