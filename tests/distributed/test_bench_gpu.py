"""tools/bench_gpu.py on CPU (tiny model): the three training variants run through the project's
own stack, train what each stage trains, and report ratios to the plain backbone."""
import json
import subprocess
import sys

import pytest

from tests.dist import ROOT

pytestmark = pytest.mark.distributed


def test_bench_gpu_cpu_smoke(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "tools/bench_gpu.py", "--device", "cpu", "--tiny", "--warmup", "0",
                           "--steps", "1", "--peak-tflops", "1.0", "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(out.read_text())["variants"]
    assert rows["a"]["trainable"] == rows["a"]["params"] == 202_176  # every backbone parameter
    assert rows["b"]["trainable"] == 2 * 3 * 8 * (64 + 128)  # one LoRA expert: 2 layers x 3 targets x r (H + F)
    assert rows["c"]["trainable"] == 2 * 3 * 64  # the routers
    for r in rows.values():
        assert 0 < r["tokens_per_s"] and 0 < r["mfu"] == pytest.approx(r["tflops"] / 1.0) and 6 < r["loss"] < 8
    assert "target (b) within 10% of (a)" in proc.stdout and "(a) backbone, all trainable" in proc.stdout
