"""The Slurm tests' cluster: tools/slurm_lab's two nodes, stood up once per session and torn down
in a finalizer even when tests fail. Without root or the Slurm packages the cluster tests skip
(naming the reason), unless TRINITYX_REQUIRE_SLURM=1 (CI), where they fail instead."""
import os
import subprocess

import pytest

from tests.slurm.lab import LAB_TOOLS, Lab, unavailable

REQUIRE_ENV = "TRINITYX_REQUIRE_SLURM"


def pytest_configure(config):
    config.addinivalue_line("markers", "slurm: runs jobs on the local two-node Slurm cluster (root)")


@pytest.fixture(scope="session")
def slurm_lab(tmp_path_factory):
    reason = unavailable()
    if reason:
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(f"{reason} ({REQUIRE_ENV}=1)", pytrace=False)
        pytest.skip(reason)
    lab_dir = tmp_path_factory.mktemp("slurm") / "lab"
    ns = f"txt{os.getpid() % 10000}"  # apart from a developer's lab (default prefix txlab)
    env = {**os.environ, "SLURM_LAB_DIR": str(lab_dir), "SLURM_LAB_NS": ns}
    try:
        up = subprocess.run([str(LAB_TOOLS / "up.sh")], env=env, capture_output=True, text=True, timeout=120)
        if up.returncode != 0:
            pytest.fail(f"tools/slurm_lab/up.sh failed:\n{up.stdout}\n{up.stderr}", pytrace=False)
        yield Lab(lab_dir, {**env, "SLURM_CONF": str(lab_dir / "slurm.conf"),
                            "PATH": f"{lab_dir / 'bin'}{os.pathsep}{os.environ['PATH']}"})
    finally:
        down = subprocess.run([str(LAB_TOOLS / "down.sh")], env=env, capture_output=True, text=True, timeout=120)
        left = [n for n in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
                if n.startswith(ns + "-")]
        assert down.returncode == 0 and not left and not lab_dir.exists(), \
            f"slurm lab teardown left {left or lab_dir}: {down.stdout}\n{down.stderr}"
