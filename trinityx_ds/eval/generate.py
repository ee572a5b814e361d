"""Generation with our megatron model, with a KV cache: linear in the output length.

megatron-core's static-batching inference context (`StaticInferenceContext`) holds each layer's
keys and values; megatron's `Attention` writes a forward's new keys and values into it and hands
the core attention every cached one, and the output layer runs on the last position only. Why
megatron's own cache and not the HF export's or vLLM's: it keeps the model as the run built it (TP
shards, expert parallelism, any `model.attention`), so generation runs in the same job, on the
same ranks and weights as every other suite, at any layout.

Rows of different lengths share one cache without padding inside it: the batch's shortest prompt
is encoded in one forward (prefill), then one position per forward for every row, a row still
inside its prompt fed its next prompt token, a row past it its own greedy or sampled token
(megatron's static engine does the same). Every position a row computes is one of its real
tokens, so its logits are those of the row alone. n new tokens after prompts of p_min..p_max
tokens cost one forward of p_min tokens and p_max - p_min + n single-position forwards, against
n forwards of p..p+n tokens without the cache (`generate_batch_uncached`, kept as the reference
the tests hold this one to: the same greedy tokens).

The loop stops when every row of every rank has ended (EOS or `max_new_tokens`): ranks agree each
step, so TP and expert-parallel collectives stay in step; a rank whose rows have all ended keeps
stepping on its last cache slot. Greedy by default; with `temperature` > 0, sampling from a
generator seeded per batch, drawn once per position for every row, so TP ranks draw the same
token and any DP layout the same text.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist
from megatron.core import tensor_parallel
from megatron.core.inference.contexts import StaticInferenceContext
from megatron.core.models.gpt import GPTModel

from trinityx_ds.model.attention import needs_mask
from trinityx_ds.model.backbone import causal_mask
from trinityx_ds.parallel.megatron_compat import preallocate_static_kv_cache


def _all_done(done: list[bool], device) -> bool:
    flag = torch.tensor([1 if all(done) else 0], device=device)
    if dist.is_initialized():
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def _device(model) -> torch.device:
    return model.embedding.word_embeddings.weight.device


def _pick(logits_BV: torch.Tensor, temperature: float, g: torch.Generator) -> list[int]:
    if temperature > 0:
        return torch.multinomial((logits_BV / temperature).softmax(-1), 1, generator=g)[:, 0].tolist()
    return logits_BV.argmax(-1).tolist()


@torch.no_grad()
def _cached_logits(model, ids_BS: torch.Tensor, context: StaticInferenceContext) -> torch.Tensor:
    """Full-vocabulary logits [B, vocab] at the last of `ids_BS`'s positions, the keys and values of
    all of them added to `context` (whose offset then moves past them)."""
    S = ids_BS.shape[1]
    mask = causal_mask(S, ids_BS.device) if needs_mask(model.attention) else None
    logits_B1V = GPTModel.forward(model, ids_BS, position_ids=None, attention_mask=mask,
                                  inference_context=context, runtime_gather_output=True)
    context.increment_sequence_len_offset(S)
    return logits_B1V[:, -1, :model.arch.vocab_size].float()


@torch.no_grad()
def generate_batch(model, prompts: Sequence[list[int]], *, max_new_tokens: int, eos_ids: set[int], pad: int,
                   temperature: float = 0.0, seed: int = 0) -> list[list[int]]:
    """New token ids per prompt (EOS excluded). Collective: every rank calls it the same number of times."""
    if any(not p for p in prompts):
        raise ValueError("generate: every prompt needs at least one token (a chat template gives it one)")
    device = _device(model)
    new: list[list[int]] = [[] for _ in prompts]
    done = [max_new_tokens <= 0] * len(prompts)
    if _all_done(done, device):
        return new
    lengths = [len(p) for p in prompts]
    start, cap = min(lengths), max(lengths) + max_new_tokens
    context = StaticInferenceContext(len(prompts), cap)
    preallocate_static_kv_cache(model.decoder, context, device, model.embedding.word_embeddings.weight.dtype)
    g = torch.Generator().manual_seed(seed)
    logits_BV = _cached_logits(model, torch.tensor([p[:start] for p in prompts], device=device), context)
    pos = start  # the position whose token is decided now
    while True:
        drawn = _pick(logits_BV.cpu(), temperature, g)
        feed = []
        for i, t in enumerate(drawn):
            if pos < lengths[i]:  # still inside its prompt
                feed.append(prompts[i][pos])
            elif done[i]:
                feed.append(pad)
            elif t in eos_ids:
                done[i] = True
                feed.append(pad)
            else:
                new[i].append(t)
                done[i] = len(new[i]) >= max_new_tokens
                feed.append(t)
        if _all_done(done, device):
            return new
        if all(done):  # other ranks go on: step on the last slot, whose contents no row reads
            context.sequence_len_offset = min(context.sequence_len_offset, cap - 1)
        logits_BV = _cached_logits(model, torch.tensor(feed, device=device)[:, None], context)
        pos += 1


@torch.no_grad()
def next_token_logits(model, seqs: Sequence[list[int]], pad: int) -> torch.Tensor:
    """Full-vocabulary logits [B, vocab] at each sequence's last token, from the whole sequence (no
    cache; only those rows gathered over TP)."""
    device = _device(model)
    ids_BS = torch.full((len(seqs), max(len(s) for s in seqs)), pad, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids_BS[i, :len(s)] = torch.tensor(s)
    local_SBV = model.local_logits(ids_BS.to(device))
    last = torch.tensor([len(s) - 1 for s in seqs], device=device)
    local_BV = local_SBV[last, torch.arange(len(seqs), device=device)].contiguous()
    return tensor_parallel.gather_from_tensor_model_parallel_region(local_BV)[:, :model.arch.vocab_size].float()


@torch.no_grad()
def generate_batch_uncached(model, prompts: Sequence[list[int]], *, max_new_tokens: int, eos_ids: set[int],
                            pad: int, temperature: float = 0.0, seed: int = 0) -> list[list[int]]:
    """`generate_batch` without a cache: every new token re-runs each whole sequence (quadratic in the
    output length). The reference the tests hold the cached loop to."""
    seqs = [list(p) for p in prompts]
    new: list[list[int]] = [[] for _ in prompts]
    done = [max_new_tokens <= 0] * len(prompts)
    g = torch.Generator().manual_seed(seed)
    while not _all_done(done, _device(model)):
        for i, t in enumerate(_pick(next_token_logits(model, seqs, pad).cpu(), temperature, g)):
            if done[i]:
                continue
            if t in eos_ids:
                done[i] = True
                continue
            seqs[i].append(t)
            new[i].append(t)
            done[i] = len(new[i]) >= max_new_tokens
    return new
