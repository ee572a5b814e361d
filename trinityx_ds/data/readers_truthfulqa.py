"""TruthfulQA: a `question`, its `best_answer`, and its `correct_answers` and `incorrect_answers`
(each a ';'-separated string, as in the CSV, or a list, as on the hub).

SFT learns the best answer; preference pairs set the correct answers (the best one first)
against the incorrect ones; the multiple-choice items feed the MC1/MC2 evaluation.
"""
from __future__ import annotations

from trinityx_ds.data.rows import Malformed, Options, cycle_pairs, exchange, text_field

HUB_CONFIG = "generation"  # truthfulqa/truthful_qa needs a config; the other hub sets have one


def answers(row: dict, key: str) -> list[str]:
    value = row.get(key)
    if isinstance(value, str):
        value = value.split(";")
    if not isinstance(value, list) or not all(isinstance(a, str) for a in value):
        raise Malformed(f"field '{key}' must be a ';'-separated string or a list of strings")
    out = [a.strip() for a in value if a.strip()]
    if not out:
        raise Malformed(f"empty field '{key}'")
    return out


def records(row: dict, opts: Options) -> list[list[dict]]:
    return [exchange(text_field(row, "question"), text_field(row, "best_answer"))]


def mc_item(row: dict) -> list[tuple]:
    """(question, best answer, correct answers, incorrect answers): one multiple-choice item."""
    return [(text_field(row, "question"), text_field(row, "best_answer"),
             answers(row, "correct_answers"), answers(row, "incorrect_answers"))]


def pairs(row: dict, opts: Options) -> list[tuple]:
    """One question: its correct answers (the best one first) against its incorrect ones, at most
    `opts.pairs_per_prompt` pairs, cycling so that as many distinct answers as possible are used."""
    best = text_field(row, "best_answer")
    correct = [best] + [a for a in answers(row, "correct_answers") if a != best]
    prompt = [{"role": "user", "content": text_field(row, "question")}]
    # a few TruthfulQA rows list one answer as both correct and incorrect: no preference there
    incorrect = [a for a in answers(row, "incorrect_answers") if a not in set(correct)]
    if not incorrect:
        raise Malformed("every incorrect answer is also listed as correct: no preference pair")
    return [(prompt, good, bad) for good, bad in cycle_pairs(correct, incorrect, opts.pairs_per_prompt)]
