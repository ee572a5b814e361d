"""Format adapters: raw rows of each alignment data set, normalised into chat records.

A record is `{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...],
"task": <expert name>, "source": "<file>:<line>"}`; the SFT loss later applies to every assistant turn.

Local files are read with plain Python, not `datasets.load_dataset`: every malformed row must be
reported as `<file>:<line>` (the first line of a multi-line CSV record), and the datasets readers
drop line numbers. JSON lists, JSONL (also .gz) and CSV (UTF-8, BOM allowed) are told apart by
content and extension. `hub:NAME[:CONFIG]` sources go through `datasets.load_dataset(NAME, CONFIG,
split=...)`, located as `hub:NAME[split]:<row index>`. Column names are compared lower-cased with
spaces as `_`, so TruthfulQA's "Best Answer" and the hub's `best_answer` are the same field.
"""
from __future__ import annotations

import csv
import gzip
import io
import json
import logging
import re
from dataclasses import dataclass, field
from typing import Callable, Iterator, NamedTuple

from trinityx_ds.config.schema import PAIR_FORMATS

log = logging.getLogger(__name__)

REFUSAL = ("I'm sorry, but I can't help with that. It could hurt people or break the law. "
           "If you or someone else is in danger, please contact local emergency services.")
"""The response that replaces an unsafe BeaverTails response under `beavertails_unsafe="refuse"`."""

_HUB_CONFIG = {"truthfulqa": "generation"}  # truthfulqa/truthful_qa needs a config; the others have one
_ROLES = ("system", "user", "assistant")


class DataError(ValueError):
    """Data that cannot be used; `problems` holds one `<file>:<line>: <what is wrong>` per entry."""

    def __init__(self, problems: list[str], header: str = ""):
        self.problems = list(problems)
        super().__init__("\n".join(([header] if header else []) + self.problems))


class Malformed(Exception):
    """One row's problem; reported as `<file>:<line>: <message>`."""


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


# ---------------------------------------------------------------- reading rows with their locations

def _key(name) -> str:
    return str(name).strip().lstrip("\ufeff").strip().lower().replace(" ", "_")


def _rows(path: str, split: str, fmt: str) -> Iterator[tuple[str, dict | Malformed]]:
    if path.startswith("hub:"):
        import datasets

        name, _, config = path[4:].partition(":")
        data = datasets.load_dataset(name, config or _HUB_CONFIG.get(fmt), split=split)
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
        yield from _csv_rows(text, path)
    elif text.lstrip().startswith("["):
        yield from _json_list_rows(text, path)
    else:
        yield from _jsonl_rows(text, path)


def _as_row(value) -> dict | Malformed:
    if isinstance(value, dict):
        return {_key(k): v for k, v in value.items()}
    return Malformed(f"expected a JSON object, got {type(value).__name__}")


def _jsonl_rows(text: str, path: str):
    for line, raw in enumerate(text.split("\n"), 1):  # not splitlines: U+2028 may sit inside a JSON string
        if raw.strip():
            try:
                yield f"{path}:{line}", _as_row(json.loads(raw))
            except json.JSONDecodeError as e:
                yield f"{path}:{line}", Malformed(f"invalid JSON ({e.msg} at column {e.colno})")


def _json_list_rows(text: str, path: str):
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
        yield f"{path}:{line}", _as_row(value)
        pos = space.match(text, end).end()
        if not text.startswith(",", pos):
            if not text.startswith("]", pos):
                yield f"{path}:{text.count(chr(10), 0, pos) + 1}", Malformed("expected ',' or ']' after a list item")
            return
        pos = space.match(text, pos + 1).end()


def _csv_rows(text: str, path: str):
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
            else:
                yield f"{path}:{line}", dict(zip(header, cells))
    except csv.Error as e:
        yield f"{path}:{end + 1}", Malformed(f"unreadable CSV ({e}); the rest of the file is skipped")


# ---------------------------------------------------------------- fields and adapters

def _text(row: dict, key: str, *, optional: bool = False, at: str = "") -> str:
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


def _exchange(prompt: str, response: str) -> list[dict]:
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]


def _alpaca(row: dict) -> list[list[dict]]:
    prompt, extra = _text(row, "instruction"), _text(row, "input", optional=True)
    return [_exchange(f"{prompt}\n\n{extra}" if extra else prompt, _text(row, "output"))]


def _self_instruct(row: dict) -> list[list[dict]]:
    instruction, instances = _text(row, "instruction"), row.get("instances")
    if not isinstance(instances, list) or not instances:
        raise Malformed("field 'instances' must be a non-empty list")
    out = []
    for j, inst in enumerate(instances):
        if not isinstance(inst, dict):
            raise Malformed(f"instances[{j}] must be an object")
        extra = _text(inst, "input", optional=True, at=f"instances[{j}].")
        out.append(_exchange(f"{instruction}\n\n{extra}" if extra else instruction,
                             _text(inst, "output", at=f"instances[{j}].")))
    return out


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


def _hh(row: dict) -> list[list[dict]]:
    if "chosen" not in row:
        raise Malformed("missing field 'chosen'")
    return [parse_hh_dialogue(row["chosen"])]


def _hh_pair(row: dict) -> list[tuple]:
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


_TRUE, _FALSE = {"true", "1", "yes"}, {"false", "0", "no"}


def _is_safe(row: dict) -> bool:
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


def _beavertails(row: dict, unsafe: str) -> list[list[dict]]:
    prompt, response = _text(row, "prompt"), _text(row, "response")
    if _is_safe(row):
        return [_exchange(prompt, response)]
    return [] if unsafe == "drop" else [_exchange(prompt, REFUSAL)]


def _answers(row: dict, key: str) -> list[str]:
    value = row.get(key)
    if isinstance(value, str):
        value = value.split(";")
    if not isinstance(value, list) or not all(isinstance(a, str) for a in value):
        raise Malformed(f"field '{key}' must be a ';'-separated string or a list of strings")
    answers = [a.strip() for a in value if a.strip()]
    if not answers:
        raise Malformed(f"empty field '{key}'")
    return answers


def _truthfulqa(row: dict) -> list[list[dict]]:
    return [_exchange(_text(row, "question"), _text(row, "best_answer"))]


def _truthfulqa_mc(row: dict) -> list[tuple]:
    return [(_text(row, "question"), _text(row, "best_answer"),
             _answers(row, "correct_answers"), _answers(row, "incorrect_answers"))]


def _cycle_pairs(good: list[str], bad: list[str], cap: int) -> list[tuple[str, str]]:
    """Up to `cap` (good, bad) pairs that use as many distinct answers as they can: the k-th pair
    is good[k % len(good)] against bad[k % len(bad)]."""
    return [(good[k % len(good)], bad[k % len(bad)]) for k in range(min(cap, max(len(good), len(bad))))]


def _truthfulqa_pairs(row: dict, cap: int) -> list[tuple]:
    """One question: its correct answers (the best one first) against its incorrect ones."""
    best = _text(row, "best_answer")
    correct = [best] + [a for a in _answers(row, "correct_answers") if a != best]
    prompt = [{"role": "user", "content": _text(row, "question")}]
    # a few TruthfulQA rows list one answer as both correct and incorrect: no preference there
    incorrect = [a for a in _answers(row, "incorrect_answers") if a not in set(correct)]
    if not incorrect:
        raise Malformed("every incorrect answer is also listed as correct: no preference pair")
    return [(prompt, good, bad) for good, bad in _cycle_pairs(correct, incorrect, cap)]


def _messages(value, at: str) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise Malformed(f"field '{at}' must be a string or a non-empty list of messages")
    out = []
    for j, m in enumerate(value):
        if not isinstance(m, dict) or m.get("role") not in _ROLES:
            raise Malformed(f"{at}[{j}] needs a role among {', '.join(_ROLES)}")
        out.append({"role": m["role"], "content": _text(m, "content", at=f"{at}[{j}].")})
    return out


def _response(row: dict, key: str) -> list[dict]:
    value = row.get(key)
    if value is None:
        raise Malformed(f"missing field '{key}'")
    return [{"role": "assistant", "content": _text(row, key)}] if isinstance(value, str) else _messages(value, key)


def _preference_pairs(row: dict) -> list[tuple]:
    """TRL's preference layouts: `prompt` + `chosen` + `rejected`, each a string or chat messages
    (explicit prompt), or `chosen` + `rejected` whole conversations that share everything but
    their last assistant message (implicit prompt, as HH-RLHF)."""
    chosen, rejected = _response(row, "chosen"), _response(row, "rejected")
    if "prompt" in row:
        raw = row["prompt"]
        prompt = [{"role": "user", "content": _text(row, "prompt")}] if isinstance(raw, str) or raw is None \
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


def _preference(row: dict) -> list[list[dict]]:
    return [prompt + [{"role": "assistant", "content": chosen}] for prompt, chosen, _ in _preference_pairs(row)]


def _chat(row: dict, task: str) -> list[list[dict]]:
    owner = row.get("task")
    if owner is not None and not isinstance(owner, str):
        raise Malformed(f"field 'task' must be a string, got {type(owner).__name__}")
    if owner not in (None, task):
        return []  # one mixed file can be listed under every expert: each takes its own rows
    messages = row.get("messages")
    if not isinstance(messages, list) or not messages:
        raise Malformed("field 'messages' must be a non-empty list")
    out = []
    for j, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in _ROLES:
            raise Malformed(f"messages[{j}] needs a role among {', '.join(_ROLES)}")
        content = _text(m, "content", at=f"messages[{j}].")
        out.append({"role": m["role"], "content": content})
    if next((m["role"] for m in out if m["role"] != "system"), None) != "user":
        raise Malformed("the first non-system message must be from the user")
    if not any(m["role"] == "assistant" for m in out):
        raise Malformed("no assistant message to learn from")
    return [out]


# ---------------------------------------------------------------- loaders

def _load(path: str, split: str, max_rows: int | None, on_malformed: str, fmt: str,
          convert: Callable[[dict], list], make: Callable[[object, str], object]) -> tuple[list, LoadReport]:
    """Items from every row of one source: `fail` raises DataError with all malformed rows of the
    file, `skip` leaves them out and logs a summary. `max_rows` caps the items kept."""
    items, report = [], LoadReport(path)
    for where, row in _rows(path, split, fmt):
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


def read_source(src, task: str, on_malformed: str = "fail",
                beavertails_unsafe: str = "refuse") -> tuple[list[dict], LoadReport]:
    """Chat records of one `DataSource` for expert `task`.

    `beavertails_unsafe` decides what an unsafe BeaverTails row becomes, since its response must never
    be learnt: "refuse" (default; the usual harmlessness recipe, and what makes unsafe-only samples
    usable) keeps the prompt with `REFUSAL` as the response, "drop" leaves the row out.
    """
    if beavertails_unsafe not in ("refuse", "drop"):
        raise ValueError(f"beavertails_unsafe: {beavertails_unsafe!r} — one of refuse, drop")
    adapters = {"alpaca": _alpaca, "self_instruct": _self_instruct, "hh_rlhf": _hh, "truthfulqa": _truthfulqa,
                "beavertails": lambda row: _beavertails(row, beavertails_unsafe),
                "chat_jsonl": lambda row: _chat(row, task), "preference": _preference}
    if src.format not in adapters:
        raise ValueError(f"format: {src.format!r} — one of {', '.join(adapters)}")
    return _load(src.path, src.split, src.max_rows, on_malformed, src.format, adapters[src.format],
                 lambda messages, where: {"messages": messages, "task": task, "source": where})


def read_pairs(src, task: str, on_malformed: str = "fail", beavertails_unsafe: str = "refuse",
               pairs_per_prompt: int = 4) -> tuple[list[PreferencePair], LoadReport]:
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
    if src.format not in PAIR_FORMATS:
        raise ValueError(f"format: {src.format!r} has no preference pairs — one of {', '.join(PAIR_FORMATS)}")
    make = lambda t, w: PreferencePair(*t, w)  # noqa: E731
    if src.format == "hh_rlhf":
        return _load(src.path, src.split, src.max_rows, on_malformed, "hh_rlhf", _hh_pair, make)
    if src.format == "truthfulqa":
        return _load(src.path, src.split, src.max_rows, on_malformed, "truthfulqa",
                     lambda row: _truthfulqa_pairs(row, pairs_per_prompt), make)
    if src.format == "preference":
        return _load(src.path, src.split, src.max_rows, on_malformed, "preference", _preference_pairs, make)
    rows, report = _load(src.path, src.split, src.max_rows, on_malformed, "beavertails",
                         lambda row: [(_text(row, "prompt"), _text(row, "response"), _is_safe(row))],
                         lambda t, w: (*t, w))
    grouped: dict[str, tuple[str, list[str], list[str]]] = {}
    for prompt, response, safe, where in rows:
        grouped.setdefault(prompt, (where, [], []))[1 if safe else 2].append(response)
    pairs = []
    for prompt, (where, safe, unsafe) in grouped.items():
        if not unsafe or not safe and beavertails_unsafe != "refuse":
            continue
        user = [{"role": "user", "content": prompt}]
        pairs += [PreferencePair(user, good, bad, where)
                  for good, bad in _cycle_pairs(safe or [REFUSAL], unsafe, pairs_per_prompt)]
    report.kept = len(pairs)
    return pairs, report


def hh_rlhf_pairs(path: str, *, split: str = "test", max_rows: int | None = None,
                  on_malformed: str = "fail") -> tuple[list[PreferencePair], LoadReport]:
    """Preference pairs of an HH-RLHF file: the shared prompt and both last responses."""
    return _load(path, split, max_rows, on_malformed, "hh_rlhf", _hh_pair, lambda t, w: PreferencePair(*t, w))


def truthfulqa_mc(path: str, *, split: str = "validation", max_rows: int | None = None,
                  on_malformed: str = "fail") -> tuple[list[MCItem], LoadReport]:
    """TruthfulQA multiple-choice items (MC1: best vs incorrect; MC2: correct vs incorrect)."""
    return _load(path, split, max_rows, on_malformed, "truthfulqa", _truthfulqa_mc, lambda t, w: MCItem(*t, w))
