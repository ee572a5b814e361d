"""Log-likelihood of a continuation after a chat prompt, with our megatron model (any TP, DP-sharded).

Prompt format: the prompt messages rendered as the model is trained and asked (`render_text`
with the tokenizer's chat template, or the default template, and `add_generation_prompt=True`,
so the text ends with the assistant header), then the continuation's own tokens (tokenised
alone, no special tokens, no end-of-turn: the score is log p(answer text | prompt), as in
lm-evaluation-harness). Too long a sequence is cut on the left, keeping the continuation; a
continuation longer than the window loses its first tokens (the first kept token has no context).
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch

from trinityx_ds.data.render import IGNORE, render_text
from trinityx_ds.data.tokenizer import pad_id
from trinityx_ds.eval.shard import dp_map


class Request(NamedTuple):
    prompt: list[dict]  # chat messages before the answer
    continuation: str


def encode(tokenizer, request: Request, max_len: int, chat_template: str = "auto") -> tuple[list[int], int]:
    """(token ids, how many trailing ids are the scored continuation)."""
    text = render_text(tokenizer, request.prompt, chat_template, add_generation_prompt=True)
    ctx = tokenizer(text, add_special_tokens=False)["input_ids"]
    cont = tokenizer(request.continuation, add_special_tokens=False)["input_ids"]
    ids = (ctx + cont)[-max_len:]
    return ids, min(len(cont), len(ids) - 1)


@torch.no_grad()
def batch_logprobs(model, rows: Sequence[tuple[list[int], int]], pad: int) -> list[float]:
    """Summed log-probs of each row's last n tokens, rows right-padded into one forward pass."""
    device = model.embedding.word_embeddings.weight.device
    ids_BS = torch.full((len(rows), max(len(ids) for ids, _ in rows)), pad, dtype=torch.long)
    labels_BS = torch.full_like(ids_BS, IGNORE)
    for i, (ids, n) in enumerate(rows):
        ids_BS[i, :len(ids)] = torch.tensor(ids)
        labels_BS[i, len(ids) - 1 - n:len(ids) - 1] = ids_BS[i, len(ids) - n:len(ids)]  # shifted targets
    nll_BS = model(ids_BS.to(device), labels_BS.to(device))
    return (-nll_BS.double().sum(1)).cpu().tolist()


def sequence_logprobs(model, tokenizer, requests: Sequence[Request], *, max_len: int, batch_size: int = 8,
                      chat_template: str = "auto", desc: str = "loglik") -> list[float]:
    """log p(continuation | prompt) per request, on every rank. Collective over the job: the
    requests are spread over the data-parallel ranks (longest first, so padding stays small)."""
    encoded = [encode(tokenizer, r, max_len, chat_template) for r in requests]
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i][0]))
    pad = pad_id(tokenizer)
    scores = dp_map([encoded[i] for i in order], lambda rows: batch_logprobs(model, rows, pad), batch_size, desc)
    out = [0.0] * len(encoded)
    for i, s in zip(order, scores):
        out[i] = s
    return out


def sequence_logprob(model, tokenizer, prompt_messages: list[dict], continuation: str, *, max_len: int = 2048,
                     chat_template: str = "auto") -> float:
    """log p(continuation | rendered prompt) of one request (see the module doc for the format)."""
    return sequence_logprobs(model, tokenizer, [Request(prompt_messages, continuation)], max_len=max_len,
                             batch_size=1, chat_template=chat_template)[0]
