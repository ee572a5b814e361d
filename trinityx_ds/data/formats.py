"""Format registry: raw rows of each alignment data set, normalised into chat records or preference pairs.

A record is `{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...],
"task": <expert name>, "source": "<file>:<line>"}`; the SFT loss later applies to every assistant turn.

`READERS` below is the one place a format name (`DataSource.format`) maps to its reader; each
source family's reader lives in its own module (readers_instruct, readers_hh, readers_beavertails,
readers_truthfulqa, readers_chat), and rows.py reads a file or hub set's rows with their locations
(`<file>:<line>`, `hub:NAME[split]:<row index>`). This module turns a reader's items into records
or pairs and collects every malformed row: `fail` raises them all together, `skip` logs them.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple, get_args

from trinityx_ds.config.schema import PAIR_FORMATS, DataFormat
from trinityx_ds.data import readers_beavertails, readers_chat, readers_hh, readers_instruct, readers_truthfulqa
from trinityx_ds.data.readers_beavertails import REFUSAL
from trinityx_ds.data.readers_hh import parse_hh_dialogue
from trinityx_ds.data.rows import MAX_ROW_CHARS, DataError, Malformed, Options, read_rows

__all__ = ["READERS", "REFUSAL", "DataError", "LoadReport", "MCItem", "Malformed", "PreferencePair", "Reader",
           "hh_rlhf_pairs", "parse_hh_dialogue", "read_pairs", "read_source", "truthfulqa_mc"]

log = logging.getLogger(__name__)


@dataclass
class LoadReport:
    """What reading one source gave: items kept and every malformed row."""

    source: str
    kept: int = 0
    problems: list[str] = field(default_factory=list)

    def summary(self, first: int = 3) -> str:
        text = f"{self.source}: {self.kept} items"
        if self.problems:
            text += f", {len(self.problems)} malformed rows skipped, first: " + " | ".join(self.problems[:first])
        return text


class PreferencePair(NamedTuple):
    prompt: list[dict]  # the dialogue before the last Assistant turn
    chosen: str
    rejected: str
    source: str


class MCItem(NamedTuple):
    question: str
    best_answer: str
    correct: list[str]
    incorrect: list[str]
    source: str


class Reader(NamedTuple):
    """How the rows of one format become items. Each function takes (row, Options) and raises
    `Malformed` for a row it cannot use."""

    records: Callable[[dict, Options], list[list[dict]]]  # a row -> the dialogues SFT learns
    # a row -> its (prompt messages, chosen, rejected) pairs, or what `gather` takes; None: no pairs
    pairs: Callable[[dict, Options], list[tuple]] | None = None
    # the located items of `pairs` for a whole source -> (prompt messages, chosen, rejected, where),
    # for a format whose pairs span several rows; None: each row's items are its pairs
    gather: Callable[[list[tuple], Options], list[tuple]] | None = None
    hub_config: str | None = None  # the `datasets` config of a `hub:NAME` source that names none


READERS: dict[str, Reader] = {
    "alpaca": Reader(readers_instruct.alpaca),
    "self_instruct": Reader(readers_instruct.self_instruct),
    "hh_rlhf": Reader(readers_hh.records, readers_hh.pairs),
    "beavertails": Reader(readers_beavertails.records, readers_beavertails.responses, readers_beavertails.gather),
    "truthfulqa": Reader(readers_truthfulqa.records, readers_truthfulqa.pairs,
                         hub_config=readers_truthfulqa.HUB_CONFIG),
    "chat_jsonl": Reader(readers_chat.chat_records),
    "preference": Reader(readers_chat.preference_records, readers_chat.preference_pairs),
}

# config/ validates `format` against DataFormat and PAIR_FORMATS without importing data/: a config
# that passes must find its reader here, so the two lists and the registry agree or nothing imports
if set(READERS) != set(get_args(DataFormat)) or \
        {name for name, r in READERS.items() if r.pairs is not None} != set(PAIR_FORMATS):
    raise RuntimeError("data.formats.READERS disagrees with config.schema's DataFormat / PAIR_FORMATS")


def _load(path: str, split: str, max_rows: int | None, on_malformed: str, hub_config: str | None,
          convert: Callable[[dict], list], make: Callable[[object, str], object],
          max_row_chars: int = MAX_ROW_CHARS) -> tuple[list, LoadReport]:
    """Items from every row of one source: `fail` raises DataError with all malformed rows of the
    file, `skip` leaves them out and logs a summary. `max_rows` caps the items kept;
    `max_row_chars` (data.max_row_chars) makes a longer row malformed."""
    items, report = [], LoadReport(path)
    for where, row in read_rows(path, split, hub_config, max_row_chars):
        if max_rows is not None and len(items) >= max_rows:
            break
        try:
            if isinstance(row, Malformed):
                raise row
            items += [make(item, where) for item in convert(row)]
        except Malformed as e:
            report.problems.append(f"{where}: {e}")
    items = items[:max_rows]
    report.kept = len(items)
    if report.problems and on_malformed == "fail":
        raise DataError(report.problems, f"{len(report.problems)} malformed rows in {path} "
                                         "(data.on_malformed: skip leaves them out):")
    if report.problems:
        log.warning(report.summary())
    return items, report


def _pairs(reader: Reader, path: str, split: str, max_rows: int | None, on_malformed: str,
           opts: Options, max_row_chars: int = MAX_ROW_CHARS) -> tuple[list[PreferencePair], LoadReport]:
    """`max_rows` caps what the reader's `pairs` gives: pairs, or rows where it has a `gather`."""
    items, report = _load(path, split, max_rows, on_malformed, reader.hub_config,
                          lambda row: reader.pairs(row, opts), lambda item, where: (*item, where), max_row_chars)
    if reader.gather is not None:
        items = reader.gather(items, opts)
    pairs = [PreferencePair(*item) for item in items]
    report.kept = len(pairs)
    return pairs, report


def read_source(src, task: str, on_malformed: str = "fail", beavertails_unsafe: str = "refuse",
                max_row_chars: int = MAX_ROW_CHARS) -> tuple[list[dict], LoadReport]:
    """Chat records of one `DataSource` for expert `task`.

    `beavertails_unsafe` decides what an unsafe BeaverTails row becomes, since its response must never
    be learnt: "refuse" (default; the usual harmlessness recipe, and what makes unsafe-only samples
    usable) keeps the prompt with `REFUSAL` as the response, "drop" leaves the row out.
    """
    if beavertails_unsafe not in ("refuse", "drop"):
        raise ValueError(f"beavertails_unsafe: {beavertails_unsafe!r} — one of refuse, drop")
    if src.format not in READERS:
        raise ValueError(f"format: {src.format!r} — one of {', '.join(READERS)}")
    reader, opts = READERS[src.format], Options(task, beavertails_unsafe)
    return _load(src.path, src.split, src.max_rows, on_malformed, reader.hub_config,
                 lambda row: reader.records(row, opts),
                 lambda messages, where: {"messages": messages, "task": task, "source": where}, max_row_chars)


def read_pairs(src, task: str, on_malformed: str = "fail", beavertails_unsafe: str = "refuse",
               pairs_per_prompt: int = 4, max_row_chars: int = MAX_ROW_CHARS) -> tuple[list[PreferencePair], LoadReport]:
    """Preference pairs of one `DataSource` (prompt messages, chosen, rejected, `<file>:<line>`):

    - hh_rlhf: the shared dialogue before the last Assistant turn is the prompt, the two last turns
      the responses;
    - truthfulqa: each question's correct answers (best first) against its incorrect ones, at most
      `pairs_per_prompt` pairs, cycling so that as many distinct answers as possible are used;
    - beavertails: rows grouped by prompt; a safe response against an unsafe one where a prompt
      has both; where it has only unsafe ones and `beavertails_unsafe` is "refuse", `REFUSAL`
      against each (the pairs that match the SFT recipe's refusals); at most `pairs_per_prompt`;
    - preference: TRL's generic JSONL (`prompt`/`chosen`/`rejected`, strings or chat messages).
    """
    reader = READERS.get(src.format)
    if reader is None or reader.pairs is None:
        raise ValueError(f"format: {src.format!r} has no preference pairs — one of {', '.join(PAIR_FORMATS)}")
    return _pairs(reader, src.path, src.split, src.max_rows, on_malformed,
                  Options(task, beavertails_unsafe, pairs_per_prompt), max_row_chars)


def hh_rlhf_pairs(path: str, *, split: str = "test", max_rows: int | None = None,
                  on_malformed: str = "fail") -> tuple[list[PreferencePair], LoadReport]:
    """Preference pairs of an HH-RLHF file: the shared prompt and both last responses."""
    return _pairs(READERS["hh_rlhf"], path, split, max_rows, on_malformed, Options())


def truthfulqa_mc(path: str, *, split: str = "validation", max_rows: int | None = None,
                  on_malformed: str = "fail") -> tuple[list[MCItem], LoadReport]:
    """TruthfulQA multiple-choice items (MC1: best vs incorrect; MC2: correct vs incorrect)."""
    return _load(path, split, max_rows, on_malformed, READERS["truthfulqa"].hub_config,
                 readers_truthfulqa.mc_item, lambda item, where: MCItem(*item, where))
