"""tools/bench_steps.py on the tiny Llama: every variant runs, and ours and the peers compute the
same function on the same weights and tokens (their first losses agree), so the timings compare
like with like."""
import json
import math
import subprocess
import sys

import pytest

from tests.dist import ROOT

pytestmark = pytest.mark.distributed


def test_bench_steps_compares_like_with_like(tmp_path):
    out = tmp_path / "steps.json"
    variants = "peft_sft,sft_z1,trl_dpo,dpo_z1,router,backbone"
    proc = subprocess.run([sys.executable, "tools/bench_steps.py", "--shape", "tiny-llama", "--seq", "32",
                           "--micro-batch", "2", "--rounds", "1", "--warmup", "0", "--steps", "1", "--layers", "1",
                           "--variants", variants, "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = {v: rows[0] for v, rows in json.loads(out.read_text())["results"].items()}
    assert set(res) == set(variants.split(","))
    for r in res.values():
        assert r["step_s"] > 0 and r["peak_rss_mib"] > 0 and math.isfinite(r["first_loss"])
    # the same LM loss before any update: transformers + PEFT against our megatron stage 1
    assert res["sft_z1"]["first_loss"] == pytest.approx(res["peft_sft"]["first_loss"], abs=1e-5)
    assert 6 < res["sft_z1"]["first_loss"] < 8  # ln(1001) ~ 6.9 on random weights
    # DPO with B = 0: policy == reference, loss ln 2 in both (ours with the shared reference prefix)
    assert res["trl_dpo"]["first_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert res["dpo_z1"]["first_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert "sft_z1 / peft_sft" in proc.stdout and "dpo_z1 / trl_dpo" in proc.stdout
