"""Sources already in chat form: `chat_jsonl` (`messages` with roles, optionally a `task` that
says which expert a row belongs to) and `preference` (TRL's preference layouts).

Roles are system, user and assistant; every content is a non-empty string.
"""
from __future__ import annotations

from trinityx_ds.data.rows import Malformed, Options, text_field

ROLES = ("system", "user", "assistant")


def _messages(value, at: str) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise Malformed(f"field '{at}' must be a string or a non-empty list of messages")
    out = []
    for j, m in enumerate(value):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise Malformed(f"{at}[{j}] needs a role among {', '.join(ROLES)}")
        out.append({"role": m["role"], "content": text_field(m, "content", at=f"{at}[{j}].")})
    return out


def _response(row: dict, key: str) -> list[dict]:
    value = row.get(key)
    if value is None:
        raise Malformed(f"missing field '{key}'")
    return [{"role": "assistant", "content": text_field(row, key)}] if isinstance(value, str) else _messages(value, key)


def preference_pairs(row: dict, opts: Options) -> list[tuple]:
    """TRL's preference layouts: `prompt` + `chosen` + `rejected`, each a string or chat messages
    (explicit prompt), or `chosen` + `rejected` whole conversations that share everything but
    their last assistant message (implicit prompt, as HH-RLHF)."""
    chosen, rejected = _response(row, "chosen"), _response(row, "rejected")
    if "prompt" in row:
        raw = row["prompt"]
        prompt = [{"role": "user", "content": text_field(row, "prompt")}] if isinstance(raw, str) or raw is None \
            else _messages(raw, "prompt")
    else:
        if chosen[:-1] != rejected[:-1]:
            raise Malformed("no 'prompt' field, and 'chosen' and 'rejected' differ before their last message")
        prompt, chosen, rejected = chosen[:-1], chosen[-1:], rejected[-1:]
    for key, turns in (("chosen", chosen), ("rejected", rejected)):
        if len(turns) != 1 or turns[0]["role"] != "assistant":
            raise Malformed(f"field '{key}' must be one assistant response")
    if next((m["role"] for m in prompt if m["role"] != "system"), None) != "user" or prompt[-1]["role"] != "user":
        raise Malformed("the prompt must start (after any system message) and end with a user message")
    return [(prompt, chosen[0]["content"], rejected[0]["content"])]


def preference_records(row: dict, opts: Options) -> list[list[dict]]:
    """SFT on a preference row: its prompt and the chosen response."""
    return [prompt + [{"role": "assistant", "content": chosen}] for prompt, chosen, _ in preference_pairs(row, opts)]


def chat_records(row: dict, opts: Options) -> list[list[dict]]:
    owner = row.get("task")
    if owner is not None and not isinstance(owner, str):
        raise Malformed(f"field 'task' must be a string, got {type(owner).__name__}")
    if owner not in (None, opts.task):
        return []  # one mixed file can be listed under every expert: each takes its own rows
    messages = row.get("messages")
    if not isinstance(messages, list) or not messages:
        raise Malformed("field 'messages' must be a non-empty list")
    out = []
    for j, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise Malformed(f"messages[{j}] needs a role among {', '.join(ROLES)}")
        content = text_field(m, "content", at=f"messages[{j}].")
        out.append({"role": m["role"], "content": content})
    if next((m["role"] for m in out if m["role"] != "system"), None) != "user":
        raise Malformed("the first non-system message must be from the user")
    if not any(m["role"] == "assistant" for m in out):
        raise Malformed("no assistant message to learn from")
    return [out]
