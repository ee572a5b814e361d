"""What a run reports, on rank 0 only: TensorBoard scalars, the same as JSON lines, a progress bar."""
from __future__ import annotations

import json
import time
from pathlib import Path


class MetricsLogger:
    def __init__(self, out_dir: str | Path, total_steps: int, start_step: int, enabled: bool,
                 tensorboard: bool = True, desc: str = "train"):
        self.enabled = enabled
        if not enabled:
            return
        from tqdm import tqdm

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(out_dir / "metrics.jsonl", "a")
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out_dir / "tensorboard"))
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
            shown = {k.split("/", 1)[-1]: f"{v:.4g}" for k, v in scalars.items()
                     if k in ("train/loss", "train/tokens_per_s", "train/lr")}
            self.bar.set_postfix(shown, refresh=False)

    def close(self) -> None:
        if self.enabled:
            self.bar.close()
            self.jsonl.close()
            if self.tb is not None:
                self.tb.close()
