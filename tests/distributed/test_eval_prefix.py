"""The held-out benchmark's shared prefix (eval/prefix.py): five variants of a run whose experts sit
in the top two of four layers, evaluated with the backbone's lower layers computed once per batch
and again without, DP=2: every per-item figure and the routing report are equal, and the variants
after the first were served from the cache."""
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tests.dist import run_dist
from trinityx_ds.model.tiny import make_tiny_model
from trinityx_ds.train.tiny_run import FIXTURES, write_config, write_random_experts

WORKER = Path(__file__).parent / "workers" / "eval_prefix_worker.py"
VARIANTS = ["backbone", "expert:help", "uniform", "h3fusion", "trinityx"]
pytestmark = pytest.mark.distributed


def test_shared_prefix_gives_the_same_figures_for_every_variant(tmp_path):
    model = make_tiny_model(tmp_path / "model", num_hidden_layers=4)
    cfg = write_config(tmp_path, model, **{"experts.layers": [2, 3], "router.top_k": 1})
    write_random_experts(cfg)
    run = tmp_path / "out"
    (run / "config.yaml").write_text(cfg.read_text())  # where an evaluation finds the run's config
    g = torch.Generator().manual_seed(5)
    router = {}
    for i in (2, 3):
        pre = f"model.layers.{i}.mlp.router."
        router.update({pre + "weight": torch.randn(3, 64, generator=g), pre + "log_temperature": torch.tensor([math.log(0.7)]),
                       pre + "log_importance": torch.tensor([4.0, 1.0, 1.0]).log()})
    (run / "stage2").mkdir(parents=True)
    save_file(router, str(run / "stage2" / "router.safetensors"))
    results = {}
    for share in (True, False):
        out = tmp_path / f"eval_{share}"
        opts = {"run": str(run), "out": str(out), "variants": VARIANTS, "tp": 1, "max_seq_len": 64, "batch": 4,
                "tqa": str(FIXTURES / "truthfulqa_heldout_tiny.jsonl"), "hh": str(FIXTURES / "hh_rlhf_heldout_tiny.jsonl"),
                "alpaca": str(FIXTURES / "alpaca_heldout_tiny.jsonl"), "routing": True, "share_prefix": share}
        run_dist(WORKER, 2, json.dumps(opts), timeout=600)
        results[share] = {v: json.loads((out / f"{v.replace(':', '-')}.json").read_text()) for v in VARIANTS}
    for v in VARIANTS:
        on, off = results[True][v], results[False][v]
        assert "prefix" not in off
        stats = on.pop("prefix")
        for r in (on, off):
            r.pop("seconds")
        assert on["tqa_items"] and on["hh_items"] and on["help_items"]
        assert on == off, v  # every per-item log-likelihood and the routing report, bit for bit
        assert stats["layer"] == 2
        if v == "backbone":
            assert stats["hits"] == 0 and stats["misses"] > 0
        elif v in ("expert:help", "h3fusion", "trinityx"):
            assert stats["hits"] > 0 and stats["misses"] == 0, (v, stats)  # the same batches as the backbone's
        else:  # uniform: the first to run the routing suite, whose batches it adds
            assert stats["hits"] > 0 and stats["misses"] > 0, (v, stats)
    # the experts change the figures: equal results are not equal because nothing was applied
    assert results[True]["trinityx"]["help_items"] != results[True]["backbone"]["help_items"]
