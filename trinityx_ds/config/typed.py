"""Builds the config dataclasses from plain YAML data, type-checked against their annotations.

The annotations are the one source of truth for types and enums, so a new field needs no
loader change. A value of the wrong type is reported and replaced by the field's default, so
the remaining fields are still checked in the same pass.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any, Literal, Union

from trinityx_ds.config.schema import problem

BAD = object()  # marks a value that failed to convert; its problem is already recorded
_PLURAL = {str: "strings", int: "ints", float: "numbers"}


def describe(tp) -> str:
    """What a YAML value of type `tp` looks like, for the `— <allowed>` part of a problem."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(describe(a) for a in args)
    if origin is Literal:
        return ('"%s"' % args[0]) if len(args) == 1 else "one of " + ", ".join(f'"{a}"' for a in args)
    if origin is list:
        inner = args[0]
        if dataclasses.is_dataclass(inner):
            return "a list of mappings"
        return "a list of " + _PLURAL.get(inner, f"values ({describe(inner)})")
    if origin is dict or dataclasses.is_dataclass(tp):
        return "a mapping"
    return {int: "an int", float: "a number", bool: "true or false", str: "a string",
            type(None): "null"}[tp]


def convert(value: Any, tp, key: str, out: list[str]) -> Any:
    """`value` as an instance of `tp`, or BAD after appending its problem(s) to `out`."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return build(tp, value, key, out)
    if origin in (Union, types.UnionType):
        partial = None  # an arg that took the value's shape but not all of its entries (a dict, a list)
        for arg in args:
            problems: list[str] = []
            converted = convert(value, arg, key, problems)
            if converted is not BAD and not problems:
                return converted
            if partial is None and (converted is not BAD or problems and typing.get_origin(arg) in (dict, list)
                                    and isinstance(value, typing.get_origin(arg))):
                partial = (converted, problems)
        if partial is not None:  # name the bad entries (`harm: dpoo`), not the whole value
            out.extend(partial[1])
            return partial[0]
    elif origin is Literal:
        if isinstance(value, str) and value in args:
            return value
    elif origin is list:
        if isinstance(value, list):
            items = [convert(v, args[0], f"{key}[{i}]", out) for i, v in enumerate(value)]
            return BAD if any(v is BAD for v in items) else items
    elif origin is dict:  # entries that fail are left out, so the others are still checked
        if isinstance(value, dict):
            items = {}
            for k, v in value.items():
                if not isinstance(k, str):
                    out.append(problem(f"{key}.{k}", k, "a string key"))
                elif (converted := convert(v, args[1], f"{key}.{k}", out)) is not BAD:
                    items[k] = converted
            return items
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(value, tp):  # bool, str, NoneType
        return value
    out.append(problem(key, value, describe(tp)))
    return BAD


def build(cls, data: Any, key: str, out: list[str], base=None):
    """An instance of dataclass `cls` from a mapping, overlaid on `base` (or the defaults)."""
    where = key or "top level"
    fields = {f.name: f for f in dataclasses.fields(cls)}
    required = [n for n, f in fields.items()
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if base is None and not required:
        base = cls()
    if not isinstance(data, dict):
        out.append(problem(where, data, "a mapping"))
        return BAD if base is None else base
    hints = typing.get_type_hints(cls)
    values = {}
    for name, value in data.items():
        sub = f"{key}.{name}" if key else str(name)
        if name not in fields:
            close = difflib.get_close_matches(str(name), list(fields), n=1)
            hint = f"did you mean '{close[0]}'?" if close else "allowed: " + ", ".join(fields)
            out.append(f"{sub}: unknown key — {hint}")
            continue
        nested = getattr(base, name) if base is not None and dataclasses.is_dataclass(hints[name]) else None
        converted = build(hints[name], value, sub, out, nested) if nested is not None \
            else convert(value, hints[name], sub, out)
        if converted is not BAD:
            values[name] = converted
    for name in required:
        if name not in data:
            out.append(f"{key}.{name}: missing — a required key")
    if base is not None:
        return dataclasses.replace(base, **values)
    return cls(**values) if all(n in values for n in required) else BAD
