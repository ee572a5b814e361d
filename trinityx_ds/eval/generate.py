"""Generation with our megatron model: a plain loop without KV cache, for short evaluation outputs.

Each new token re-runs the whole (prompt + generated) sequence: n new tokens after a prompt of p
tokens cost about n forward passes of p..p+n tokens, i.e. n * (p + n/2) token-forwards instead of
p + n with a cache: fine for 64-256 new tokens on short prompts, quadratic beyond. Rows are right-
padded in one batch (the causal mask keeps padding out of every real position), and the loop stops
when every row of every rank has ended (EOS or `max_new_tokens`): ranks agree each step, so TP
and expert-parallel collectives stay in step. Greedy by default; with `temperature` > 0, sampling
from a generator seeded per batch, so TP ranks draw the same token and any DP layout the same text.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist
from megatron.core import tensor_parallel


def _all_done(done: list[bool], device) -> bool:
    flag = torch.tensor([1 if all(done) else 0], device=device)
    if dist.is_initialized():
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


@torch.no_grad()
def next_token_logits(model, seqs: Sequence[list[int]], pad: int) -> torch.Tensor:
    """Full-vocabulary logits [B, vocab] at each sequence's last token (only those rows gathered over TP)."""
    device = model.embedding.word_embeddings.weight.device
    ids_BS = torch.full((len(seqs), max(len(s) for s in seqs)), pad, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids_BS[i, :len(s)] = torch.tensor(s)
    local_SBV = model.local_logits(ids_BS.to(device))
    last = torch.tensor([len(s) - 1 for s in seqs], device=device)
    local_BV = local_SBV[last, torch.arange(len(seqs), device=device)].contiguous()
    return tensor_parallel.gather_from_tensor_model_parallel_region(local_BV)[:, :model.arch.vocab_size].float()


@torch.no_grad()
def generate_batch(model, prompts: Sequence[list[int]], *, max_new_tokens: int, eos_ids: set[int], pad: int,
                   temperature: float = 0.0, seed: int = 0) -> list[list[int]]:
    """New token ids per prompt (EOS excluded). Collective: every rank calls it the same number of times."""
    seqs = [list(p) for p in prompts]
    new: list[list[int]] = [[] for _ in prompts]
    done = [max_new_tokens <= 0] * len(prompts)
    g = torch.Generator().manual_seed(seed)
    while not _all_done(done, model.embedding.word_embeddings.weight.device):
        logits_BV = next_token_logits(model, seqs, pad).cpu()
        if temperature > 0:
            tokens = torch.multinomial((logits_BV / temperature).softmax(-1), 1, generator=g)[:, 0]
        else:
            tokens = logits_BV.argmax(-1)
        for i, t in enumerate(tokens.tolist()):
            if done[i]:
                continue
            if t in eos_ids:
                done[i] = True
                continue
            seqs[i].append(t)
            new[i].append(t)
            done[i] = len(new[i]) >= max_new_tokens
    return new
