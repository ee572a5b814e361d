"""Rows of one source with their locations, and what every source family's reader shares.

Local files are read with plain Python, not `datasets.load_dataset`: every malformed row must be
reported as `<file>:<line>` (the first line of a multi-line CSV record), and the datasets readers
drop line numbers. JSON lists, JSONL (also .gz) and CSV (UTF-8, BOM allowed) are told apart by
content and extension. `hub:NAME[:CONFIG]` sources go through `datasets.load_dataset(NAME, CONFIG,
split=...)`, located as `hub:NAME[split]:<row index>`. Column names are compared lower-cased with
spaces as `_`, so TruthfulQA's "Best Answer" and the hub's `best_answer` are the same field.

The readers (readers_*.py) turn one row into items and raise `Malformed` for a row they cannot
use; formats.py maps each format name to its reader and collects the problems.
"""
from __future__ import annotations

import csv
import gzip
import io
import json
import re
from collections.abc import Iterator
from typing import NamedTuple

import datasets


class DataError(ValueError):
    """Data that cannot be used; `problems` holds one `<file>:<line>: <what is wrong>` per entry."""

    def __init__(self, problems: list[str], header: str = ""):
        self.problems = list(problems)
        super().__init__("\n".join(([header] if header else []) + self.problems))


class Malformed(Exception):
    """One row's problem; reported as `<file>:<line>: <message>`."""


class Options(NamedTuple):
    """What a reader may need besides the row: the expert it reads for and the recipe's choices."""

    task: str = ""
    beavertails_unsafe: str = "refuse"  # refuse | drop (see formats.read_source)
    pairs_per_prompt: int = 4


# ---------------------------------------------------------------- reading rows with their locations

def _key(name) -> str:
    return str(name).strip().lstrip("\ufeff").strip().lower().replace(" ", "_")


MAX_ROW_CHARS = 1_000_000  # data.max_row_chars' default


def read_rows(path: str, split: str, hub_config: str | None,
              max_row_chars: int = MAX_ROW_CHARS) -> Iterator[tuple[str, dict | Malformed]]:
    """(location, row) for every row of `path`; a row that is not an object, or a file's row longer
    than `max_row_chars` characters (data.max_row_chars: cut here, before a tokeniser reads it),
    comes as `Malformed`. `hub_config` is the `datasets` config of a `hub:NAME` source that names none."""
    if path.startswith("hub:"):
        name, _, config = path[4:].partition(":")
        data = datasets.load_dataset(name, config or hub_config, split=split)
        for i, row in enumerate(data):
            yield f"hub:{name}[{split}]:{i}", {_key(k): v for k, v in row.items()}
        return
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8-sig", newline="") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError([f"{path}: cannot read as UTF-8 text ({e})"]) from None
    if path.removesuffix(".gz").endswith(".csv"):
        yield from _csv_rows(text, path, max_row_chars)
    elif text.lstrip().startswith("["):
        yield from _json_list_rows(text, path, max_row_chars)
    else:
        yield from _jsonl_rows(text, path, max_row_chars)


def _too_long(chars: int, cap: int) -> Malformed:
    return Malformed(f"{chars:,} characters, over data.max_row_chars ({cap:,})")


def _as_row(value) -> dict | Malformed:
    if isinstance(value, dict):
        return {_key(k): v for k, v in value.items()}
    return Malformed(f"expected a JSON object, got {type(value).__name__}")


def _jsonl_rows(text: str, path: str, cap: int):
    for line, raw in enumerate(text.split("\n"), 1):  # not splitlines: U+2028 may sit inside a JSON string
        if len(raw) > cap:
            yield f"{path}:{line}", _too_long(len(raw), cap)
        elif raw.strip():
            try:
                yield f"{path}:{line}", _as_row(json.loads(raw))
            except json.JSONDecodeError as e:
                yield f"{path}:{line}", Malformed(f"invalid JSON ({e.msg} at column {e.colno})")


def _json_list_rows(text: str, path: str, cap: int):
    decoder, space = json.JSONDecoder(), re.compile(r"\s*")
    pos = space.match(text, text.index("[") + 1).end()
    if text.startswith("]", pos):
        return
    while True:
        line = text.count("\n", 0, pos) + 1
        try:
            value, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            yield f"{path}:{e.lineno}", Malformed(f"invalid JSON ({e.msg}); the rest of the list is unreadable")
            return
        yield f"{path}:{line}", _too_long(end - pos, cap) if end - pos > cap else _as_row(value)
        pos = space.match(text, end).end()
        if not text.startswith(",", pos):
            if not text.startswith("]", pos):
                yield f"{path}:{text.count(chr(10), 0, pos) + 1}", Malformed("expected ',' or ']' after a list item")
            return
        pos = space.match(text, pos + 1).end()


def _csv_rows(text: str, path: str, cap: int):
    reader, header, end = csv.reader(io.StringIO(text, newline="")), None, 0
    try:
        for cells in reader:
            line, end = end + 1, reader.line_num
            if not any(c.strip() for c in cells):
                continue
            if header is None:
                header = [_key(c) for c in cells]
            elif len(cells) != len(header):
                yield f"{path}:{line}", Malformed(f"{len(cells)} fields, the header has {len(header)}")
            elif sum(map(len, cells)) > cap:
                yield f"{path}:{line}", _too_long(sum(map(len, cells)), cap)
            else:
                yield f"{path}:{line}", dict(zip(header, cells))
    except csv.Error as e:
        yield f"{path}:{end + 1}", Malformed(f"unreadable CSV ({e}); the rest of the file is skipped")


# ---------------------------------------------------------------- fields and items the readers share

def text_field(row: dict, key: str, *, optional: bool = False, at: str = "") -> str:
    """The stripped string in `row[key]`; missing, non-string or empty values are malformed."""
    value = row.get(key)
    if value is None:
        if optional:
            return ""
        raise Malformed(f"missing field '{at}{key}'")
    if not isinstance(value, str):
        raise Malformed(f"field '{at}{key}' must be a string, got {type(value).__name__}")
    if not value.strip() and not optional:
        raise Malformed(f"empty field '{at}{key}'")
    return value.strip()


def exchange(prompt: str, response: str) -> list[dict]:
    """One user turn and its assistant response."""
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]


def cycle_pairs(good: list[str], bad: list[str], cap: int) -> list[tuple[str, str]]:
    """Up to `cap` (good, bad) pairs that use as many distinct answers as they can: the k-th pair
    is good[k % len(good)] against bad[k % len(bad)]."""
    return [(good[k % len(good)], bad[k % len(bad)]) for k in range(min(cap, max(len(good), len(bad))))]
