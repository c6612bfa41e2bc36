"""Real training processes for the integration tests: `mesh train` with fault-injection hooks
(tests/support/faults.py), started, watched and finished without ever hanging a test."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.support.harness import CONFIG, REPO, TINY, data_overrides, launch_env, tail


def train_cmd(run_dir: Path, data: Path, nproc: int, *overrides: str) -> list[str]:
    """`mesh train` of the TINY model, with the fault-injection hooks the tests switch on through
    the environment (tests/support/faults.py)."""
    return [sys.executable, "-m", "tests.support.faults", "train", "--nproc-per-node", str(nproc), str(CONFIG),
            *TINY, *data_overrides(data), f"logging.run_dir={run_dir}", *overrides]


def start(cmd: list[str], log: Path, **env: str) -> subprocess.Popen:
    out = open(log, "a")
    return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=REPO,
                            env=launch_env(**env), start_new_session=True)


def finish(proc: subprocess.Popen, log: Path, timeout: float = 240) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError(f"training did not finish within {timeout} s:\n{tail(log)}") from None


def wait_for(predicate, proc: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"training exited ({proc.returncode}) before the test could act:\n{tail(log)}")
        if time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            raise AssertionError(f"timed out waiting:\n{tail(log)}")
        time.sleep(0.2)


def logged_steps(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return 0
    return max((json.loads(l).get("step", 0) for l in path.read_text().splitlines() if "train/loss" in l), default=0)


def worker_pids(proc: subprocess.Popen) -> list[int]:
    """The training processes under `mesh train --nproc-per-node` (its torchrun's children, each
    running the fault-injection entry point `tests.support.faults`)."""
    import psutil

    launcher = psutil.Process(proc.pid)
    workers = [p for p in launcher.children(recursive=True) if "tests.support.faults" in " ".join(p.cmdline())
               and "torch.distributed.run" not in " ".join(p.cmdline())]
    return sorted(p.pid for p in workers)
