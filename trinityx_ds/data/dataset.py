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

from trinityx_ds.data.formats import DataError, read_source
from trinityx_ds.data.render import IGNORE, render_example, shift_labels

log = logging.getLogger(__name__)

_IDS = datasets.List(datasets.Value("int32"))
FEATURES = datasets.Features({"input_ids": _IDS, "labels": _IDS, "task_id": datasets.Value("int32"),
                              "example_id": datasets.Value("int64")})
PACKED_FEATURES = datasets.Features({**FEATURES, "example_id": datasets.List(datasets.Value("int64"))})


def _to_dataset(rows: list[dict], features: datasets.Features) -> datasets.Dataset:
    return datasets.Dataset.from_dict({k: [r[k] for r in rows] for k in features}, features=features)


def heldout_indices(n: int, fraction: float, seed: int, task_id: int) -> tuple[list[int], list[int]]:
    """(train, held-out) row indices, each in file order: a seeded draw of ceil(n * fraction) rows,
    leaving at least one training row; the same seed always gives the same, disjoint split."""
    n_held = min(n - 1, math.ceil(n * fraction)) if fraction > 0 and n > 1 else 0
    perm = np.random.default_rng([seed, task_id]).permutation(n)
    return sorted(perm[n_held:].tolist()), sorted(perm[:n_held].tolist())


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
                        beavertails_unsafe: str | None = None
                        ) -> dict[str, tuple[datasets.Dataset, datasets.Dataset]]:
    """task -> (train, held-out) for every expert, in `expert_names` order.

    Held-out rows are never packed (evaluation reads them one example at a time).
    `beavertails_unsafe` (refuse | drop, see formats.read_source) falls back to
    `data_cfg.beavertails_unsafe` when the config has that field, else "refuse".
    """
    unsafe = beavertails_unsafe or getattr(data_cfg, "beavertails_unsafe", "refuse")
    out, next_id = {}, 0
    for task_id, task in enumerate(expert_names):
        rows, dropped = [], 0
        for src in data_cfg.tasks[task]:
            records, _ = read_source(src, task, data_cfg.on_malformed, unsafe)
            for rec in records:
                ex = render_example(tokenizer, rec["messages"], data_cfg.max_seq_len, data_cfg.chat_template)
                if ex is None:
                    dropped += 1
                else:
                    rows.append({**ex, "task_id": task_id, "example_id": next_id + len(rows)})
        if dropped:
            log.warning("data.tasks.%s: %d examples dropped, no response token within max_seq_len %d",
                        task, dropped, data_cfg.max_seq_len)
        if not rows:
            raise DataError([f"data.tasks.{task}: no usable example"])
        next_id += len(rows)
        train_idx, held_idx = heldout_indices(len(rows), data_cfg.heldout_fraction, seed, task_id)
        train = _to_dataset([rows[i] for i in train_idx], FEATURES)
        out[task] = (pack(train, data_cfg.max_seq_len) if data_cfg.packing else train,
                     _to_dataset([rows[i] for i in held_idx], FEATURES))
    return out


def mixture(task_sets: dict[str, tuple[datasets.Dataset, datasets.Dataset]], seed: int) -> datasets.Dataset:
    """Stage 2's training set: every task's train rows together, shuffled with `seed`."""
    return datasets.concatenate_datasets([train for train, _ in task_sets.values()]).shuffle(seed=seed)


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


class Batches:
    """Endless, deterministic, resumable micro-batches of one data-parallel rank.

    Epoch e visits the rows in the order `default_rng([seed, e]).permutation(n)`; step s of rank r
    takes items [(s * world + r) * micro_batch, + micro_batch) of those epochs laid end to end, so
    any step is computed directly and a run resumed from `state_dict()` (the checkpoint's data
    position) continues exactly where it stopped.
    """

    def __init__(self, dataset: datasets.Dataset, micro_batch: int, seed: int, pad_id: int, *,
                 rank: int = 0, world: int = 1, pad_to_multiple: int = 1, start_step: int = 0):
        if len(dataset) == 0:
            raise ValueError("cannot draw batches from an empty data set")
        self.dataset, self.micro_batch, self.seed, self.pad_id = dataset, micro_batch, seed, pad_id
        self.rank, self.world, self.pad_to_multiple, self.step = rank, world, pad_to_multiple, start_step
        self._epoch, self._perm = -1, None

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
        return collate(rows, self.pad_id, self.pad_to_multiple)

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
