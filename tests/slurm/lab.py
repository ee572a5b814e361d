"""Helpers for the Slurm tests: is the lab possible here, the `trinityx slurm` command line, and
`Lab`, the handle on a running lab cluster (commands run through its wrappers)."""
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
FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


def unavailable() -> str | None:
    if os.geteuid() != 0:
        return "Slurm lab needs root (network namespaces, munged, slurmd)"
    missing = [b for b in NEEDED if shutil.which(b) is None]
    if missing:
        return f"Slurm packages missing ({', '.join(missing)}): run tools/slurm_lab/install.sh as root"
    return None


def cli_commands() -> set[str]:
    from trinityx_ds.cli import build_parser

    return set(next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices)


def slurm_cli() -> list[str]:
    """`trinityx slurm` once the CLI wires it in, else the module's own entry (the same parser)."""
    if "slurm" in cli_commands():
        return [sys.executable, "-m", "trinityx_ds.cli", "slurm"]
    return [sys.executable, "-m", "trinityx_ds.launch.slurm"]


@dataclass
class Lab:
    dir: Path
    env: dict  # PATH with the lab's sbatch/squeue/... wrappers, SLURM_CONF

    def run(self, *cmd: str, check: bool = True, cwd: Path | None = None, timeout: float = 60, tries: int = 1):
        """`cmd` with the lab's wrappers; `tries` > 1 retries a failure (on a loaded machine a
        client call now and then dies of SIGPIPE or a timeout when slurmctld is slow)."""
        for attempt in range(tries):
            proc = subprocess.run(list(cmd), env=self.env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
            if proc.returncode == 0 or attempt == tries - 1:
                break
            time.sleep(1)
        if check and proc.returncode != 0:
            pytest.fail(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}", pytrace=False)
        return proc

    def jobs(self, job_id: str) -> list[dict]:
        """`scontrol show job -o` as dicts: one per job, or per task of an array."""
        out = self.run("scontrol", "show", "job", "-o", job_id, tries=10).stdout
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
