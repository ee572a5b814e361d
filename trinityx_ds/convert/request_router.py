"""`RequestRouter`: the backbone of a `--format peft` export and its router, picking one adapter per
request (convert/route.py says how, and is its command)."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from trinityx_ds.convert.adapters import router_files
from trinityx_ds.data.render import render_text
from trinityx_ds.errors import CheckpointError
from trinityx_ds.model.router import CalibratedRouter  # the training router itself


class _Stop(Exception):
    """Raised by the last MoCaE layer's hook: nothing after it is needed."""


class RequestRouter:
    """The backbone of a peft export and its router: per-layer probabilities, and the pick."""

    def __init__(self, export_dir: str | Path, device: str = "cpu"):
        weights, meta = router_files(export_dir)
        if not meta.is_file() or not weights.is_file():
            raise CheckpointError(f"{meta}: missing (not an `export-hf --format peft` folder)")
        self.meta = json.loads(meta.read_text())
        self.names = list(self.meta["expert_names"])
        self.layers = [entry["layer"] for entry in self.meta["layers"]]
        tensors = load_file(str(weights))
        self.router = {}
        for i in self.layers:
            pre = f"model.layers.{i}.mlp.router."
            state = {k.removeprefix(pre): v for k, v in tensors.items() if k.startswith(pre)}
            router = CalibratedRouter(state["weight"].shape[1], len(self.names), bias="bias" in state)
            router.load_state_dict(state)
            self.router[i] = router.to(device).eval()
        self.model = AutoModelForCausalLM.from_pretrained(export_dir, dtype="auto").to(device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(export_dir, local_files_only=True)
        self.device = device

    def encode(self, prompt: str, raw: bool = False) -> list[int]:
        if raw:
            return self.tokenizer(prompt)["input_ids"]
        text = render_text(self.tokenizer, [{"role": "user", "content": prompt}], add_generation_prompt=True)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    @torch.no_grad()
    def layer_probs(self, ids: list[int]) -> torch.Tensor:
        """p [L, T, E]: each MoCaE layer's calibrated probabilities of each token of one request."""
        inputs, last = {}, max(self.layers)

        def hook(i):
            def capture(module, args):
                inputs[i] = args[0]
                if i == last:
                    raise _Stop
            return capture

        decoder = self.model.get_decoder()
        handles = [decoder.layers[i].mlp.register_forward_pre_hook(hook(i)) for i in self.layers]
        try:
            self.model(torch.tensor([ids], device=self.device), use_cache=False)
        except _Stop:
            pass
        finally:
            for h in handles:
                h.remove()
        return torch.stack([self.router[i](inputs[i]).probs_TE for i in self.layers])

    def pick(self, ids: list[int]) -> tuple[str, list[float]]:
        """(adapter name, mean probability per expert over the tokens, then the MoCaE layers)."""
        mean_E = self.layer_probs(ids).mean(dim=1).mean(dim=0)
        return self.names[int(mean_E.argmax())], mean_E.tolist()
