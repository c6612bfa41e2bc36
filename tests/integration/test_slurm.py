"""`mesh slurm submit | status` against a real local SLURM cluster (slurm/local_cluster.sh).

One 2-rank CPU run (gloo) trains to completion; a second, identical one is sent SIGUSR1 through
the batch shell mid-run (`scancel -s USR1 -b`), requeues itself and resumes; a third runs as a
chain of array tasks, each stopped by train.max_minutes (the project's time limit). Both must
reproduce the first run's per-step losses exactly. The two signalled/chained jobs overlap the
others: a requeued job waits 45-75 s before SLURM starts it again.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from slurm.status import run_status
from tests.support.harness import CONFIG, REPO, data_overrides, launch_env
from tests.support.slurm_cluster import metrics_losses, wait_for_job, wait_until

pytestmark = pytest.mark.slow

STEPS = 60
# the TINY model of the other integration tests, 2 ranks (DP=2) on one CPU core each
RUN = ["model.hidden_size=64", "model.num_attention_heads=4", "model.seq_length=32", f"train.steps={STEPS}",
       "train.micro_batch_size=2", "train.global_batch_size=8", "optim.eps=1e-5", "train.log_interval=1",
       "train.eval_interval=20", "train.eval_batches=2", "train.device=cpu", "logging.wandb_mode=disabled",
       "logging.progress_bar=false"]
CPU_RANKS = ["--gpus-per-node", "0", "--procs-per-node", "2", "--cpus-per-task", "1"]
REQUEUE_TIMEOUT = 240  # the hold-off alone is 45-75 s


def mesh(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "mesh_cli", *args], cwd=REPO, env=launch_env(),
                          capture_output=True, text=True, timeout=120)
    if check:
        assert done.returncode == 0, done.stderr
    return done


def submit(run_dir: Path, data: Path, *extra: str) -> str:
    done = mesh("slurm", "submit", str(CONFIG), *RUN, *data_overrides(data),
                f"data.valid=[{data / 'val_text_document'}]", "--run-dir", str(run_dir), *CPU_RANKS, *extra)
    return done.stdout.split("submitted job ")[1].split(":")[0]


def job_log(run_dir: Path, job_id: str) -> str:
    return (run_dir / "slurm" / f"job-{job_id}.log").read_text()


@pytest.fixture(scope="module")
def jobs(slurm_cluster, demo_data, tmp_path_factory):
    """The reference run and the one to preempt, submitted together; the second is sent SIGUSR1
    (batch shell only) once it has trained a few steps, and left to requeue in the background."""
    root = tmp_path_factory.mktemp("slurm")
    reference = (root / "reference", submit(root / "reference", demo_data))
    preempted = (root / "preempted", submit(root / "preempted", demo_data))
    metrics = preempted[0] / "metrics.jsonl"
    wait_until(lambda: metrics.exists() and any('"train/loss"' in l and json.loads(l)["step"] >= 2
                                                for l in metrics.read_text().splitlines()),
               timeout=180, what="the run to be preempted to train 2 steps")
    running = run_status(preempted[0])  # in-process: the run must still be training when the signal comes
    subprocess.run(["scancel", "-s", "USR1", "-b", preempted[1]], check=True)
    assert running.state == "RUNNING" and running.job_id == preempted[1], running
    assert running.step >= 2 and running.total_steps == STEPS and running.tokens_per_s > 0
    assert running.eta_seconds is not None and running.eta_seconds > 0
    # a second job in a run directory whose job is still queued or running is refused
    twice = mesh("slurm", "submit", str(CONFIG), *RUN, *data_overrides(demo_data),
                 f"data.valid=[{demo_data / 'val_text_document'}]", "--run-dir", str(preempted[0]),
                 *CPU_RANKS, check=False)
    assert twice.returncode == 2 and f"already has job {preempted[1]} queued or running" in twice.stderr, twice.stderr
    return {"reference": reference, "preempted": preempted, "root": root, "data": demo_data}


def test_two_rank_job_runs_to_completion_and_status_reports_it(jobs):
    run_dir, job_id = jobs["reference"]
    tasks = wait_for_job(job_id, timeout=180, log=run_dir / "slurm" / f"job-{job_id}.log")
    assert tasks[0]["JobState"] == "COMPLETED", job_log(run_dir, job_id)
    summary = json.loads((run_dir / "COMPLETE").read_text())
    assert summary["step"] == STEPS and summary["valid_loss"] > 0
    assert Path(summary["checkpoint"]).is_dir()
    assert sorted(metrics_losses(run_dir)) == list(range(1, STEPS + 1))
    assert (run_dir / "slurm" / "job-1.sbatch").exists() and (run_dir / "slurm" / "config-1.yaml").exists()
    assert "world 2 = TP 1 x PP 1 x DP 2" in job_log(run_dir, job_id)

    status = mesh("slurm", "status", str(run_dir)).stdout
    assert f"job        {job_id}  COMPLETED" in status
    assert f"step       {STEPS}/{STEPS}" in status and "ETA        done" in status
    assert f"validation {summary['valid_loss']:.4f}" in status

    # a finished run is not submitted again
    again = mesh("slurm", "submit", str(CONFIG), *RUN, *data_overrides(jobs["data"]), "--run-dir", str(run_dir),
                 *CPU_RANKS)
    assert "already complete" in again.stdout and "submitted job" not in again.stdout
    assert not (run_dir / "slurm" / "job-2.sbatch").exists()


def test_array_chain_continues_through_time_limits(jobs):
    """--array=1-3%1 with each task stopped by train.max_minutes at half the reference run's own
    training time: the next task resumes, the last one finishes or finds COMPLETE."""
    reference_dir, reference_id = jobs["reference"]
    wait_for_job(reference_id, timeout=180)
    seconds = json.loads((reference_dir / "COMPLETE").read_text())["segment_seconds"]
    run_dir = jobs["root"] / "chained"
    array_id = submit(run_dir, jobs["data"], "--array", "1-3%1", f"train.max_minutes={0.5 * seconds / 60:.5f}")
    tasks = wait_for_job(array_id, timeout=300, log=run_dir / "slurm" / f"job-{array_id}.log")
    log = job_log(run_dir, array_id)
    assert [t["JobState"] for t in tasks] == ["COMPLETED"] * 3, log
    assert log.count("mesh-slurm: segment start") == 3
    assert "interrupted; the next array task continues" in log
    rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("event") == "resumed" for r in rows)
    assert json.loads((run_dir / "COMPLETE").read_text())["step"] == STEPS
    assert metrics_losses(run_dir) == metrics_losses(reference_dir)


def test_usr1_saves_requeues_resumes_and_matches_an_uninterrupted_run(jobs):
    run_dir, job_id = jobs["preempted"]
    reference_dir, _ = jobs["reference"]
    tasks = wait_for_job(job_id, timeout=REQUEUE_TIMEOUT, log=run_dir / "slurm" / f"job-{job_id}.log")
    log = job_log(run_dir, job_id)
    assert tasks[0]["JobState"] == "COMPLETED" and tasks[0]["Restarts"] == "1", log
    # one log, both segments (appended across the requeue)
    assert "restart=0" in log and "restart=1" in log
    assert "SIGUSR1" in log and f"interrupted with a checkpoint saved: requeue {job_id}" in log
    rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    resumed = [r for r in rows if r.get("event") == "resumed"]
    assert len(resumed) == 1 and 2 <= resumed[0]["step"] < STEPS
    assert metrics_losses(run_dir) == metrics_losses(reference_dir)
    status = mesh("slurm", "status", str(run_dir)).stdout
    assert "restarts   1" in status and f"step       {STEPS}/{STEPS}" in status
