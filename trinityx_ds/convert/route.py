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

The command's parser is built by every `trinityx` invocation (`--help` included): this module
imports nothing heavy; `RequestRouter` (torch, transformers) is convert/request_router.py's, named
here as ever, imported when first used.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


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
    from trinityx_ds.convert.request_router import RequestRouter

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
