"""The real local SLURM cluster for the tests (slurm/local_cluster.sh), and waiting on its jobs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.support.harness import REPO

CLUSTER_SCRIPT = REPO / "slurm" / "local_cluster.sh"


def _unavailable_reason() -> str | None:
    if shutil.which("sbatch") and subprocess.run(["scontrol", "ping"], capture_output=True).returncode == 0:
        return None
    if os.geteuid() != 0:
        return "the local SLURM cluster needs root to start (slurm/local_cluster.sh up)"
    if not shutil.which("sbatch") and not shutil.which("apt-get"):
        return "slurm is not installed and there is no apt-get to install it"
    return None


@pytest.fixture(scope="session")
def slurm_cluster():
    """A running single-node cluster: started (and installed) if needed, left running for the
    next session (`slurm/local_cluster.sh down` stops it). Skips with the reason where root or
    apt is missing."""
    reason = _unavailable_reason()
    if reason:
        pytest.skip(reason)
    done = subprocess.run(["bash", str(CLUSTER_SCRIPT), "up"], capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        pytest.skip(f"the local SLURM cluster did not start: {done.stderr.strip().splitlines()[-1:]}")
    return True


def job_fields(job_id: str) -> list[dict]:
    from slurm.scheduler import show_job

    return show_job(job_id)


def wait_for_job(job_id: str, timeout: float, log: Path | None = None) -> list[dict]:
    """Polls scontrol until every task of the job (or array) has ended; the tasks' fields."""
    from slurm.scheduler import ACTIVE_STATES

    deadline = time.monotonic() + timeout
    while True:
        tasks = job_fields(job_id)
        if tasks and all(t.get("JobState") not in ACTIVE_STATES for t in tasks):
            return tasks
        if time.monotonic() > deadline:
            subprocess.run(["scancel", job_id])
            text = log.read_text()[-3000:] if log and log.exists() else ""
            raise AssertionError(f"job {job_id} did not end within {timeout} s: "
                                 f"{[t.get('JobState') for t in tasks]}\n{text}")
        time.sleep(1.0)


def wait_until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.3)


def metrics_losses(run_dir: Path) -> dict[int, float]:
    """step -> train loss; a resumed segment repeats no step (a repeated one keeps the last)."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "train/loss" in row:
            out[row["step"]] = row["train/loss"]
    return out
