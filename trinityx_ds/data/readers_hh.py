"""Anthropic's HH-RLHF: each row a `chosen` and a `rejected` dialogue written as
"\\n\\nHuman: ...\\n\\nAssistant: ...", the two identical up to their last Assistant turn.

SFT learns the chosen dialogue (every Assistant turn); the preference pair is the shared
dialogue before the last Assistant turn as prompt, and the two last turns as responses.
"""
from __future__ import annotations

import re

from trinityx_ds.data.rows import Malformed, Options

_TURN = re.compile(r"\n\n(Human|Assistant):[ ]?")


def parse_hh_dialogue(text) -> list[dict]:
    """Messages of one "\\n\\nHuman: ...\\n\\nAssistant: ..." dialogue: starts with Human, alternates,
    ends with Assistant, no empty turn; anything else raises Malformed."""
    if not isinstance(text, str):
        raise Malformed(f"dialogue must be a string, got {type(text).__name__}")
    parts = _TURN.split("\n\n" + text.lstrip())
    roles, contents = parts[1::2], [c.strip() for c in parts[2::2]]
    if parts[0].strip() or not roles or roles[0] != "Human":
        raise Malformed("dialogue does not start with a 'Human:' turn")
    for i, role in enumerate(roles):
        if role != ("Human", "Assistant")[i % 2]:
            raise Malformed(f"turn {i + 1} is {role} again (turns must alternate, starting with Human)")
    if roles[-1] != "Assistant":
        raise Malformed("dialogue ends with a Human turn, not a response")
    for i, content in enumerate(contents):
        if not content:
            raise Malformed("empty response (last Assistant turn)" if i == len(contents) - 1 else f"empty turn {i + 1}")
    return [{"role": "user" if r == "Human" else "assistant", "content": c} for r, c in zip(roles, contents)]


def records(row: dict, opts: Options) -> list[list[dict]]:
    if "chosen" not in row:
        raise Malformed("missing field 'chosen'")
    return [parse_hh_dialogue(row["chosen"])]


def pairs(row: dict, opts: Options) -> list[tuple]:
    dialogues = []
    for key in ("chosen", "rejected"):
        if key not in row:
            raise Malformed(f"missing field '{key}'")
        try:
            dialogues.append(parse_hh_dialogue(row[key]))
        except Malformed as e:
            raise Malformed(f"'{key}': {e}") from None
    chosen, rejected = dialogues
    if chosen[:-1] != rejected[:-1]:
        raise Malformed("'chosen' and 'rejected' differ before their last Assistant turn")
    return [(chosen[:-1], chosen[-1]["content"], rejected[-1]["content"])]
