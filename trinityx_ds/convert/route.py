"""`trinityx route`: which adapter of a `--format peft` export should serve a request.

vLLM serves one LoRA adapter per request, not TrinityX's per-token mixture. This helper gives the
request-level choice: the backbone (transformers) runs on the prompt up to the last MoCaE layer,
each MoCaE layer's router turns its input into calibrated probabilities

    p_TE = softmax(x_TH W^T / T + log gamma)   (fp32, + bias where the router has one)

by the training router itself (model/router.py's `CalibratedRouter`, which the exported TrinityX
model's `TrinityXRouter` equals: hf_model/modeling_trinityx.py),
and the request goes to argmax_e of p averaged over the prompt's tokens, then over the MoCaE layers.

The router's input x is the input of the layer's MLP (after post_attention_layernorm), captured
with a forward pre-hook on the MLP: `output_hidden_states` gives the residual stream before each
layer, which the router never sees. Exact for the first MoCaE layer; a later MoCaE layer sees the
backbone's hidden states, not those of a mixture or of the adapter that will serve the request
(no adapter is chosen yet). tools/route_agreement.py measures how often this request-level pick
equals the token-level routing's majority and what it costs in log-likelihood.

Prompts are rendered as training and evaluation render them (data/render.py: the tokenizer's chat
template, else the default one, as one user turn with the assistant header); `raw` tokenises the
text as it is (what a completions request sends).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from trinityx_ds.convert.adapters import router_files
from trinityx_ds.errors import CheckpointError


class _Stop(Exception):
    """Raised by the last MoCaE layer's hook: nothing after it is needed."""


class RequestRouter:
    """The backbone of a peft export and its router: per-layer probabilities, and the pick."""

    def __init__(self, export_dir: str | Path, device: str = "cpu"):
        from safetensors.torch import load_file
        from transformers import AutoModelForCausalLM, AutoTokenizer

        weights, meta = router_files(export_dir)
        if not meta.is_file() or not weights.is_file():
            raise CheckpointError(f"{meta}: missing (not an `export-hf --format peft` folder)")
        self.meta = json.loads(meta.read_text())
        self.names = list(self.meta["expert_names"])
        self.layers = [entry["layer"] for entry in self.meta["layers"]]
        from trinityx_ds.model.router import CalibratedRouter  # torch only: the training router itself

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
        from trinityx_ds.data.render import render_text

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


# ---------------------------------------------------------------------------------------- CLI
def add_route_arguments(p) -> None:
    p.add_argument("--export", required=True, help="folder written by `trinityx export-hf RUN OUT --format peft`")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="one request: prints the adapter's name")
    src.add_argument("--jsonl", help="requests, one JSON object a line with a 'prompt' (or 'text') field: prints "
                                     "one JSON line each ({adapter, adapter_path, probs})")
    p.add_argument("--raw", action="store_true", help="tokenise the prompt as is (no chat template)")
    p.add_argument("--device", default="cpu")


def _prompts(path: str):
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        text = row.get("prompt", row.get("text")) if isinstance(row, dict) else None
        if not isinstance(text, str):
            raise ValueError(f"{path}:{n}: no 'prompt' (or 'text') string")
        yield text


def cmd_route(args) -> int:
    router = RequestRouter(args.export, args.device)
    if args.prompt is not None:
        print(router.pick(router.encode(args.prompt, args.raw))[0])
        return 0
    for text in _prompts(args.jsonl):
        name, probs = router.pick(router.encode(text, args.raw))
        print(json.dumps({"adapter": name, "adapter_path": str(Path(args.export) / router.meta["adapters"][name]),
                          "probs": dict(zip(router.names, probs))}))
        sys.stdout.flush()
    return 0
