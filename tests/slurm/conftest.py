"""The Slurm tests' cluster: tools/slurm_lab's two nodes, stood up once per session and torn down
in a finalizer even when tests fail. Without root or the Slurm packages the cluster tests skip
(naming the reason), unless TRINITYX_REQUIRE_SLURM=1 (CI), where they fail instead."""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LAB_TOOLS = ROOT / "tools" / "slurm_lab"
NEEDED = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "nsenter", "unshare", "ip")
REQUIRE_ENV = "TRINITYX_REQUIRE_SLURM"
FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


def pytest_configure(config):
    config.addinivalue_line("markers", "slurm: runs jobs on the local two-node Slurm cluster (root)")


def unavailable() -> str | None:
    if os.geteuid() != 0:
        return "Slurm lab needs root (network namespaces, munged, slurmd)"
    missing = [b for b in NEEDED if shutil.which(b) is None]
    if missing:
        return f"Slurm packages missing ({', '.join(missing)}): run tools/slurm_lab/install.sh as root"
    return None


def slurm_cli() -> list[str]:
    """`trinityx slurm` once the CLI wires it in, else the module's own entry (the same parser)."""
    from trinityx_ds.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    module = "trinityx_ds.cli" if "slurm" in sub.choices else "trinityx_ds.launch.slurm"
    return [sys.executable, "-m", module] + (["slurm"] if module == "trinityx_ds.cli" else [])


@dataclass
class Lab:
    dir: Path
    env: dict  # PATH with the lab's sbatch/squeue/... wrappers, SLURM_CONF

    def run(self, *cmd: str, check: bool = True, cwd: Path | None = None, timeout: float = 60):
        proc = subprocess.run(list(cmd), env=self.env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            pytest.fail(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}", pytrace=False)
        return proc

    def jobs(self, job_id: str) -> list[dict]:
        """`scontrol show job -o` as dicts: one per job, or per task of an array."""
        out = self.run("scontrol", "show", "job", "-o", job_id).stdout
        return [dict(re.findall(r"(\w+)=(\S*)", line)) for line in out.splitlines() if line.strip()]

    def wait(self, job_id: str, timeout: float, logs: Path | None = None) -> list[dict]:
        """Until every task of `job_id` ended; fails with the job's log tails after `timeout`."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            jobs = self.jobs(job_id)
            if jobs and all(j["JobState"] in FINAL for j in jobs):
                return jobs
            time.sleep(0.5)
        pytest.fail(f"job {job_id} not done after {timeout:.0f}s: {[j['JobState'] for j in self.jobs(job_id)]}\n"
                    + log_tails(logs), pytrace=False)

    def submit(self, *args: str, cwd: Path) -> subprocess.CompletedProcess:
        return self.run(*slurm_cli(), "submit", *args, check=False, cwd=cwd, timeout=120)


def log_tails(folder: Path | None, lines: int = 30) -> str:
    if folder is None or not folder.is_dir():
        return ""
    out = []
    for f in sorted(folder.glob("*")):
        text = f.read_text(errors="replace").replace("\r", "\n").splitlines()
        out.append(f"--- {f.name}\n" + "\n".join(text[-lines:]))
    return "\n".join(out)


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
