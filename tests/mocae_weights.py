"""HF-space weights for MoCaE tests: the tiny backbone's tensors plus seeded router and expert
tensors, so models of any TP/EP layout load exactly the same function."""
import torch

from trinityx_ds.storage.sources import DictSource, SafetensorsSource
from trinityx_ds.model.arch import ModelArch


def mocae_source(folder, cfg, seed: int = 0, zero_delta: bool = False, router_std: float = 0.5) -> DictSource:
    arch = ModelArch.from_hf_dir(folder)
    base = SafetensorsSource(folder)
    tensors = {k: base.read(k) for k in base.keys()}
    g = torch.Generator().manual_seed(seed)
    H, F, E = arch.hidden_size, arch.intermediate_size, cfg.num_experts
    rnd = lambda *shape, std=0.02: torch.randn(*shape, generator=g) * std  # noqa: E731
    for i in cfg.layer_ids(arch.num_layers):
        pre = f"model.layers.{i}.mlp."
        tensors[pre + "router.weight"] = rnd(E, H, std=router_std)
        tensors[pre + "router.log_temperature"] = torch.tensor([float(torch.tensor(cfg.temperature).log())])
        gamma = cfg.importance or [1.0] * E
        tensors[pre + "router.log_importance"] = torch.tensor(gamma).log()
        if cfg.normalize_output:
            tensors[pre + "post_norm.weight"] = 1 + rnd(H, std=0.1)
        for n in cfg.expert_names:
            ex = f"{pre}experts.{n}."
            for t in ("gate_proj", "up_proj", "down_proj"):
                fan_out, fan_in = (H, F) if t == "down_proj" else (F, H)
                if cfg.kind == "full":
                    tensors[ex + f"{t}.weight"] = tensors[pre + f"{t}.weight"] + (0 if zero_delta else rnd(fan_out, fan_in))
                elif t in cfg.lora_targets:
                    tensors[ex + f"{t}.lora_A.weight"] = rnd(cfg.lora_rank, fan_in, std=0.3)
                    tensors[ex + f"{t}.lora_B.weight"] = torch.zeros(fan_out, cfg.lora_rank) if zero_delta \
                        else rnd(fan_out, cfg.lora_rank, std=0.3)
    return DictSource(tensors)
