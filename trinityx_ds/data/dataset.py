"""Per-task and mixed training sets, the held-out split, packing, collation and resumable batches.

Rows (datasets.Dataset): `input_ids`, `labels` (unshifted, see render.py), `task_id` (index of the
task in the expert names) and `example_id` (unique across all tasks of one build): an int per row
without packing, one per token with packing. Packing joins whole examples of ONE task greedily up
to max_seq_len, so every row, packed or not, has a single task label, and `example_id` still tells
the router's task loss which tokens belong together. Packed examples see each other through the
causal mask (the backbone takes no attention mask); targets never cross an example boundary.
"""
from __future__ import annotations

import logging
import math

import datasets
import numpy as np
import torch

from typing import NamedTuple

from trinityx_ds.config.schema import PAIR_FORMATS
from trinityx_ds.data.formats import DataError, PreferencePair, read_pairs, read_source
from trinityx_ds.data.render import IGNORE, render_example, render_pair, shift_labels

log = logging.getLogger(__name__)

_IDS = datasets.List(datasets.Value("int32"))
FEATURES = datasets.Features({"input_ids": _IDS, "labels": _IDS, "task_id": datasets.Value("int32"),
                              "example_id": datasets.Value("int64")})
PACKED_FEATURES = datasets.Features({**FEATURES, "example_id": datasets.List(datasets.Value("int64"))})
PAIR_FEATURES = datasets.Features({"chosen_input_ids": _IDS, "chosen_labels": _IDS, "rejected_input_ids": _IDS,
                                   "rejected_labels": _IDS, "task_id": datasets.Value("int32"),
                                   "example_id": datasets.Value("int64")})


def _to_dataset(rows: list[dict], features: datasets.Features) -> datasets.Dataset:
    return datasets.Dataset.from_dict({k: [r[k] for r in rows] for k in features}, features=features)


def heldout_indices(n: int, fraction: float, seed: int, task_id: int) -> tuple[list[int], list[int]]:
    """(train, held-out) row indices, each in file order: a seeded draw of ceil(n * fraction) rows,
    leaving at least one training row; the same seed always gives the same, disjoint split."""
    n_held = min(n - 1, math.ceil(n * fraction)) if fraction > 0 and n > 1 else 0
    perm = np.random.default_rng([seed, task_id]).permutation(n)
    return sorted(perm[n_held:].tolist()), sorted(perm[:n_held].tolist())


def prompt_key(messages: list[dict]) -> str:
    """What makes two examples "the same prompt" for the held-out split: the first user turn,
    whitespace collapsed and case folded (a TruthfulQA question, an HH-RLHF opening human turn, an
    instruction). Every response to, and every later turn after, one opening lands on one side."""
    first = next((m["content"] for m in messages if m["role"] == "user"), "")
    return " ".join(first.split()).casefold()


class _Task(NamedTuple):
    """One task's items: SFT records and preference pairs, each tagged with its prompt key."""

    records: list[tuple[str, dict]]  # (key, record)
    pairs: list[tuple[str, PreferencePair]]  # (key, pair); empty unless asked for


def _read_task(data_cfg, task: str, sources, unsafe: str, with_pairs: bool, first: int = 0) -> _Task:
    """Records carry `index`, their place in the task's files (from `first`): the example id base."""
    records, pairs = [], []
    for src in sources:
        recs, _ = read_source(src, task, data_cfg.on_malformed, unsafe, data_cfg.max_row_chars)
        records += [(prompt_key(r["messages"]), {**r, "index": first + len(records) + i}) for i, r in enumerate(recs)]
        if with_pairs and src.format in PAIR_FORMATS:
            got, _ = read_pairs(src, task, data_cfg.on_malformed, unsafe, data_cfg.pairs_per_prompt,
                                data_cfg.max_row_chars)
            pairs += [(prompt_key(p.prompt), p) for p in got]
    return _Task(records, pairs)


class Split(NamedTuple):
    """Every task's training and held-out items, split by prompt (see `split_tasks`)."""

    train: dict[str, _Task]
    heldout: dict[str, _Task]


def split_tasks(data_cfg, expert_names: list[str], seed: int, *, beavertails_unsafe: str | None = None,
                pairs_for: tuple[str, ...] = ()) -> Split:
    """Reads every task's sources and splits them by prompt, so no prompt is on both sides.

    A task listed in `data.heldout` takes its held-out items from those files and trains on all of
    `data.tasks`; any other task holds out a seeded draw of ceil(n * heldout_fraction) of its n
    distinct prompts (at least one left to train on). The draw is over the sorted prompt keys of
    the task's SFT records and pairs together, so stage 1's pairs and stage 2's rows of one task
    split the same way. Then the split is checked across tasks: a held-out prompt that is also a
    training prompt anywhere (another task, another file, the same file twice) raises DataError,
    naming both files and lines and the prompt. `pairs_for`: the tasks whose pairs are read too.
    """
    unsafe = beavertails_unsafe or getattr(data_cfg, "beavertails_unsafe", "refuse")
    train, held = {}, {}
    for task_id, task in enumerate(expert_names):
        items = _read_task(data_cfg, task, data_cfg.tasks[task], unsafe, task in pairs_for)
        if task in data_cfg.heldout:
            train[task] = items
            held[task] = _read_task(data_cfg, task, data_cfg.heldout[task], unsafe, task in pairs_for,
                                    first=len(items.records))
            continue
        keys = sorted({k for k, _ in items.records} | {k for k, _ in items.pairs})
        n_held = min(len(keys) - 1, math.ceil(len(keys) * data_cfg.heldout_fraction)) \
            if data_cfg.heldout_fraction > 0 and len(keys) > 1 else 0
        perm = np.random.default_rng([seed, task_id]).permutation(len(keys))
        out = {keys[i] for i in perm[:n_held].tolist()}
        train[task] = _Task([x for x in items.records if x[0] not in out], [x for x in items.pairs if x[0] not in out])
        held[task] = _Task([x for x in items.records if x[0] in out], [x for x in items.pairs if x[0] in out])
    leaks = check_leaks(train, held, data_cfg)
    if leaks:
        raise DataError(leaks, f"{len(leaks)} held-out prompt(s) also in the training data; the held-out "
                               "figures would not mean what they say:")
    return Split(train, held)


def _source_of(item) -> str:
    return item["source"] if isinstance(item, dict) else item.source


def _prompt_of(item) -> str:
    messages = item["messages"] if isinstance(item, dict) else item.prompt
    return next((m["content"] for m in messages if m["role"] == "user"), "")


def check_leaks(train: dict[str, _Task], held: dict[str, _Task], data_cfg=None, first: int = 10) -> list[str]:
    """One line per held-out prompt that is also a training prompt (at most `first`, then a count)."""
    seen: dict[str, tuple[str, str]] = {}  # key -> (task, source) of its first training item
    for task, items in train.items():
        for key, item in items.records + items.pairs:
            seen.setdefault(key, (task, _source_of(item)))
    out, reported = [], set()
    for task, items in held.items():
        where = f"data.heldout.{task}" if data_cfg is not None and task in data_cfg.heldout else \
            f"held out of data.tasks.{task}"
        for key, item in items.records + items.pairs:
            if key in seen and key not in reported:
                reported.add(key)
                other_task, other = seen[key]
                text = _prompt_of(item)
                out.append(f"{_source_of(item)}: prompt {text[:80]!r}{'...' if len(text) > 80 else ''} ({where}) is "
                           f"also a training prompt at {other} (data.tasks.{other_task})")
    return out[:first] + ([f"... and {len(out) - first} more"] if len(out) > first else [])


def _sft_rows(items: _Task, tokenizer, data_cfg, task: str, task_id: int, first_id: int) -> list[dict]:
    rows, dropped = [], 0
    for _, rec in items.records:
        ex = render_example(tokenizer, rec["messages"], data_cfg.max_seq_len, data_cfg.chat_template)
        if ex is None:
            dropped += 1
        else:
            rows.append({**ex, "task_id": task_id, "example_id": first_id + rec["index"]})
    if dropped:
        log.warning("data.tasks.%s: %d examples dropped, no response token within max_seq_len %d",
                    task, dropped, data_cfg.max_seq_len)
    return rows


def pack(dataset: datasets.Dataset, max_seq_len: int) -> datasets.Dataset:
    """Greedy, in order: whole examples of one task per row, at most max_seq_len tokens."""
    rows: list[dict] = []
    for ex in dataset:
        n, row = len(ex["input_ids"]), rows[-1] if rows else None
        if row is None or row["task_id"] != ex["task_id"] or len(row["input_ids"]) + n > max_seq_len:
            row = {"input_ids": [], "labels": [], "task_id": ex["task_id"], "example_id": []}
            rows.append(row)
        row["input_ids"] += ex["input_ids"]
        row["labels"] += ex["labels"]
        row["example_id"] += [ex["example_id"]] * n
    return _to_dataset(rows, PACKED_FEATURES)


def build_task_datasets(data_cfg, tokenizer, expert_names: list[str], seed: int, *,
                        beavertails_unsafe: str | None = None, split: Split | None = None
                        ) -> dict[str, tuple[datasets.Dataset, datasets.Dataset]]:
    """task -> (train, held-out) SFT rows for every expert, in `expert_names` order, split by
    prompt (`split_tasks`; pass `split` to reuse one already read).

    Held-out rows are never packed (evaluation reads them one example at a time).
    `beavertails_unsafe` (refuse | drop, see formats.read_source) falls back to
    `data_cfg.beavertails_unsafe` when the config has that field, else "refuse".
    """
    split = split or split_tasks(data_cfg, expert_names, seed, beavertails_unsafe=beavertails_unsafe)
    out, next_id = {}, 0
    for task_id, task in enumerate(expert_names):
        train = _sft_rows(split.train[task], tokenizer, data_cfg, task, task_id, next_id)
        held = _sft_rows(split.heldout[task], tokenizer, data_cfg, task, task_id, next_id)
        if not train:
            files = ", ".join(s.path for s in data_cfg.tasks.get(task, []))
            raise DataError([f"data.tasks.{task} ({files}): no usable example (every row too long for "
                             f"data.max_seq_len {data_cfg.max_seq_len}, or held out)"])
        next_id += len(split.train[task].records) + len(split.heldout[task].records)
        train_set = _to_dataset(train, FEATURES)
        out[task] = (pack(train_set, data_cfg.max_seq_len) if data_cfg.packing else train_set,
                     _to_dataset(held, FEATURES))
    return out


def _pair_rows(items: _Task, tokenizer, data_cfg, task_id: int) -> tuple[list[dict], int]:
    rows, skipped = [], 0
    for _, pair in items.pairs:
        ex = render_pair(tokenizer, pair.prompt, pair.chosen, pair.rejected, data_cfg.max_seq_len,
                         data_cfg.chat_template, data_cfg.pair_too_long)
        if ex is None:
            skipped += 1
        else:
            rows.append({**ex, "task_id": task_id, "example_id": len(rows)})
    return rows, skipped


def build_pair_datasets(data_cfg, tokenizer, expert_names: list[str], seed: int, task: str, *,
                        beavertails_unsafe: str | None = None) -> tuple[datasets.Dataset, datasets.Dataset]:
    """(train, held-out) preference pairs of `task`, split by prompt exactly as its SFT rows are
    (stage 2's held-out rows are stage 1's held-out prompts). Pairs that do not fit max_seq_len
    are truncated or skipped (data.pair_too_long) and counted in the log."""
    split = split_tasks(data_cfg, expert_names, seed, beavertails_unsafe=beavertails_unsafe, pairs_for=(task,))
    task_id = expert_names.index(task)
    train, skipped = _pair_rows(split.train[task], tokenizer, data_cfg, task_id)
    held, held_skipped = _pair_rows(split.heldout[task], tokenizer, data_cfg, task_id)
    if skipped + held_skipped:
        log.warning("data.tasks.%s: %d preference pairs skipped (%s at max_seq_len %d, data.pair_too_long: %s)",
                    task, skipped + held_skipped, "a response does not fit" if data_cfg.pair_too_long !=
                    "skip" else "longer than", data_cfg.max_seq_len, data_cfg.pair_too_long)
    if not train:
        raise DataError([f"data.tasks.{task}: no usable preference pair (experts.objective.{task} needs them)"])
    return _to_dataset(train, PAIR_FEATURES), _to_dataset(held, PAIR_FEATURES)


def mixture(task_sets: dict[str, tuple[datasets.Dataset, datasets.Dataset]], seed: int,
            balanced: bool = False) -> datasets.Dataset:
    """Stage 2's training set: every task's train rows together, shuffled with `seed`.

    balanced (`data.mixture: balanced`): each task oversampled to the largest task's row count
    (whole passes over its rows, then a seeded sample without repetition for the rest), so the
    router learns the tasks apart rather than the data sets' sizes as a prior (with 1,800 harm
    pairs against 270 help rows, a proportional mixture teaches it that help is rare)."""
    sets = [train for train, _ in task_sets.values()]
    if balanced and sets:
        rng, n = np.random.default_rng(seed), max(len(s) for s in sets)
        sets = [s.select(np.concatenate([np.tile(np.arange(len(s)), n // len(s)),
                                         rng.choice(len(s), n % len(s), replace=False)]).tolist())
                if 0 < len(s) < n else s for s in sets]
    return datasets.concatenate_datasets(sets).shuffle(seed=seed)


def collate(batch: list[dict], pad_id: int, pad_to_multiple: int = 1) -> dict[str, torch.Tensor]:
    """Right-padded tensors: input_ids [B, S], labels [B, S] shifted for `token_losses`,
    example_id [B, S] (-1 on padding) and task_label [B] (-1 for an empty row).
    S is the longest row (at least 1) rounded up to `pad_to_multiple` (e.g. the TP size under
    sequence parallelism)."""
    lengths = [len(r["input_ids"]) for r in batch]
    seq = math.ceil(max([1, *lengths]) / pad_to_multiple) * pad_to_multiple
    input_ids = torch.full((len(batch), seq), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), seq), IGNORE, dtype=torch.long)
    example_id = torch.full((len(batch), seq), -1, dtype=torch.long)
    task_label = torch.full((len(batch),), -1, dtype=torch.long)
    for i, (row, n) in enumerate(zip(batch, lengths)):
        if n:
            input_ids[i, :n] = torch.tensor(row["input_ids"])
            labels[i, :n] = torch.tensor(row["labels"])
            example_id[i, :n] = torch.as_tensor(row["example_id"])
            task_label[i] = row["task_id"]
    return {"input_ids": input_ids, "labels": shift_labels(labels, example_id), "example_id": example_id,
            "task_label": task_label}


def collate_pairs(batch: list[dict], pad_id: int, pad_to_multiple: int = 1) -> dict[str, torch.Tensor]:
    """Preference pairs as `collate` rows, interleaved: row 2i is pair i's chosen sequence, row
    2i + 1 its rejected one, so any slice of whole pairs is a slice of consecutive rows."""
    rows = []
    for pair in batch:
        for j, side in enumerate(("chosen", "rejected")):
            rows.append({"input_ids": pair[f"{side}_input_ids"], "labels": pair[f"{side}_labels"],
                         "task_id": pair["task_id"], "example_id": 2 * pair["example_id"] + j})
    return collate(rows, pad_id, pad_to_multiple)


class Batches:
    """Endless, deterministic, resumable micro-batches of one data-parallel rank.

    Epoch e visits the rows in the order `default_rng([seed, e]).permutation(n)`; step s of rank r
    takes items [(s * world + r) * micro_batch, + micro_batch) of those epochs laid end to end, so
    any step is computed directly and a run resumed from `state_dict()` (the checkpoint's data
    position) continues exactly where it stopped.
    """

    def __init__(self, dataset: datasets.Dataset, micro_batch: int, seed: int, pad_id: int, *,
                 rank: int = 0, world: int = 1, pad_to_multiple: int = 1, start_step: int = 0, collate_fn=None):
        if len(dataset) == 0:
            raise ValueError("cannot draw batches from an empty data set")
        self.dataset, self.micro_batch, self.seed, self.pad_id = dataset, micro_batch, seed, pad_id
        self.rank, self.world, self.pad_to_multiple, self.step = rank, world, pad_to_multiple, start_step
        self._epoch, self._perm = -1, None
        self.collate_fn = collate_fn or collate  # collate_pairs for preference pairs

    def _row(self, item: int) -> int:
        epoch, offset = divmod(item, len(self.dataset))
        if epoch != self._epoch:
            self._epoch, self._perm = epoch, np.random.default_rng([self.seed, epoch]).permutation(len(self.dataset))
        return int(self._perm[offset])

    def indices(self, step: int) -> list[int]:
        first = (step * self.world + self.rank) * self.micro_batch
        return [self._row(item) for item in range(first, first + self.micro_batch)]

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        columns = self.dataset[self.indices(self.step)]
        self.step += 1
        rows = [dict(zip(columns, values)) for values in zip(*columns.values())]
        return self.collate_fn(rows, self.pad_id, self.pad_to_multiple)

    def state_dict(self) -> dict:
        return {"step": self.step, "seed": self.seed, "micro_batch": self.micro_batch, "world": self.world,
                "num_rows": len(self.dataset)}

    def load_state_dict(self, state: dict) -> None:
        """Resume at `state["step"]`; refuses a position taken over other data or another layout."""
        mine = self.state_dict()
        changed = [f"{k}: saved {state.get(k)!r}, now {v!r}" for k, v in mine.items()
                   if k != "step" and state.get(k) != v]
        if changed:
            raise ValueError("the saved data position does not fit this data set/layout: " + "; ".join(changed))
        self.step = int(state["step"])
