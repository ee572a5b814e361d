"""Log-likelihood of a continuation after a chat prompt, with our megatron model (any TP, DP-sharded).

Prompt format: the prompt messages rendered as the model is trained and asked (`render_text`
with the tokenizer's chat template, or the default template, and `add_generation_prompt=True`,
so the text ends with the assistant header), then the continuation's own tokens (tokenised
alone, no special tokens, no end-of-turn: the score is log p(answer text | prompt), as in
lm-evaluation-harness). Too long a sequence is cut on the left to `max_len` + 1 tokens (the model
reads the first `max_len`, as lm-eval's `hf` model does), keeping the continuation; a continuation
longer than the window loses its first tokens (the first kept token has no context).
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from trinityx_ds.data.render import IGNORE, render_text
from trinityx_ds.data.tokenizer import pad_id
from trinityx_ds.eval.shard import dp_map
from trinityx_ds.model.backbone import vocab_parallel_token_losses


class Request(NamedTuple):
    prompt: list[dict]  # chat messages before the answer
    continuation: str


def encode(tokenizer, request: Request, max_len: int, chat_template: str = "auto") -> tuple[list[int], int]:
    """(token ids, how many trailing ids are the scored continuation)."""
    text = render_text(tokenizer, request.prompt, chat_template, add_generation_prompt=True)
    ctx = tokenizer(text, add_special_tokens=False)["input_ids"]
    cont = tokenizer(request.continuation, add_special_tokens=False)["input_ids"]
    ids = (ctx + cont)[-(max_len + 1):]
    return ids, min(len(cont), len(ids) - 1)


def _tp_reduce(x: torch.Tensor, op) -> torch.Tensor:
    if dist.is_initialized() and ps.model_parallel_is_initialized() and ps.get_tensor_model_parallel_world_size() > 1:
        dist.all_reduce(x, op=op, group=ps.get_tensor_model_parallel_group())
    return x


@torch.no_grad()
def batch_scores(model, rows: Sequence[tuple[list[int], int]], pad: int) -> list[tuple[float, bool]]:
    """(summed log-prob of each row's last n tokens, whether each of them is the argmax), rows right-
    padded into one forward pass over all but their last token. Greedy is decided on the TP ranks'
    vocab slices (max and target logit reduced over TP), never on gathered full-vocabulary logits:
    those would be [S, B, 128k] floats at 70B."""
    device = model.embedding.word_embeddings.weight.device
    ids_BS = torch.full((len(rows), max(len(ids) for ids, _ in rows) - 1), pad, dtype=torch.long)
    labels_BS = torch.full_like(ids_BS, IGNORE)
    for i, (ids, n) in enumerate(rows):
        ids_BS[i, :len(ids) - 1] = torch.tensor(ids[:-1])
        labels_BS[i, len(ids) - 1 - n:len(ids) - 1] = torch.tensor(ids[len(ids) - n:])  # shifted targets
    local_SBV = model.local_logits(ids_BS.to(device)).float().contiguous()
    labels_SB = labels_BS.transpose(0, 1).contiguous().to(device)
    scored_SB = labels_SB >= 0
    v_local = local_SBV.shape[-1]
    idx_SB = labels_SB.clamp(min=0) - (ps.get_tensor_model_parallel_rank() if ps.model_parallel_is_initialized() else 0) * v_local
    mine_SB = (idx_SB >= 0) & (idx_SB < v_local)
    target_SB = local_SBV.gather(-1, idx_SB.clamp(0, v_local - 1).unsqueeze(-1)).squeeze(-1)
    target_SB = _tp_reduce(torch.where(mine_SB, target_SB, torch.zeros_like(target_SB)), dist.ReduceOp.SUM)
    max_SB = _tp_reduce(local_SBV.max(-1).values, dist.ReduceOp.MAX)
    greedy_B = ((target_SB >= max_SB) | ~scored_SB).all(0)
    nll_SB = vocab_parallel_token_losses(local_SBV, labels_SB)  # shifts the logits in place: after the greedy test
    return list(zip((-nll_SB.double().sum(0)).cpu().tolist(), greedy_B.cpu().tolist()))


def score_rows(model, rows: Sequence[tuple[list[int], int]], pad: int, batch_size: int,
               desc: str = "loglik") -> list[tuple[float, bool]]:
    """`batch_scores` of (token ids, n scored) rows in their order, on every rank. Collective over the
    job: spread over the data-parallel ranks longest first, so padding stays small."""
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    scores = dp_map([rows[i] for i in order], lambda batch: batch_scores(model, batch, pad), batch_size, desc)
    out = [None] * len(rows)
    for i, s in zip(order, scores):
        out[i] = s
    return out


def sequence_logprobs(model, tokenizer, requests: Sequence[Request], *, max_len: int, batch_size: int = 8,
                      chat_template: str = "auto", desc: str = "loglik") -> list[float]:
    """log p(continuation | prompt) per request, on every rank (collective, see `score_rows`)."""
    encoded = [encode(tokenizer, r, max_len, chat_template) for r in requests]
    return [s for s, _ in score_rows(model, encoded, pad_id(tokenizer), batch_size, desc)]


def sequence_logprob(model, tokenizer, prompt_messages: list[dict], continuation: str, *, max_len: int = 2048,
                     chat_template: str = "auto") -> float:
    """log p(continuation | rendered prompt) of one request (see the module doc for the format)."""
    return sequence_logprobs(model, tokenizer, [Request(prompt_messages, continuation)], max_len=max_len,
                             batch_size=1, chat_template=chat_template)[0]
