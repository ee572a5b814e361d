"""The dev cut of tools/hhh_dev.py: settings of the efficacy run are chosen on whole prompts cut
from its TRAINING files, never on the held-out halves (the tool's docstring says how and why)."""
from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import numpy as np

from trinityx_ds.experiments.samples import SAMPLE_FILES, hh_opening, take_groups

COLUMNS = ["harmless acc", "harmless acc (len-norm)", "harmless acc (vs backbone)", "harmless margin"]


def dev_cut(train: Path, out: Path, n: int, seed: int, exclude: frozenset) -> tuple[Path, Path]:
    """(fit, dev) files: whole openings of the HH-RLHF training file, at least n rows on the dev side;
    `exclude`: openings other training data holds (BeaverTails' prompts), kept on the fit side."""
    lines = [line for line in train.read_text().splitlines(keepends=True) if line.strip()]
    keys = [hh_opening(line) for line in lines]
    held = take_groups(keys, n, seed, exclude=exclude)
    fit, dev = out / "harmless_fit.jsonl", out / "harmless_dev.jsonl"
    fit.write_text("".join(line for line, k in zip(lines, keys) if k not in held))
    dev.write_text("".join(line for line, k in zip(lines, keys) if k in held))
    return fit, dev


def length_contest(result: dict) -> str:
    """How much of the raw accuracy is response length: the correlation of the backbone's raw margin
    log p(c) - log p(r) with the length difference (rejected - chosen tokens), and the share of pairs
    ranked wrong by less than 10 nats (what an expert could flip without rewriting the model)."""
    margin = np.array([x["c"] - x["r"] for x in result["hh_items"]])
    tokens = np.array(result["hh_tokens"], float)
    r = float(np.corrcoef(margin, tokens[:, 1] - tokens[:, 0])[0, 1])
    near = float(((margin < 0) & (margin > -10)).mean())
    return (f"Backbone on these pairs: raw margin vs (rejected - chosen) length in tokens, Pearson r = {r:.3f}; "
            f"pairs ranked wrong by less than 10 nats: {near:.3f}; median |margin| {np.median(np.abs(margin)):.1f} nats.")


def training_side(split: dict[str, Path], root: Path) -> Path:
    """A samples folder laid out as ../shared/data (SAMPLE_FILES) holding only the efficacy run's
    training files, so the dev cut is made by the very code that made the efficacy split."""
    for part, key in (("truthfulqa", "tqa_train"), ("alpaca", "alpaca_train")):
        (root / SAMPLE_FILES[part]).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(split[key], root / SAMPLE_FILES[part])
    (root / SAMPLE_FILES["hh"]).parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(root / SAMPLE_FILES["hh"], "wt", encoding="utf-8") as f:
        f.write(Path(split["hh_train"]).read_text(encoding="utf-8"))
    return root


ROUTER_COLUMNS = ["MC1", "MC2", "harmless acc", "help ll/token"]
