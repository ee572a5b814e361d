"""Evaluation on a run trained by the real CLI (random stage-1 experts, router trained on 2 processes):
the suites on the real data samples through `trinityx eval`, DP=2 (launched with --nproc) equal to
DP=1 bit for bit, the fitted T written back; the loaded models against transformers."""
import json
import math
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.dist import run_dist
from trinityx_ds.calibration.fit import read_temperatures, write_temperatures
from trinityx_ds.eval.runner import main as eval_main
from trinityx_ds.train.tiny_run import write_config, write_random_experts

WORKERS = Path(__file__).parent / "workers"
DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalrun")
    cfg = write_config(root, **{"data.heldout_fraction": 0.5})
    write_random_experts(cfg)
    run_dist(WORKERS / "train_worker.py", 2, "cli", str(cfg), "router")
    return root


def _numbers(report: dict) -> dict:
    s = report["suites"]
    r = s["routing"]
    return {"tqa": s["truthfulqa_mc"], "hh": s["hh_preference"], "gen": s["generate"],
            "routing": {k: r[k] for k in ("routed", "before", "after", "temperature", "per_layer",
                                          "top1_share_by_layer")}}


def test_suites_on_real_samples_dp2_equals_dp1_and_temperature_written(trained, tmp_path):
    if not DATA.is_dir():
        pytest.skip(f"real data samples absent: {DATA} (the shared/ folder beside the project)")
    run = trained / "out"
    args = ["--checkpoint", str(run), "--suite", "truthfulqa_mc,hh_preference,routing,generate",
            "--truthfulqa", str(DATA / "truthfulqa/TruthfulQA_v1_817.csv"),
            "--hh", str(DATA / "hh_rlhf/harmless-base-test.jsonl.gz"),
            "--prompts", f"alpaca={DATA / 'alpaca/alpaca_200_first.json'}",
            "--prompts", f"beavertails={DATA / 'beavertails/artkit_beavertails_sample.csv'}",
            "--limit", "16", "--batch-size", "4", "--max-new-tokens", "4"]
    router = run / "stage2" / "router.safetensors"
    trained_router = load_file(router)
    run_dist(WORKERS / "eval_worker.py", 1, "cli", json.dumps(args + ["--out", str(tmp_path / "dp1")]))
    assert eval_main(args + ["--out", str(tmp_path / "dp2"), "--nproc", "2", "--write-temperature"]) == 0

    one, two = (json.loads((tmp_path / d / "report.json").read_text()) for d in ("dp1", "dp2"))
    assert (one["dp"], two["dp"], two["world_size"]) == (1, 2, 2)
    assert _numbers(one) == _numbers(two)  # exact: same batches, same padding, whatever the layout
    assert (tmp_path / "dp1/generations.jsonl").read_text() == (tmp_path / "dp2/generations.jsonl").read_text()
    for name in ("report.md", "reliability.png", "routing_share.png", "truthfulqa_mc.jsonl", "hh_preference.jsonl"):
        assert (tmp_path / "dp2" / name).stat().st_size > 0, name

    s = two["suites"]
    assert s["truthfulqa_mc"]["n"] == 16 and 0 <= s["truthfulqa_mc"]["mc1"] <= 1 and 0 < s["truthfulqa_mc"]["mc2"] < 1
    hh = s["hh_preference"]["harmless"]
    assert hh["n"] == 16 and 0 <= hh["accuracy"] <= 1 and math.isfinite(hh["mean_margin"])
    assert s["generate"]["n"] == 32
    r = s["routing"]
    assert r["n"] == 24 and r["n_val"] + r["n_test"] == 24  # 8 held-out rows per task
    assert 0 <= r["after"]["ece"] <= 1 and r["after"]["nll"] <= r["before"]["nll"] + 0.05
    assert r["temperature"]["current"] == pytest.approx([0.7, 0.7])

    # write-back: every layer holds the fitted global T; the backup is the file as trained
    t = r["temperature"]["global"]
    assert read_temperatures(router) == pytest.approx({0: t, 1: t})
    backup = load_file(r["written"]["backup"])
    assert backup.keys() == trained_router.keys() and all((backup[k] == v).all() for k, v in trained_router.items())


def test_models_match_transformers_and_reread_temperature(trained, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained / "out", run)  # a moved run still finds its experts and router
    write_temperatures(run / "stage2" / "router.safetensors", {0: 1.7, 1: 2.5})
    res = run_dist(WORKERS / "eval_worker.py", 1, "checks", str(run), str(trained / "model"))
    assert res["ours"] == pytest.approx(res["ref"], abs=1e-4)
    assert res["single"] == pytest.approx(res["ours"][1], abs=1e-5)  # alone vs in a padded batch
    assert res["gen_ours"] == res["gen_ref"] and all(res["gen_ours"])
    assert res["run_backbone"] == pytest.approx(res["ours"], abs=1e-9)
    assert res["temperatures"] == pytest.approx([1.7, 2.5])
    v = res["variants"]
    assert v["uniform"]["router"] == [[1.0, 0.0, [0.0] * 3, 3]] * 2  # T, |weight|, log-priors, top-k
    t, weight, _, top_k = v["h3fusion"]["router"][0]
    assert t == 1.0 and weight > 0 and top_k == 2  # the trained gate, uncalibrated
    assert v["expert:help"]["router"] == [[0.7, 0.0, [0.0], 1]] * 2  # one expert, its router unused
    for name, got in v.items():  # the experts are non-zero deltas: every variant moves the scores
        assert all(math.isfinite(x) for x in got["ll"]) and got["ll"] != pytest.approx(res["ours"], abs=1e-3), name


# ---------------------------------------------------------------- lm-evaluation-harness (eval/harness.py)
FIXTURE_TQA = Path(__file__).resolve().parents[2] / "trinityx_ds" / "fixtures" / "data" / "truthfulqa_tiny.jsonl"
TEXT = ("The quick brown fox jumps over the lazy dog. Give three tips for staying healthy: eat well, sleep, "
        "and walk every day. What is the capital of France? Paris is the capital of France, and it is "
        "known for the Eiffel Tower, museums and cafes. Name a colour: blue, green or red. ") * 2


def _local_tasks(folder: Path) -> list[str]:
    """Three lm-eval tasks on local JSON files, one per request type (a multiple-choice item with an
    empty context takes lm-eval's BOS-prefix path; the text spans several 64-token rolling windows)."""
    import yaml

    folder.mkdir(parents=True, exist_ok=True)
    docs = {"mc": [{"q": "Q: What colour is the sky?\nA:", "choices": ["Blue", "Green", "It is red at noon"], "gold": 0},
                   {"q": "Give three tips for staying healthy.", "choices": ["Eat well.", "Never sleep."], "gold": 0},
                   {"q": "", "choices": ["Paris is the capital of France.", "Fish"], "gold": 1}],
            "ppl": [{"text": TEXT}, {"text": "Hello world."}],
            "gen": [{"q": "Q: Name a colour.\nA:", "a": "Blue"}, {"q": "What is 2 + 2?", "a": "4"}]}
    specs = {"mc": {"output_type": "multiple_choice", "doc_to_text": "{{q}}", "doc_to_choice": "{{choices}}",
                    "doc_to_target": "{{gold}}", "metric_list": [{"metric": "acc"}]},
             "ppl": {"output_type": "loglikelihood_rolling", "doc_to_text": "", "doc_to_target": "{{text}}",
                     "metric_list": [{"metric": "word_perplexity"}]},
             "gen": {"output_type": "generate_until", "doc_to_text": "{{q}}", "doc_to_target": "{{a}}",
                     "generation_kwargs": {"until": ["\n\n"], "max_gen_toks": 6, "do_sample": False},
                     "metric_list": [{"metric": "exact_match"}]}}
    for name, rows in docs.items():
        data = folder / f"{name}.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        task = {"task": f"tx_{name}", "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
                "test_split": "test", "metadata": {"version": 1.0}, **specs[name]}
        (folder / f"tx_{name}.yaml").write_text(yaml.safe_dump(task))
    return [f"tx_{name}" for name in docs]


@pytest.fixture(scope="module")
def lm_eval_runs(trained, tmp_path_factory):
    """The trained run through lm-eval at TP=2 with our backend, and its HF export with lm-eval's `hf`."""
    from trinityx_ds.convert.write import export_hf

    root = tmp_path_factory.mktemp("lmeval")
    tasks = ",".join(_local_tasks(root / "tasks"))
    hf = export_hf(trained / "out", root / "hf")
    with pytest.MonkeyPatch.context() as mp:  # offline; caches of this test only
        for key, value in {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_DATASETS_CACHE": root / "datasets",
                           "HF_MODULES_CACHE": root / "modules", "TOKENIZERS_PARALLELISM": "false"}.items():
            mp.setenv(key, str(value))
        worker = WORKERS / "lm_eval_worker.py"
        ours = run_dist(worker, 2, "ours", str(trained / "out"), str(root / "tasks"), tasks, str(FIXTURE_TQA))
        ref = run_dist(worker, 1, "hf", str(hf), str(root / "tasks"), tasks)
    return ours, ref


def test_lm_eval_backend_tp2_matches_hf_model_on_export(lm_eval_runs):
    ours, ref = lm_eval_runs
    assert (ours["tp"], ours["dp"]) == (2, 1)
    got, want = ours["responses"], ref["responses"]
    assert got.keys() == want.keys() == {"tx_mc", "tx_ppl", "tx_gen"}
    assert [len(d) for d in got["tx_mc"]] == [3, 2, 2] and len(got["tx_ppl"]) == 2
    for doc_got, doc_want in zip(got["tx_mc"], want["tx_mc"]):  # [ll, greedy] per choice
        assert [ll for ll, _ in doc_got] == pytest.approx([ll for ll, _ in doc_want], abs=1e-4)
        assert [g for _, g in doc_got] == [g for _, g in doc_want]
    assert [d[0] for d in got["tx_ppl"]] == pytest.approx([d[0] for d in want["tx_ppl"]], abs=1e-4)
    assert got["tx_ppl"][0][0] < got["tx_ppl"][1][0] - 100  # the long text: several windows summed
    assert got["tx_gen"] == want["tx_gen"] and all(d[0] for d in got["tx_gen"])  # greedy text, not empty


def test_truthfulqa_mc_suite_equals_lm_eval_mc1_mc2(lm_eval_runs, tmp_path):
    """Our suite's MC1/MC2 against lm-eval's own truthfulqa_mc1 / truthfulqa_mc2 tasks (their YAML,
    process_results and aggregation) fed the same items and the same per-answer log-likelihoods."""
    import lm_eval.tasks
    from lm_eval.tasks import TaskManager, get_task_dict

    from trinityx_ds.data.formats import truthfulqa_mc

    summary, lls = lm_eval_runs[0]["truthfulqa"]["summary"], lm_eval_runs[0]["truthfulqa"]["ll"]
    items, _ = truthfulqa_mc(str(FIXTURE_TQA))
    docs = []
    for it in items:
        correct = list(dict.fromkeys([it.best_answer, *it.correct]))
        incorrect = [a for a in dict.fromkeys(it.incorrect) if a not in correct]
        docs.append({"question": it.question,
                     "mc1_targets": {"choices": [it.best_answer, *incorrect], "labels": [1] + [0] * len(incorrect)},
                     "mc2_targets": {"choices": correct + incorrect, "labels": [1] * len(correct) + [0] * len(incorrect)}})
    data = tmp_path / "tqa.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    for n in (1, 2):  # the stock task over the local file
        (tmp_path / f"tx_tqa_mc{n}.yaml").write_text(json.dumps({
            "include": str(Path(lm_eval.tasks.__file__).parent / "truthfulqa" / f"truthfulqa_mc{n}.yaml"), "task": f"tx_tqa_mc{n}",
            "tag": [], "dataset_path": "json", "dataset_name": None,
            "dataset_kwargs": {"data_files": {"validation": str(data)}}}))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_DATASETS_OFFLINE", "1")
        mp.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
        tasks = get_task_dict(["tx_tqa_mc1", "tx_tqa_mc2"], TaskManager(include_path=str(tmp_path),
                                                                         include_defaults=False))
    oracle = {}
    for n in (1, 2):
        task = tasks[f"tx_tqa_mc{n}"]
        per_doc = [task.process_results(doc, [(ll[c], False) for c in task.doc_to_choice(doc)])["acc"]
                   for doc, ll in zip(task.validation_docs(), lls)]
        oracle[f"mc{n}"] = task.aggregation()["acc"](per_doc)
    assert summary["n"] == len(docs) == 16
    assert summary["mc1"] == oracle["mc1"] and summary["mc2"] == pytest.approx(oracle["mc2"], abs=1e-9)
    assert 0 < summary["mc2"] < 1
