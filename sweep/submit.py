"""`mesh sweep submit | status`: a sweep as one SLURM job array, one task per unfinished run.

    <root>/slurm/sweep-N.sbatch     the batch script of submission N (a table of every run;
                                    array task i trains run i)
    <root>/slurm/array-ID_I.log     SLURM's log of task I until it switches to its run's own log
    <root>/slurm/jobs.jsonl         one row per submission: array id, the run indices, time
    <run>/slurm/config-K.yaml       the resolved config each task trains (resume=auto)
    <run>/slurm/job-ID_I.log        the run's log, appended across requeues
    <run>/slurm/jobs.jsonl          the run's submissions ("ID_I"), read by `mesh slurm status`

A run with COMPLETE is left out, so submitting again continues a partial sweep (unfinished runs
resume from their newest checkpoint) and a finished sweep submits nothing. Every run's layout and
memory are checked against the resources before anything is written or submitted.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Optional

from mesh_cli.errors import CLIError
from mesh_model.config import ConfigError

# flag dest -> SlurmResources field, for the flags that override a sweep file's `slurm:` section
FLAG_FIELDS = {"nodes": "nodes", "gpus_per_node": "gpus_per_node", "procs_per_node": "procs_per_node",
               "cpus_per_task": "cpus_per_task", "partition": "partition", "account": "account", "qos": "qos",
               "time": "time", "constraint": "constraint", "exclusive": "exclusive", "mem": "mem",
               "sbatch": "sbatch", "signal": "signal_seconds", "requeue": "requeue",
               "gpu_memory": "gpu_memory_gb", "job_name": "job_name"}


def index_ranges(indices: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> "0-2,5,7-8" (SLURM's --array form)."""
    parts, start = [], None
    for i, value in enumerate(indices):
        if start is None:
            start = value
        if i + 1 == len(indices) or indices[i + 1] != value + 1:
            parts.append(str(start) if start == value else f"{start}-{value}")
            start = None
    return ",".join(parts)


def sweep_resources(sweep, flags: dict):
    """The sweep file's `slurm:` section, with the command line's flags over it."""
    from slurm.resources import SlurmResources

    section = dict(sweep.slurm or {})
    if "array" in section:
        raise ConfigError(f"{sweep.path}: slurm.array is not for sweeps: the sweep is one array over its runs "
                          "(use --max-parallel to limit how many run at once)")
    section.update({FLAG_FIELDS[k]: v for k, v in flags.items()})
    try:
        return SlurmResources.from_mapping(section, where="slurm")
    except ConfigError as err:
        raise ConfigError(f"{sweep.path}: {err}") from None


def unfinished(sweep) -> list[int]:
    from pretrain.run_folder import RunFolder

    return [i for i, run in enumerate(sweep.runs) if RunFolder(run.run_dir).completion() is None]


def _sweep_jobs_file(sweep) -> Path:
    return Path(sweep.root) / "slurm" / "jobs.jsonl"


def active_sweep_jobs(sweep) -> list[str]:
    from slurm import scheduler

    path = _sweep_jobs_file(sweep)
    if not path.exists():
        return []
    ids = [str(json.loads(l)["job_id"]) for l in path.read_text().splitlines() if l.strip()]
    return scheduler.queued_job_ids(ids[-3:])  # only the newest submissions can still be queued


def submit_sweep(sweep, resources, *, max_parallel: Optional[int] = None, dry_run: bool = False,
                 out=None) -> Optional[str]:
    """The array's job id, or None (a dry run, or nothing left to train)."""
    out = out or sys.stdout
    from slurm import scheduler
    from slurm.batch_script import BatchJob, render
    from slurm.submit import (JOB_FILES, _check_data, check_layout, job_config, memory_check, next_number,
                              record_submission)

    if max_parallel is not None and max_parallel < 1:
        raise CLIError(f"--max-parallel={max_parallel} must be >= 1")
    for run in sweep.runs:  # every run must fit before any is submitted
        try:
            check_layout(run.config, resources)
            if resources.gpus_per_node:
                memory_check(run.config, resources)
        except ConfigError as err:
            raise ConfigError(f"run {run.run_id}: {err}") from None
    todo = unfinished(sweep)
    if not todo:
        print(f"all {len(sweep.runs)} runs of sweep {sweep.name} are complete; nothing to submit", file=out)
        return None
    busy = active_sweep_jobs(sweep)
    if busy:
        raise CLIError(f"sweep {sweep.name} already has job {busy[-1]} queued or running; wait for it, or "
                       f"`scancel {busy[-1]}` first")
    root = Path(sweep.root).resolve()
    configs, config_files = [], []
    for i, run in enumerate(sweep.runs):
        run_dir = Path(run.run_dir).resolve()
        configs.append(job_config(run.config, run_dir))
        number = next_number(run_dir / JOB_FILES) if i in todo else 0
        config_files.append(run_dir / JOB_FILES / f"config-{number}.yaml")
    array = index_ranges(todo) + (f"%{max_parallel}" if max_parallel else "")
    number = max([int(p.stem.split("-")[1]) for p in (root / "slurm").glob("sweep-*.sbatch")
                  if p.stem.split("-")[1].isdigit()], default=0) + 1
    job = BatchJob(resources=resources, run_dirs=[Path(r.run_dir).resolve() for r in sweep.runs],
                   config_files=config_files, python=sys.executable, workdir=Path.cwd(),
                   output=root / "slurm" / "array-%A_%a.log", sweep_array=array, name=f"sweep-{sweep.name}")
    script_text = render(job)
    if dry_run:
        print(script_text, file=out)
        print(f"# {len(todo)} of {len(sweep.runs)} runs to train: array {array}", file=out)
        return None
    for i in todo:
        _check_data(sweep.runs[i].config)
    script = root / "slurm" / f"sweep-{number}.sbatch"
    script.parent.mkdir(parents=True, exist_ok=True)
    for i in todo:
        config_files[i].parent.mkdir(parents=True, exist_ok=True)
        configs[i].save(config_files[i])
    script.write_text(script_text)
    job_id = scheduler.sbatch(script)
    with open(_sweep_jobs_file(sweep), "a") as rows:
        rows.write(json.dumps({"job_id": job_id, "script": str(script), "runs": todo, "array": array,
                               "submitted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}) + "\n")
    for i in todo:
        record_submission(Path(sweep.runs[i].run_dir).resolve(), f"{job_id}_{i}", script, array)
    skipped = len(sweep.runs) - len(todo)
    print(f"submitted array {job_id} ({array}): {len(todo)} run(s) to train"
          + (f", {skipped} already complete" if skipped else "") + f"; `mesh sweep status {sweep.path}`", file=out)
    return job_id


def status_table(sweep) -> str:
    from slurm.status import _duration, _num, run_status

    header = ("run_id", "job", "state", "step", "loss", "valid", "tokens/s", "restarts", "ETA")
    rows, counts = [], {}
    for run in sweep.runs:
        s = run_status(run.run_dir)
        counts[s.state] = counts.get(s.state, 0) + 1
        step = f"{s.step}/{s.total_steps or run.steps}" if s.step is not None else f"-/{run.steps}"
        rows.append((run.run_id, s.job_id or "-", s.state, step, _num(s.loss), _num(s.valid_loss),
                     _num(s.tokens_per_s, "{:,.0f}"), str(s.restarts), "done" if s.complete else _duration(s.eta_seconds)))
    widths = [max(len(r[c]) for r in [header, *rows]) for c in range(len(header))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in [header, *rows]]
    complete = sum(1 for run in sweep.runs if (Path(run.run_dir) / "COMPLETE").exists())
    lines.append(f"{complete}/{len(sweep.runs)} runs complete; "
                 + ", ".join(f"{n} {state}" for state, n in sorted(counts.items())))
    return "\n".join(lines)


def _submit(args: argparse.Namespace) -> int:
    from sweep.spec import load_sweep

    sweep = load_sweep(args.sweep, root=args.root)
    flags = {k: getattr(args, k) for k in FLAG_FIELDS if hasattr(args, k)}
    resources = sweep_resources(sweep, flags)
    submit_sweep(sweep, resources, max_parallel=args.max_parallel, dry_run=args.dry_run)
    return 0


def _status(args: argparse.Namespace) -> int:
    from sweep.spec import load_sweep

    print(status_table(load_sweep(args.sweep, root=args.root)))
    return 0


def add_sweep_commands(commands) -> None:
    """`mesh sweep submit` and `mesh sweep status` (listed in sweep/cli.py's EXTENSIONS)."""
    from slurm.cli import add_resource_flags

    submit = commands.add_parser(
        "submit", help="launch the sweep's unfinished runs as one SLURM job array",
        description=(
            "One array task per run that has no COMPLETE marker: submitting again continues a partial sweep "
            "(unfinished runs resume from their checkpoints), a finished sweep submits nothing, and a run whose "
            "folder was deleted is trained again. Resources come from the sweep file's slurm: section; the "
            "flags below replace single fields of it. Every run's layout and memory estimate are checked first."),
    )
    submit.add_argument("sweep", metavar="SWEEP.yaml", help="the sweep file")
    add_resource_flags(submit, suppress_defaults=True)
    submit.add_argument("--max-parallel", type=int, default=None, metavar="K",
                        help="run at most K array tasks at once (--array=...%%K)")
    submit.add_argument("--root", default=None, help="replace the sweep file's root (where the run folders are)")
    submit.add_argument("--dry-run", action="store_true", help="print the batch script and the runs; submit nothing")
    submit.set_defaults(func=_submit)

    status = commands.add_parser(
        "status", help="one line per run: job, state, step, loss, tokens/s, restarts, ETA",
        description="Reads every run folder of the sweep and the scheduler (squeue / scontrol).")
    status.add_argument("sweep", metavar="SWEEP.yaml", help="the sweep file")
    status.add_argument("--root", default=None, help="replace the sweep file's root (where the run folders are)")
    status.set_defaults(func=_status)
