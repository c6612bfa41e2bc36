"""The few SLURM commands the launcher needs: sbatch, squeue, scontrol. No accounting
database is assumed (no sacct): a finished job is read from `scontrol show job` while the
controller still keeps it (MinJobAge), and from the run directory after that."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Optional

from mesh_cli.errors import CLIError

ACTIVE_STATES = {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED",
                 "RESIZING", "SUSPENDED", "STAGE_OUT", "SIGNALING", "PREEMPTED"}


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise CLIError(f"`{name}` is not on PATH: run this on a SLURM login node, or start the local cluster "
                       "with `slurm/local_cluster.sh up`")
    return path


def sbatch(script: Path) -> str:
    """Submits ``script``; returns the job id (for an array: the array's id)."""
    done = subprocess.run([_tool("sbatch"), "--parsable", str(script)], capture_output=True, text=True)
    if done.returncode != 0:
        message = " ".join(done.stderr.split()) or f"exit code {done.returncode}"
        raise CLIError(f"sbatch refused {script}: {message}")
    return done.stdout.strip().split(";")[0]


def show_job(job_id: str) -> list[dict[str, str]]:
    """`scontrol show job -o` as one dict per job (an array gives one per task); [] once the
    controller has forgotten the job."""
    if shutil.which("scontrol") is None:
        return []
    done = subprocess.run(["scontrol", "show", "job", "-o", str(job_id)], capture_output=True, text=True)
    if done.returncode != 0:
        return []
    return [_fields(line) for line in done.stdout.splitlines() if line.strip()]


def _fields(line: str) -> dict[str, str]:
    out, key = {}, None
    for word in line.split():
        if "=" in word:
            key, value = word.split("=", 1)
            out[key] = value
        elif key is not None:  # values with spaces (Command=..., Reason=...) continue the last key
            out[key] += " " + word
    return out


def queued_job_ids(job_ids: list[str]) -> list[str]:
    """Those of ``job_ids`` (job, array or array-task ids) still queued or running. Asked one by
    one: squeue refuses a whole list when one id is no longer known."""
    if shutil.which("squeue") is None:
        return []
    active = []
    for job_id in job_ids:
        done = subprocess.run(["squeue", "-h", "-o", "%T", "-j", str(job_id)], capture_output=True, text=True)
        if done.returncode == 0 and any(state.strip() in ACTIVE_STATES for state in done.stdout.splitlines()):
            active.append(job_id)
    return active


def job_state(job_id: str) -> Optional[str]:
    """One word for a job or array: the state, "RUNNING" if any task runs, or None if unknown."""
    jobs = show_job(job_id)
    if not jobs:
        return None
    states = [j.get("JobState", "UNKNOWN") for j in jobs]
    for state in ("RUNNING", "COMPLETING", "PENDING", "REQUEUED"):
        if state in states:
            return state
    return states[-1]
