"""Chat rendering and tokenisation with response-only labels.

Label convention: `render_example` does NOT shift. `labels[t]` is `input_ids[t]` on assistant-turn
tokens (each turn's content and its end-of-turn/EOS token) and -100 everywhere else, so a row keeps
its meaning when rows are packed together. The collator calls `shift_labels` to give the backbone's
`token_losses` what it expects: `labels[t]` = the target of position t = `input_ids[t + 1]` or -100,
never reaching across two packed examples.
"""
from __future__ import annotations

import torch

IGNORE = -100


def render_text(tokenizer, messages: list[dict], chat_template: str = "auto",
                add_generation_prompt: bool = False) -> str:
    """The conversation as text: the tokenizer's own chat template under "auto" when it has one,
    else this default template ({bos} and {eos} are the tokenizer's, bos only when it has one):

        {bos}<|system|>\\n{content}\\n<|user|>\\n{content}\\n<|assistant|>\\n{content}{eos}<|user|>\\n...

    `add_generation_prompt` ends the text with the header of the next assistant turn.
    """
    if chat_template == "auto" and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    if tokenizer.eos_token is None:
        raise ValueError("the default chat template needs a tokenizer with an eos_token")
    parts = [tokenizer.bos_token or ""]
    for m in messages:
        tail = tokenizer.eos_token if m["role"] == "assistant" else "\n"
        parts.append(f"<|{m['role']}|>\n{m['content']}{tail}")
    if add_generation_prompt:
        parts.append("<|assistant|>\n")
    return "".join(parts)


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]  # templates write their own BOS


def _tokenize_prefixes(tokenizer, texts: list[str]) -> tuple[list[int], list[int]]:
    """Token ids of `texts[-1]` and the token count of each earlier text, a prefix of it.

    Tokenises the whole text when every prefix tokenises to a prefix of it (templates put special
    tokens or newlines at turn boundaries, so this is the usual case); otherwise, when a tokenizer
    merges across a boundary, tokenises the pieces between prefixes apart so boundaries stay exact.
    """
    ids, prefixes = encode(tokenizer, texts[-1]), [encode(tokenizer, t) for t in texts[:-1]]
    if all(ids[:len(p)] == p for p in prefixes):
        return ids, [len(p) for p in prefixes]
    ids, counts, prev = [], [], ""
    for text in texts:
        if not text.startswith(prev):
            raise ValueError("the chat template renders earlier turns differently as the conversation grows; "
                             "set data.chat_template: default")
        ids += encode(tokenizer, text[len(prev):])
        counts.append(len(ids))
        prev = text
    return ids, counts[:-1]


def render_example(tokenizer, messages: list[dict], max_seq_len: int,
                   chat_template: str = "auto") -> dict[str, list[int]] | None:
    """`{"input_ids", "labels"}` (unshifted, see the module doc) of one conversation, truncated on
    the right to `max_seq_len`; None when no response token is left to predict.

    Assistant spans come from rendering prefixes: turn i spans the tokens between
    `messages[:i]` + generation prompt and `messages[:i + 1]`, trimmed after its last special token
    (ChatML's newline after `<|im_end|>` is not a response token).
    """
    texts = []
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            texts += [render_text(tokenizer, messages[:i], chat_template, True),
                      render_text(tokenizer, messages[:i + 1], chat_template)]
    texts.append(render_text(tokenizer, messages, chat_template))
    ids, counts = _tokenize_prefixes(tokenizer, texts)
    special = set(tokenizer.all_special_ids)
    labels = [IGNORE] * len(ids)
    for start, end in zip(counts[0::2], counts[1::2]):
        ends = [t + 1 for t in range(start, end) if ids[t] in special]
        end = ends[-1] if ends else end
        labels[start:end] = ids[start:end]
    ids, labels = ids[:max_seq_len], labels[:max_seq_len]
    if all(label == IGNORE for label in labels[1:]):  # position 0 is never a target after the shift
        return None
    return {"input_ids": ids, "labels": labels}


def shift_labels(labels: torch.Tensor, example_id: torch.Tensor | None = None) -> torch.Tensor:
    """Unshifted labels [..., S] -> targets per position: out[t] = labels[t + 1], -100 at the end and
    wherever t and t + 1 belong to different examples (packing, padding)."""
    out = torch.full_like(labels, IGNORE)
    out[..., :-1] = labels[..., 1:]
    if example_id is not None:
        out[..., :-1].masked_fill_(example_id[..., 1:] != example_id[..., :-1], IGNORE)
    return out


def render_pair(tokenizer, prompt: list[dict], chosen: str, rejected: str, max_seq_len: int,
                chat_template: str = "auto", too_long: str = "truncate_prompt") -> dict[str, list[int]] | None:
    """`{"chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels"}` of one
    preference pair (labels unshifted, on the final response's tokens only: DPO compares the log-
    probabilities of the two responses to one prompt, never of earlier assistant turns).

    A pair longer than `max_seq_len` keeps both responses whole and loses prompt tokens on the left
    (the same ones for both sequences, so they are still conditioned on one prompt) under
    "truncate_prompt"; it is None (skipped, counted by the caller) under "skip", or when a response
    with one prompt token would still not fit.
    """
    head = render_text(tokenizer, prompt, chat_template, add_generation_prompt=True)
    out, pieces = {}, {}
    for key, response in (("chosen", chosen), ("rejected", rejected)):
        full = render_text(tokenizer, prompt + [{"role": "assistant", "content": response}], chat_template)
        ids, (start,) = _tokenize_prefixes(tokenizer, [head, full])
        special = set(tokenizer.all_special_ids)
        ends = [t + 1 for t in range(start, len(ids)) if ids[t] in special]
        end = ends[-1] if ends else len(ids)  # ChatML's newline after <|im_end|> is not a response token
        pieces[key] = (ids[:start], ids[start:end], ids[end:])
    longest = max(len(r) + len(tail) for _, r, tail in pieces.values())
    keep = max_seq_len - longest
    prompt_len = max(len(p) for p, _, _ in pieces.values())
    if keep < 1 or (prompt_len > keep and too_long == "skip"):
        return None
    for key, (p_ids, r_ids, tail) in pieces.items():
        p_ids = p_ids[-keep:]
        out[f"{key}_input_ids"] = p_ids + r_ids + tail
        out[f"{key}_labels"] = [IGNORE] * len(p_ids) + r_ids + [IGNORE] * len(tail)
    return out
