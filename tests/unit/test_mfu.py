"""Training's throughput figures: TFLOP/s per GPU and MFU from the planner's model-FLOPs count and
the GPU's bf16 peak (configured, or by device name), logged to TensorBoard, JSONL and the bar."""
from __future__ import annotations

import json

import pytest
import torch

from trinityx_ds.config.schema import RunConfig, TrainConfig
from trinityx_ds.config.typed import build
from trinityx_ds.model.mocae import MoCaEConfig
from trinityx_ds.plan import load_arch
from trinityx_ds.plan.throughput import gpu_peak_tflops
from trinityx_ds.train import metrics
from trinityx_ds.train.metrics import MetricsLogger, step_flops


@pytest.fixture(autouse=True)
def fresh_peak():
    metrics.peak_tflops.cache_clear()
    yield
    metrics.peak_tflops.cache_clear()


def test_mfu_is_model_flops_over_gpus_and_peak():
    arch = load_arch("llama-2-7b")[1]
    cfg = RunConfig()
    cfg.train.peak_tflops = 400.0
    moe = MoCaEConfig(expert_names=["help"], lora_rank=8)  # stage 1 builds one expert
    s, world = 4096, 8
    got = step_flops(cfg, arch, moe, 1, tokens_per_s=world * 3000.0, seq_len=s, world=world)
    # 6 x active params without the input embedding and the norms, + 12 L H s for attention scores
    N = 6_738_415_616 - 32000 * 4096 - (32 * 2 * 4096 + 4096)
    lora, router = 32 * 3 * 8 * (4096 + 11008), 32 * 4096
    flops = 6 * (N + lora + router) + 12 * 32 * 4096 * s
    assert got["train/tflops_per_gpu"] == pytest.approx(3000.0 * flops / 1e12, rel=1e-12)
    assert got["train/mfu"] == pytest.approx(got["train/tflops_per_gpu"] / 400.0, rel=1e-12)
    # recomputation is not model FLOPs: checkpointing leaves the figure alone
    cfg.model.activation_checkpointing = True
    assert step_flops(cfg, arch, moe, 1, world * 3000.0, s, world) == got


def test_peak_from_the_gpu_name_or_none(monkeypatch):
    assert [gpu_peak_tflops(n) for n in ("NVIDIA H100 80GB HBM3", "NVIDIA H100 PCIe", "NVIDIA H200",
                                         "NVIDIA A100-SXM4-80GB", "Tesla V100-SXM2-32GB")] == \
        [989.0, 756.0, 989.0, 312.0, None]
    arch, moe, cfg = load_arch("tiny-llama")[1], MoCaEConfig(), RunConfig()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert set(step_flops(cfg, arch, moe, 2, 1000.0, 64, 2)) == {"train/tflops_per_gpu"}  # CPU: no MFU
    metrics.peak_tflops.cache_clear()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 80GB HBM3")
    got = step_flops(cfg, arch, moe, 2, 1000.0, 64, 2)
    assert got["train/mfu"] == pytest.approx(got["train/tflops_per_gpu"] / 989.0)
    metrics.peak_tflops.cache_clear()
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla V100-SXM2-32GB")
    with pytest.warns(UserWarning, match="train.peak_tflops: not set"):
        assert "train/mfu" not in step_flops(cfg, arch, moe, 2, 1000.0, 64, 2)


def test_peak_tflops_is_validated():
    assert TrainConfig(peak_tflops=-1.0).problems("train") == [
        "train.peak_tflops: -1.0 — the GPU's peak TFLOP/s (> 0, bf16 dense), or null to take it from the GPU's name"]
    out: list[str] = []
    build(TrainConfig, {"peak_tflops": "fast"}, "train", out)
    assert out == ["train.peak_tflops: 'fast' — a number or null"]


def test_mfu_reaches_tensorboard_jsonl_and_the_progress_bar(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log = MetricsLogger(tmp_path, total_steps=2, start_step=0, enabled=True)
    log.log(1, {"train/loss": 2.5, "train/tokens_per_s": 1e5, "train/tflops_per_gpu": 415.0, "train/mfu": 0.42})
    assert "mfu=0.42" in log.bar.postfix and "tflops" not in log.bar.postfix
    log.close()
    row = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert (row["train/mfu"], row["train/tflops_per_gpu"]) == (0.42, 415.0)
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert {"train/mfu", "train/tflops_per_gpu"} <= set(acc.Tags()["scalars"])
