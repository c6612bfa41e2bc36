"""`mesh slurm submit`: check a run's layout and memory against the resources, write the run
directory's job files, render the batch script and hand it to sbatch.

    RUN_DIR/slurm/
      config-N.yaml     the resolved config of submission N (resume=auto, logging.run_dir set)
      job-N.sbatch      the batch script of submission N
      job-ID.log        SLURM's log of job ID, appended across requeues (--open-mode=append)
      jobs.jsonl        one row per submission: job id, script, time, array

Nothing already in the folder is replaced: every submission numbers its own files.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from mesh_cli.errors import CLIError
from mesh_model.config import ConfigError
from pretrain.run_folder import read_jsonl
from slurm import scheduler
from slurm.batch_script import BatchJob, render
from slurm.resources import SlurmResources

JOB_FILES = "slurm"


def check_layout(config, resources: SlurmResources):
    """The ParallelPlan at nodes x ranks per node (one line naming the fields if it cannot work).
    The login node's own devices do not matter: the device rule is checked against the request."""
    from pretrain.parallel.plan import ParallelPlan

    device = config.train.device
    if resources.gpus_per_node == 0 and device == "cuda":
        raise ConfigError("train.device=cuda but --gpus-per-node 0; ask for GPUs or train with train.device=cpu")
    if resources.gpus_per_node > 0 and device == "cpu":
        raise ConfigError(f"train.device=cpu but --gpus-per-node {resources.gpus_per_node}; use train.device=cuda "
                          "or --gpus-per-node 0 --procs-per-node N")
    model_parallel = config.parallel.tensor * config.parallel.pipeline
    if resources.world_size % model_parallel:
        raise ConfigError(
            f"parallel.tensor x parallel.pipeline = {config.parallel.tensor} x {config.parallel.pipeline} = "
            f"{model_parallel} does not divide {resources.nodes} nodes x {resources.ranks_per_node} ranks per node = "
            f"{resources.world_size}; change --nodes / --gpus-per-node or the parallel layout")
    probe = dataclasses.replace(config, train=dataclasses.replace(config.train, device="auto"))
    return ParallelPlan.build(probe, resources.world_size)


def memory_check(config, resources: SlurmResources):
    """The per-GPU estimate; ConfigError with the numbers if it does not fit --gpu-memory."""
    from pretrain.memory_estimate import estimate_memory

    estimate = estimate_memory(config, resources.world_size)
    if resources.gpus_per_node and not estimate.fits(resources.gpu_bytes):
        raise ConfigError(
            f"the job needs about {estimate.total_bytes / 2**30:.1f} GiB per GPU but --gpu-memory is "
            f"{resources.gpu_memory_gb:g} GB ({resources.gpu_bytes / 2**30:.1f} GiB): raise parallel.tensor / "
            "parallel.pipeline / parallel.zero_stage, lower train.micro_batch_size, turn on model.recompute, "
            "or use more GPUs (`--dry-run` prints the table)")
    return estimate


def job_config(config, run_dir: Path):
    """The config the job trains: this run directory, and resume from it on every requeue."""
    logging_ = dataclasses.replace(config.logging, run_dir=str(run_dir))
    resume = config.checkpoint.resume if config.checkpoint.resume not in ("none",) else "auto"
    checkpoint = dataclasses.replace(config.checkpoint, resume=resume)
    return dataclasses.replace(config, logging=logging_, checkpoint=checkpoint)


def submissions(run_dir: Path) -> list[dict]:
    return read_jsonl(Path(run_dir) / JOB_FILES / "jobs.jsonl")


def check_not_queued(run_dirs: list[Path]) -> None:
    """A run directory whose earlier job still waits or runs is refused (two jobs would share it)."""
    for run_dir in run_dirs:
        ids = [str(row["job_id"]) for row in submissions(run_dir) if row.get("job_id")]
        busy = scheduler.queued_job_ids(ids[-3:])  # only the newest submissions can still be queued
        if busy:
            raise CLIError(f"{run_dir} already has job {busy[-1]} queued or running; wait for it, or "
                           f"`scancel {busy[-1]}` first")


def next_number(folder: Path) -> int:
    taken = [int(p.stem.split("-")[1]) for p in folder.glob("job-*.sbatch") if p.stem.split("-")[1].isdigit()]
    return max(taken, default=0) + 1


def record_submission(run_dir: Path, job_id: str, script: Path, array: Optional[str]) -> None:
    folder = Path(run_dir) / JOB_FILES
    with open(folder / "jobs.jsonl", "a") as out:
        out.write(json.dumps({"job_id": job_id, "script": str(script), "array": array,
                              "submitted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}) + "\n")


@dataclass
class Prepared:
    """A rendered job that has not been submitted."""

    job: BatchJob
    script_text: str
    number: int
    configs: list  # RunConfig per run


def prepare_run(config, resources: SlurmResources, run_dir: Path, env: dict[str, str]) -> Prepared:
    run_dir = Path(run_dir).resolve()
    config = job_config(config, run_dir)
    folder = run_dir / JOB_FILES
    number = next_number(folder)
    job = BatchJob(resources=resources, run_dirs=[run_dir], config_files=[folder / f"config-{number}.yaml"],
                   python=sys.executable, workdir=Path.cwd(), output=folder / "job-%A.log", env=env,
                   name=f"mesh-{run_dir.name}")
    return Prepared(job=job, script_text=render(job), number=number, configs=[config])


def write_and_submit(prepared: Prepared, script: Path, array: Optional[str]) -> str:
    """Writes each run's config, the script, submits it, records the job id in each run directory."""
    script.parent.mkdir(parents=True, exist_ok=True)
    for config, path in zip(prepared.configs, prepared.job.config_files):
        path.parent.mkdir(parents=True, exist_ok=True)
        config.save(path)
    script.write_text(prepared.script_text)
    job_id = scheduler.sbatch(script)
    for run_dir in prepared.job.run_dirs:
        record_submission(run_dir, job_id, script, array)
    return job_id


def submit_run(config, resources: SlurmResources, *, run_dir: Optional[str] = None, dry_run: bool = False,
               env: Optional[dict[str, str]] = None, out=None) -> Optional[str]:
    """`mesh slurm submit`: the job id, or None for a dry run or a run that is already complete."""
    out = out or sys.stdout
    from pretrain.run_folder import RunFolder

    run_dir = Path(run_dir or config.logging.run_dir)
    plan = check_layout(config, resources)
    # on a CPU-only cluster there is no GPU memory to check; a dry run still shows the estimate
    estimate = memory_check(config, resources) if resources.gpus_per_node or dry_run else None
    prepared = prepare_run(config, resources, run_dir, env or {})
    if dry_run:
        print(prepared.script_text, file=out)
        print(f"# layout: {plan.describe()} on {resources.nodes} node(s) x {resources.ranks_per_node} rank(s)",
              file=out)
        print(estimate.describe(), file=out)
        if resources.gpus_per_node:
            print(f"fits {resources.gpu_memory_gb:g} GB per GPU: {estimate.total_bytes / 2**30:.1f} GiB estimated",
                  file=out)
        return None
    summary = RunFolder(run_dir).completion()
    if summary is not None:
        print(f"{run_dir} is already complete (step {summary.get('step')}, validation loss "
              f"{summary.get('valid_loss')}); nothing submitted", file=out)
        return None
    _check_data(config)
    check_not_queued([run_dir.resolve()])
    folder = run_dir.resolve() / JOB_FILES
    script = folder / f"job-{prepared.number}.sbatch"
    job_id = write_and_submit(prepared, script, resources.array)
    print(f"submitted job {job_id}: {resources.nodes} node(s) x {resources.ranks_per_node} rank(s), "
          f"{plan.describe()}; run directory {run_dir}; log {folder}/job-{job_id}.log; "
          f"`mesh slurm status {run_dir}`", file=out)
    return job_id


def _check_data(config) -> None:
    """The tokenizer and data shards exist (the compute nodes see the same file system)."""
    from data_prep.errors import DataError
    from pretrain.data import check_data_prefixes

    if not Path(config.data.tokenizer).is_file():
        raise DataError(f"data.tokenizer={config.data.tokenizer} does not exist")
    check_data_prefixes(config.data)
