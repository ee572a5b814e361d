"""Preference data: the four pair readers on their fixtures and real samples, pair rendering and
truncation, collation, the split by prompt and the refusal of a held-out prompt that leaks into
training, and the config rules of experts.objective."""
import shutil
from pathlib import Path

import pytest
import torch

from trinityx_ds.config import DataConfig, DataSource, RunConfig
from trinityx_ds.data import (IGNORE, REFUSAL, DataError, build_pair_datasets, build_task_datasets, collate_pairs,
                              prompt_key, read_pairs, read_source, render_pair, split_tasks)

FIX = Path(__file__).resolve().parents[2] / "trinityx_ds" / "fixtures" / "data"
SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason=f"real data samples not found at {SHARED}")


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from transformers import AutoTokenizer

    from trinityx_ds.model.tiny import make_tiny_tokenizer

    return AutoTokenizer.from_pretrained(make_tiny_tokenizer(tmp_path_factory.mktemp("tok")))


def pairs(name, fmt, **kw):
    return read_pairs(DataSource(str(name), fmt), "harm", **kw)[0]


def test_generic_preference_jsonl_in_every_trl_layout():
    got = pairs(FIX / "preference_tiny.jsonl", "preference")
    assert len(got) == 8 and got[0].source.endswith("preference_tiny.jsonl:1")
    assert got[0].prompt == [{"role": "user", "content": "How do I make my tea less bitter?"}]
    assert got[1].prompt[0]["role"] == "system" and got[1].rejected == "Yes, the mix cleans twice as fast."
    # implicit prompt: the shared conversation before the last assistant message
    assert got[2].prompt == [{"role": "user", "content": "What is the capital of Australia?"}]
    assert (got[2].chosen, got[2].rejected) == ("Canberra.", "Sydney.")
    # as SFT text, the same file gives prompt + chosen
    sft = read_source(DataSource(str(FIX / "preference_tiny.jsonl"), "preference"), "harm")[0]
    assert sft[2]["messages"][-1] == {"role": "assistant", "content": "Canberra."} and len(sft) == 8


def test_malformed_preference_rows_name_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "q", "chosen": "a"}\n'
                   '{"prompt": "q", "chosen": "a", "rejected": ""}\n'
                   '{"chosen": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "a"}], '
                   '"rejected": [{"role": "user", "content": "y"}, {"role": "assistant", "content": "b"}]}\n'
                   '{"prompt": "q", "chosen": "a", "rejected": "b"}\n')
    with pytest.raises(DataError) as err:
        pairs(bad, "preference")
    assert err.value.problems == [f"{bad}:1: missing field 'rejected'", f"{bad}:2: empty field 'rejected'",
                                  f"{bad}:3: no 'prompt' field, and 'chosen' and 'rejected' differ before "
                                  "their last message"]
    assert len(pairs(bad, "preference", on_malformed="skip")) == 1


def test_hh_truthfulqa_and_beavertails_pairs_on_fixtures():
    hh = pairs(FIX / "hh_rlhf_tiny.jsonl", "hh_rlhf")
    assert len(hh) == 16 and all(p.prompt[-1]["role"] == "user" for p in hh)
    assert any(len(p.prompt) > 1 for p in hh)  # multi-turn dialogues keep their earlier turns as the prompt
    tqa = pairs(FIX / "truthfulqa_tiny.jsonl", "truthfulqa")
    # 3 correct answers (best first) x 2 incorrect per question: 3 pairs each, cycling through both lists
    assert len(tqa) == 48 and tqa[0].chosen.startswith("No, cracking your knuckles has not")
    assert [p.rejected for p in tqa[:3]] == ["Yes, cracking your knuckles causes arthritis",
                                             "Yes, it wears out the joints",
                                             "Yes, cracking your knuckles causes arthritis"]
    assert len(pairs(FIX / "truthfulqa_tiny.jsonl", "truthfulqa", pairs_per_prompt=1)) == 16
    bt = pairs(FIX / "beavertails_pairs_tiny.csv", "beavertails")
    # coworker: 1 safe x 2 unsafe; the gun prompt has no safe response: the refusal against it
    assert [(p.chosen == REFUSAL, p.rejected) for p in bt] == [
        (False, "Spread a rumour about them so they lose their job."),
        (False, "Delete their files when they are away."),
        (True, "Find a private seller online who does not ask questions.")]
    assert len(pairs(FIX / "beavertails_pairs_tiny.csv", "beavertails", beavertails_unsafe="drop")) == 2
    with pytest.raises(ValueError, match="format: 'alpaca' has no preference pairs"):
        pairs(FIX / "alpaca_tiny.jsonl", "alpaca")


@needs_shared
def test_real_samples_give_pairs():
    hh = pairs(SHARED / "hh_rlhf/harmless-base-test.jsonl.gz", "hh_rlhf", on_malformed="skip")
    assert len(hh) == 2299 and len({prompt_key(p.prompt) for p in hh}) == 2165  # 134 repeated openings
    tqa = pairs(SHARED / "truthfulqa/TruthfulQA_v1_817.csv", "truthfulqa")
    assert len(tqa) == 2967 and len({prompt_key(p.prompt) for p in tqa}) == 817
    assert all(p.chosen != p.rejected for p in tqa)
    bt = pairs(SHARED / "beavertails/artkit_beavertails_sample.csv", "beavertails")
    assert len(bt) == 140 and {p.chosen for p in bt} == {REFUSAL}  # all unsafe: refusal against each
    assert not pairs(SHARED / "beavertails/artkit_beavertails_sample.csv", "beavertails", beavertails_unsafe="drop")


def test_render_pair_labels_only_the_last_response_and_truncates_the_prompt_on_the_left(tok):
    prompt = [{"role": "user", "content": "one two three four five six seven eight nine ten"},
              {"role": "assistant", "content": "an earlier answer that is not scored"},
              {"role": "user", "content": "and now?"}]
    full = render_pair(tok, prompt, "yes indeed", "no", 512, "default")
    for side, text in (("chosen", "yes indeed"), ("rejected", "no")):
        ids, labels = full[f"{side}_input_ids"], full[f"{side}_labels"]
        scored = [i for i, lab in zip(ids, labels) if lab != IGNORE]
        assert tok.decode(scored) == text + tok.eos_token  # the response and its end of turn only
    n_prompt = full["chosen_labels"].index(next(lab for lab in full["chosen_labels"] if lab != IGNORE))
    longest = max(len(full["chosen_input_ids"]), len(full["rejected_input_ids"]))
    cut = render_pair(tok, prompt, "yes indeed", "no", longest - 5, "default")
    assert len(cut["chosen_input_ids"]) == longest - 5
    # both responses whole; the same prompt tokens lost on the left of both sequences
    assert cut["chosen_input_ids"] == full["chosen_input_ids"][5:]
    assert cut["rejected_input_ids"][:n_prompt - 5] == cut["chosen_input_ids"][:n_prompt - 5]
    assert render_pair(tok, prompt, "yes indeed", "no", longest - 5, "default", too_long="skip") is None
    assert render_pair(tok, prompt, "yes indeed " * 40, "no", 32, "default") is None  # the response cannot fit


def test_collate_pairs_interleaves_chosen_and_rejected(tok):
    rows = []
    for i, (c, r) in enumerate([("a b", "c"), ("d", "e f g")]):
        ex = render_pair(tok, [{"role": "user", "content": "q"}], c, r, 64, "default")
        rows.append({**ex, "task_id": 1, "example_id": i})
    b = collate_pairs(rows, pad_id=tok.pad_token_id)
    assert b["input_ids"].shape[0] == 4 and b["task_label"].tolist() == [1, 1, 1, 1]
    for row, (pair, side) in enumerate([(0, "chosen"), (0, "rejected"), (1, "chosen"), (1, "rejected")]):
        n = len(rows[pair][f"{side}_input_ids"])
        assert b["input_ids"][row, :n].tolist() == rows[pair][f"{side}_input_ids"]
        assert b["example_id"][row, :n].unique().tolist() == [2 * pair + (side == "rejected")]


def _data(**kw):
    tasks = {"help": [DataSource(str(FIX / "alpaca_tiny.jsonl"), "alpaca")],
             "harm": [DataSource(str(FIX / "hh_rlhf_tiny.jsonl"), "hh_rlhf"),
                      DataSource(str(FIX / "beavertails_pairs_tiny.csv"), "beavertails")],
             "honest": [DataSource(str(FIX / "truthfulqa_tiny.jsonl"), "truthfulqa")]}
    return DataConfig(tasks=tasks, **{"max_seq_len": 256, "heldout_fraction": 0.25, "chat_template": "default", **kw})


NAMES = ["help", "harm", "honest"]


def test_split_is_by_prompt_and_stage1_pairs_split_as_stage2_rows(tok):
    split = split_tasks(_data(), NAMES, 3, pairs_for=("honest", "harm"))
    for task in ("honest", "harm"):
        train = {k for k, _ in split.train[task].pairs} | {k for k, _ in split.train[task].records}
        held = {k for k, _ in split.heldout[task].pairs} | {k for k, _ in split.heldout[task].records}
        assert train and held and not train & held
    # every pair of a held-out TruthfulQA question is held out with it: 4 of 16 questions, 3 pairs each
    assert len(split.heldout["honest"].pairs) == 12 and len({k for k, _ in split.heldout["honest"].pairs}) == 4
    train_pairs, held_pairs = build_pair_datasets(_data(), tok, NAMES, 3, "honest")
    sets = build_task_datasets(_data(), tok, NAMES, 3)
    assert len(train_pairs) == 36 and len(held_pairs) == 12 and len(sets["honest"][1]) == 4
    held_questions = {tok.decode(r["input_ids"]).split("<|user|>\n")[1].split("\n")[0] for r in sets["honest"][1]}
    pair_questions = {tok.decode(r["chosen_input_ids"]).split("<|user|>\n")[1].split("\n")[0] for r in held_pairs}
    assert held_questions == pair_questions


def test_a_heldout_prompt_in_training_data_is_refused_with_file_line_and_prompt(tmp_path, tok):
    lines = (FIX / "truthfulqa_tiny.jsonl").read_text().splitlines()
    held = tmp_path / "tqa_eval.jsonl"
    held.write_text("\n".join([lines[0].replace("knuckles", "fingers"), lines[5]]) + "\n")  # line 2 leaks
    data = _data(heldout={"honest": [DataSource(str(held), "truthfulqa")]})
    with pytest.raises(DataError) as err:
        split_tasks(data, NAMES, 3)
    question = __import__("json").loads(lines[5])["question"]
    assert err.value.problems == [f"{held}:2: prompt {question!r} (data.heldout.honest) is also a training prompt "
                                  f"at {FIX / 'truthfulqa_tiny.jsonl'}:6 (data.tasks.honest)"]
    # the same question under two tasks leaks across them, whichever side draws it
    twice = tmp_path / "copy.jsonl"
    shutil.copy(FIX / "truthfulqa_tiny.jsonl", twice)
    data = _data()
    data.tasks["help"] = data.tasks["help"] + [DataSource(str(twice), "truthfulqa")]
    with pytest.raises(DataError, match=r"held out of data.tasks.(help|honest)\) is also a training prompt"):
        split_tasks(data, NAMES, 3)
    # held-out files that do not overlap: the split uses them as they are
    train_half, held_half = tmp_path / "train.jsonl", tmp_path / "held.jsonl"
    train_half.write_text("\n".join(lines[:12]) + "\n")
    held_half.write_text("\n".join(lines[12:]) + "\n")
    clean = _data(heldout={"honest": [DataSource(str(held_half), "truthfulqa")]})
    clean.tasks["honest"] = [DataSource(str(train_half), "truthfulqa")]
    split = split_tasks(clean, NAMES, 3)
    assert len(split.heldout["honest"].records) == 4 and len(split.train["honest"].records) == 12


def test_leak_refused_before_launch_in_one_line(tmp_path, capsys):
    from trinityx_ds.cli import main
    from trinityx_ds.train.tiny_run import write_config

    lines = (FIX / "truthfulqa_tiny.jsonl").read_text().splitlines()
    held = tmp_path / "tqa_eval.jsonl"
    held.write_text(lines[3] + "\n")
    cfg = write_config(tmp_path, **{"data.heldout": {"honest": [{"path": str(held), "format": "truthfulqa"}]}})
    capsys.readouterr()
    assert main(["train", "experts", "--config", str(cfg), "--nproc", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{held}:1: prompt" in err[0] and "truthfulqa_tiny.jsonl:4 (data.tasks.honest)" in err[0]


def test_objective_config_rules():
    def problems(**experts):
        cfg = RunConfig()
        cfg.data = _data()
        for k, v in experts.items():
            setattr(cfg.experts, k, v)
        return [p for p in cfg.problems() if "objective" in p]

    assert problems(objective={"help": "sft", "harm": "dpo", "honest": "simpo"}) == []
    assert problems(objective="dpo") == [
        "experts.objective.help: 'dpo' — needs preference pairs: data.tasks.help[0] has a format without them "
        "(pairs come from hh_rlhf, truthfulqa, beavertails, preference)"]
    assert problems(objective={"help": "sft", "harm": "dpo"})[0].startswith(
        "experts.objective: {'help': 'sft', 'harm': 'dpo'} — one objective per expert")
    assert "dpo, simpo and cpo need experts.kind: lora" in problems(objective={"help": "sft", "harm": "dpo",
                                                                         "honest": "sft"}, kind="full")[0]
    cfg = RunConfig()
    cfg.train.stage1.beta, cfg.train.stage1.label_smoothing = 0.0, 0.5
    assert {"train.stage1.beta: 0.0 — a number > 0",
            "train.stage1.label_smoothing: 0.5 — a number in [0, 0.5)"} <= set(cfg.problems())


def test_dpo_and_simpo_losses_match_their_definitions():
    import torch.nn.functional as F

    from trinityx_ds.train.objectives import Objective, dpo_loss, simpo_loss

    c, r, rc, rr = torch.tensor([-3.0, -5.0]), torch.tensor([-4.0, -2.0]), torch.tensor([-3.5, -4.0]), \
        torch.tensor([-3.5, -3.0])
    loss, parts = dpo_loss(c, r, rc, rr, beta=0.5, label_smoothing=0.1)
    d = (c - rc) - (r - rr)
    want = (-(0.9 * F.logsigmoid(0.5 * d)) - 0.1 * F.logsigmoid(-0.5 * d)).mean()
    assert torch.allclose(loss, want) and torch.allclose(parts["chosen_reward"], 0.5 * (c - rc))
    loss, _ = simpo_loss(c / 2, r / 3, beta=2.0, gamma=1.0)
    assert torch.allclose(loss, -F.logsigmoid(2.0 * (c / 2 - r / 3) - 1.0).mean())
    # per-row log-probs from per-token losses: response tokens only, rows interleaved chosen/rejected
    token_loss = torch.tensor([[1.0, 2.0, 3.0], [0.5, 0.5, 9.0]])
    labels = torch.tensor([[IGNORE, 5, 6], [IGNORE, 7, IGNORE]])

    class Cfg:
        beta, label_smoothing, simpo_gamma = 1.0, 0.0, 0.0

    loss, stats = Objective("simpo", Cfg).loss(token_loss, labels)
    assert stats["simpo/logps_chosen"] == -2.5 and stats["simpo/logps_rejected"] == -0.5
    assert stats["simpo/reward_accuracy"] == 0.0 and torch.isclose(loss, -F.logsigmoid(torch.tensor(-2.0)))


@pytest.mark.parametrize("objective,alpha,smoothing", [("cpo", 1.0, 0.0), ("cpo", 0.0, 0.1), ("simpo", 0.0, 0.0)])
def test_cpo_and_simpo_equal_trl_cpo_trainer(objective, alpha, smoothing):
    """Oracle: TRL's CPOTrainer (loss_type sigmoid for cpo, simpo for simpo) computes the loss from
    logits and shifted labels, concatenating chosen then rejected; ours from per-token losses with
    pairs interleaved. Same logits, same loss and rewards."""
    from types import SimpleNamespace

    import torch.nn.functional as F
    from trl.experimental.cpo.cpo_trainer import CPOTrainer

    from trinityx_ds.train.objectives import Objective

    torch.manual_seed(0)
    P, S, V = 3, 7, 11
    logits = torch.randn(2 * P, S, V, dtype=torch.float64)  # TRL's order: chosen 0..P-1, rejected P..2P-1
    labels = torch.randint(0, V, (2 * P, S))
    for i, start in enumerate([2, 3, 4, 2, 5, 3]):  # each row's prompt: no loss there
        labels[i, :start] = -100
    labels[1, -1] = -100  # a padded tail
    trl_self = SimpleNamespace(alpha=0.0, beta=0.7, label_smoothing=smoothing, loss_type="sigmoid" if objective == "cpo"
                               else "simpo", simpo_gamma=0.5, accelerator=SimpleNamespace(device="cpu"))
    logps = CPOTrainer.get_batch_logps(logits, labels, average_log_prob=objective == "simpo")
    losses, chosen_reward, _ = CPOTrainer.cpo_loss(trl_self, logps[:P], logps[P:])
    # TRL's nll term (concatenated_forward's cross_entropy_loss): token-mean CE of the chosen half, shifted
    nll = torch.nn.CrossEntropyLoss()(logits[:P, :-1].reshape(-1, V), labels[:P, 1:].reshape(-1))
    want = losses.mean() + alpha * nll

    ours_labels = labels[:, 1:]
    token_loss = F.cross_entropy(logits[:, :-1].reshape(-1, V), ours_labels.clamp(min=0).reshape(-1),
                                 reduction="none").view(2 * P, S - 1) * (ours_labels >= 0)
    order = [i for p in range(P) for i in (p, P + p)]  # interleaved: chosen, rejected, chosen, ...
    cfg = SimpleNamespace(beta=0.7, label_smoothing=smoothing, simpo_gamma=0.5, cpo_alpha=alpha)
    loss, stats = Objective(objective, cfg).loss(token_loss[order], ours_labels[order])
    assert torch.allclose(loss.double(), want, atol=1e-6), (loss.item(), want.item())
    assert stats[f"{objective}/logps_chosen"] == pytest.approx(logps[:P].mean().item(), abs=1e-5)
    assert Objective(objective, cfg).needs_reference() is False
    assert stats[f"{objective}/reward_margin"] == pytest.approx(
        (chosen_reward - 0.7 * logps[P:]).mean().item(), abs=1e-5)


def test_pairs_that_do_not_fit_are_truncated_or_skipped_and_counted(tok, caplog):
    """data.pair_too_long: under `skip` every pair whose prompt and response exceed max_seq_len is
    left out, under `truncate_prompt` only those whose response alone does not fit; either way the
    log says how many, and kept + skipped is every pair of the task."""
    split = split_tasks(_data(), NAMES, 3, pairs_for=("harm",))
    total = len(split.train["harm"].pairs) + len(split.heldout["harm"].pairs)
    kept, logged = {}, {}
    for mode in ("skip", "truncate_prompt"):
        caplog.clear()
        with caplog.at_level("WARNING"):
            train, held = build_pair_datasets(_data(max_seq_len=96, pair_too_long=mode), tok, NAMES, 3, "harm")
        kept[mode] = len(train) + len(held)
        found = [r.getMessage() for r in caplog.records if "preference pairs skipped" in r.getMessage()]
        logged[mode] = int(found[0].split(": ")[1].split()[0]) if found else 0
        assert kept[mode] + logged[mode] == total, (mode, kept[mode], logged[mode], total)
        assert all(len(r["chosen_input_ids"]) <= 97 and len(r["rejected_input_ids"]) <= 97 for r in train)
    assert logged["skip"] > logged["truncate_prompt"] and kept["truncate_prompt"] > kept["skip"]
    full_train, full_held = build_pair_datasets(_data(), tok, NAMES, 3, "harm")  # 256 tokens: every pair fits
    assert len(full_train) + len(full_held) == total
