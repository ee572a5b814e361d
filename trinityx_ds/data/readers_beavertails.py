"""PKU BeaverTails: `prompt`, `response` and whether the response is safe (`is_safe`, or the
hub's `category` mapping of harm flags).

An unsafe response must never be learnt: for SFT it is replaced by `REFUSAL` or its row dropped
(`Options.beavertails_unsafe`); for preference pairs the rows of one prompt are gathered, so a
safe response (or `REFUSAL`) is preferred to each unsafe one.
"""
from __future__ import annotations

from trinityx_ds.data.rows import Malformed, Options, cycle_pairs, exchange, text_field

REFUSAL = ("I'm sorry, but I can't help with that. It could hurt people or break the law. "
           "If you or someone else is in danger, please contact local emergency services.")
"""The response that replaces an unsafe BeaverTails response under `beavertails_unsafe="refuse"`."""

_TRUE, _FALSE = {"true", "1", "yes"}, {"false", "0", "no"}


def is_safe(row: dict) -> bool:
    """`is_safe` when present; else safe only when `category` is a mapping of all-false harm flags
    (the hub layout), so a response with just a category name is never trained on."""
    flag = row.get("is_safe")
    if isinstance(flag, bool):
        return flag
    if isinstance(flag, str) and flag.strip().lower() in _TRUE | _FALSE:
        return flag.strip().lower() in _TRUE
    if flag is not None:
        raise Malformed(f"field 'is_safe' must be a bool or true/false, got {flag!r}")
    if "category" not in row:
        raise Malformed("needs an 'is_safe' or a 'category' field to tell whether the response is safe")
    category = row["category"]
    return isinstance(category, dict) and not any(category.values())


def records(row: dict, opts: Options) -> list[list[dict]]:
    prompt, response = text_field(row, "prompt"), text_field(row, "response")
    if is_safe(row):
        return [exchange(prompt, response)]
    return [] if opts.beavertails_unsafe == "drop" else [exchange(prompt, REFUSAL)]


def responses(row: dict, opts: Options) -> list[tuple]:
    """One row's (prompt, response, safe): a pair needs the other rows of its prompt (`gather`)."""
    return [(text_field(row, "prompt"), text_field(row, "response"), is_safe(row))]


def gather(rows: list[tuple], opts: Options) -> list[tuple]:
    """(prompt messages, chosen, rejected, where) from every row's (prompt, response, safe, where),
    grouped by prompt: a safe response against an unsafe one where a prompt has both; where it has
    only unsafe ones and unsafe rows are refused, `REFUSAL` against each (the pairs that match the
    SFT recipe's refusals); at most `opts.pairs_per_prompt` per prompt, located at its first row."""
    grouped: dict[str, tuple[str, list[str], list[str]]] = {}
    for prompt, response, safe, where in rows:
        grouped.setdefault(prompt, (where, [], []))[1 if safe else 2].append(response)
    out = []
    for prompt, (where, safe, unsafe) in grouped.items():
        if not unsafe or not safe and opts.beavertails_unsafe != "refuse":
            continue
        user = [{"role": "user", "content": prompt}]
        out += [(user, good, bad, where) for good, bad in cycle_pairs(safe or [REFUSAL], unsafe, opts.pairs_per_prompt)]
    return out
