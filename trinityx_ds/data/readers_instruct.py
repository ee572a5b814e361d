"""Instruction-tuning sources: Alpaca (`instruction`, `input`, `output`) and Self-Instruct
(one `instruction` with a list of `instances`, each an `input` and an `output`).

Both give SFT dialogues only (one user turn, one response): they hold no rejected response, so
no preference pairs. An `input` is appended to the instruction after a blank line.
"""
from __future__ import annotations

from trinityx_ds.data.rows import Malformed, Options, exchange, text_field


def alpaca(row: dict, opts: Options) -> list[list[dict]]:
    prompt, extra = text_field(row, "instruction"), text_field(row, "input", optional=True)
    return [exchange(f"{prompt}\n\n{extra}" if extra else prompt, text_field(row, "output"))]


def self_instruct(row: dict, opts: Options) -> list[list[dict]]:
    """One dialogue per instance of the instruction."""
    instruction, instances = text_field(row, "instruction"), row.get("instances")
    if not isinstance(instances, list) or not instances:
        raise Malformed("field 'instances' must be a non-empty list")
    out = []
    for j, inst in enumerate(instances):
        if not isinstance(inst, dict):
            raise Malformed(f"instances[{j}] must be an object")
        extra = text_field(inst, "input", optional=True, at=f"instances[{j}].")
        out.append(exchange(f"{instruction}\n\n{extra}" if extra else instruction,
                            text_field(inst, "output", at=f"instances[{j}].")))
    return out
