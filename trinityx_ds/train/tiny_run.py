"""A small, complete run around a tiny generated model (model/tiny.py): its config, and stage-1
outputs made without running stage 1. What the training tests and tools/gpu_check.py run; kept in
the package (not tests/) because the GPU check runs on a node that has the package and no tests.
"""
from __future__ import annotations

from pathlib import Path

import torch
import yaml
from safetensors.torch import save_file

from trinityx_ds.config import load_config
from trinityx_ds.model.arch import ModelArch
from trinityx_ds.model.experts import lora_init_tensors
from trinityx_ds.model.mocae import MoCaEConfig
from trinityx_ds.model.tiny import make_tiny_model
from trinityx_ds.storage.layout import expert_file
from trinityx_ds.storage.resources import fixtures_dir
from trinityx_ds.storage.sources import SafetensorsSource

FIXTURES = fixtures_dir()
FOUR_FULL_EXPERTS = {"experts": {"kind": "full", "names": ["help", "harm", "honest", "instruct"]},
                     "data.tasks.instruct": [{"path": str(FIXTURES / "self_instruct_tiny.jsonl"),
                                              "format": "self_instruct"}],
                     "train.train_experts_in_stage2": True}


def write_config(root: Path, model_dir: Path | None = None, **sections) -> Path:
    """YAML under `root` (model made there unless given); `sections` override dotted keys, e.g.
    write_config(tmp, parallel={"tp": 2}, **{"train.stage2.steps": 5})."""
    model_dir = model_dir or make_tiny_model(root / "model")
    cfg = {
        "name": "test", "seed": 7,
        "model": {"hf_path": str(model_dir)},
        "experts": {"kind": "lora", "lora": {"rank": 4, "alpha": 8.0}},
        "router": {"top_k": 1},
        "parallel": {"tp": 1, "zero_stage": 3},
        "data": {"tasks": {
            "help": [{"path": str(FIXTURES / "alpaca_tiny.jsonl"), "format": "alpaca"}],
            "harm": [{"path": str(FIXTURES / "hh_rlhf_tiny.jsonl"), "format": "hh_rlhf"}],
            "honest": [{"path": str(FIXTURES / "truthfulqa_tiny.jsonl"), "format": "truthfulqa"}]},
            "max_seq_len": 64, "chat_template": "default", "heldout_fraction": 0.2},
        "train": {"stage1": {"steps": 5, "lr": 1e-3, "micro_batch": 2},
                  "stage2": {"steps": 5, "lr": 1e-2, "micro_batch": 2},
                  "checkpoint_every": 100, "log_every": 1},
        "output": {"dir": str(root / "out"), "tensorboard": True},
    }
    for key, value in sections.items():
        node = cfg
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        if isinstance(value, dict) and isinstance(node.get(last), dict):
            node[last].update(value)
        else:
            node[last] = value
    root.mkdir(parents=True, exist_ok=True)
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def write_random_experts(cfg_path: Path, seed: int = 3, std: float = 0.2) -> None:
    """Stage-1 outputs without running stage 1: non-zero LoRA deltas, or (full experts) the
    backbone FFN plus noise of `std` / 10."""
    cfg = load_config(cfg_path)
    arch = ModelArch.from_hf_dir(cfg.model.hf_path)
    backbone = SafetensorsSource(cfg.model.hf_path)
    g = torch.Generator().manual_seed(seed)
    for name in cfg.experts.names:
        moe = MoCaEConfig.from_run_config(cfg).one_expert(name)
        if moe.kind == "full":
            tensors = {}
            for i in moe.layer_ids(arch.num_layers):
                for t in ("gate_proj", "up_proj", "down_proj"):
                    base = backbone.read(f"model.layers.{i}.mlp.{t}.weight")
                    tensors[f"model.layers.{i}.mlp.experts.{name}.{t}.weight"] = \
                        base + torch.randn(base.shape, generator=g) * std / 10
        else:
            tensors = lora_init_tensors(arch, moe, seed)
            for k, v in tensors.items():
                if k.endswith("lora_B.weight"):
                    tensors[k] = torch.randn(v.shape, generator=g) * std
        path = expert_file(cfg, name)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(path))
