"""Evaluation files cut out of the project's real samples BY PROMPT, so a TruthfulQA question, an
HH-RLHF opening human turn or an Alpaca instruction is on one side only (training or evaluation):
what `trinityx demo`, tools/hhh_efficacy.py, tools/hhh_dev.py and tools/route_agreement.py
evaluate on. `SAMPLE_FILES` is the layout of a samples folder (the real one, ../shared/data, or
`fixture_samples`' copy of the project's fixtures). The key is the run's own leak-check rule
(data.dataset.prompt_key), so what this split holds out the training run also refuses to train on.
Plain files in and out: nothing here runs a model.
"""
from __future__ import annotations

import csv
import gzip
import json
import random
import re
from pathlib import Path

from trinityx_ds.data.dataset import prompt_key
from trinityx_ds.storage.resources import fixtures_dir

FIXTURES = fixtures_dir()
SAMPLE_FILES = {"truthfulqa": "truthfulqa/TruthfulQA_v1_817.csv", "hh": "hh_rlhf/harmless-base-test.jsonl.gz",
                "alpaca": "alpaca/alpaca_200_first.json"}
_HUMAN = re.compile(r"\n\nHuman:(.*?)(?:\n\nAssistant:|$)", re.DOTALL)


def text_key(text: str) -> str:
    """A prompt's key for the split: data.dataset.prompt_key's rule (the one the run's leak check
    applies), for a prompt given as its text."""
    return prompt_key([{"role": "user", "content": text}])


def hh_opening(line: str) -> str:
    """An HH-RLHF row's prompt key: its first human turn (the whole line where none parses, so a
    malformed row still lands on one side)."""
    m = _HUMAN.search("\n\n" + json.loads(line)["chosen"].lstrip())
    return text_key(m.group(1) if m else line)


def take_groups(keys: list[str], n_items: int, seed: int, exclude: frozenset = frozenset()) -> set[str]:
    """Distinct keys, drawn in a seeded order, until their rows number at least `n_items`."""
    counts: dict[str, int] = {}
    for k in keys:
        counts[k] = counts.get(k, 0) + 1
    order = sorted(k for k in counts if k not in exclude)
    random.Random(seed).shuffle(order)
    held, n = set(), 0
    for k in order:
        if n >= n_items:
            break
        held.add(k)
        n += counts[k]
    return held


def split_samples(data: Path, out: Path, n_tqa: int, n_hh: int, n_help: int, seed: int,
                  hh_exclude: frozenset = frozenset()) -> dict[str, Path]:
    """Training and evaluation files (`tqa_train`, `tqa_eval`, `hh_*`, `alpaca_*`) under `out`,
    split by prompt: whole prompts are drawn (seeded) until at least n_tqa TruthfulQA rows (one per
    question in the original file), n_hh HH-RLHF rows and n_help Alpaca rows are held out.
    `hh_exclude`: openings that must stay on the training side (prompts other training data holds)."""
    data, out = Path(data), Path(out)
    missing = [str(data / f) for f in SAMPLE_FILES.values() if not (data / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{missing[0]}: missing (a samples folder holds {', '.join(SAMPLE_FILES.values())})")
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    with open(data / SAMPLE_FILES["truthfulqa"], encoding="utf-8-sig", newline="") as f:
        header, *rows = list(csv.reader(f))
    q = header.index("Question")
    held = take_groups([text_key(r[q]) for r in rows], n_tqa, seed)
    for part in ("train", "eval"):
        paths[f"tqa_{part}"] = out / f"truthfulqa_{part}.csv"
        keep = [r for r in rows if (text_key(r[q]) in held) == (part == "eval")]
        with open(paths[f"tqa_{part}"], "w", encoding="utf-8", newline="") as f:
            csv.writer(f).writerows([header, *keep])
    with gzip.open(data / SAMPLE_FILES["hh"], "rt", encoding="utf-8") as f:
        lines = [line for line in f if line.strip()]
    keys = [hh_opening(line) for line in lines]
    held = take_groups(keys, n_hh, seed, exclude=hh_exclude)
    for part in ("train", "eval"):
        paths[f"hh_{part}"] = out / f"harmless_{part}.jsonl"
        paths[f"hh_{part}"].write_text("".join(line for line, k in zip(lines, keys) if (k in held) == (part == "eval")))
    alpaca = json.loads((data / SAMPLE_FILES["alpaca"]).read_text())
    keys = [text_key(f"{r['instruction']}\n\n{r['input']}" if r.get("input") else r["instruction"]) for r in alpaca]
    held = take_groups(keys, n_help, seed)
    for part in ("train", "eval"):
        paths[f"alpaca_{part}"] = out / f"alpaca_{part}.json"
        paths[f"alpaca_{part}"].write_text(json.dumps([r for r, k in zip(alpaca, keys) if (k in held) == (part == "eval")]))
    return paths


def fixture_samples(root: Path, repeat_questions: int = 1) -> Path:
    """A samples folder laid out like the real ones (SAMPLE_FILES), written from the project's own
    fixtures: what tools/hhh_efficacy.py --smoke runs on and the tests split. `repeat_questions`:
    each TruthfulQA question that many rows (a question's rows must stay on one side together)."""
    fix, root = FIXTURES, Path(root)
    for sub in ("truthfulqa", "hh_rlhf", "alpaca"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    rows = [json.loads(line) for line in (fix / "truthfulqa_tiny.jsonl").read_text().splitlines()]
    with open(root / SAMPLE_FILES["truthfulqa"], "w", newline="", encoding="utf-8-sig") as f:
        w = csv.writer(f)
        w.writerow(["Type", "Category", "Question", "Best Answer", "Correct Answers", "Incorrect Answers", "Source"])
        for r in rows * repeat_questions:
            w.writerow([r["type"], r["category"], r["question"], r["best_answer"], "; ".join(r["correct_answers"]),
                        "; ".join(r["incorrect_answers"]), r["source"]])
    with gzip.open(root / SAMPLE_FILES["hh"], "wt", encoding="utf-8") as f:
        f.write((fix / "hh_rlhf_tiny.jsonl").read_text())
    alpaca = [json.loads(line) for line in (fix / "alpaca_tiny.jsonl").read_text().splitlines()]
    (root / SAMPLE_FILES["alpaca"]).write_text(json.dumps(alpaca))
    return root
