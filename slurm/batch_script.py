"""The sbatch script: one srun task per node, each a torchrun over that node's ranks.

The script is rendered once at submit time and kept in the run directory, so what ran is
always on disk next to its logs. It is plain bash around one `srun`:

- rendezvous: torchrun's c10d store on the first host of `scontrol show hostnames`, at a port
  derived from the job id (two jobs sharing a node never pick the same fixed port);
- a run that already has COMPLETE does nothing (a chained or resubmitted job finds it);
- SIGUSR1 (`--signal=B:USR1@S`, or `scancel -s USR1 -b`) reaches only the batch shell, which
  passes it to srun, srun to torchrun, torchrun to the ranks: they finish the step, save and
  write INTERRUPTED;
- torchrun reports a rank's exit code 75 as 1, so whether to requeue is read from the run
  directory (the INTERRUPTED marker's exit code), never from srun's status;
- in a chain (`--array=1-N%1`) an interrupted task leaves the run to the next task; the last
  one, or a job outside a chain, requeues itself with `scontrol requeue` when --requeue is on.

A sweep renders the same script over a table of runs: array task i trains run i.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from slurm.resources import SlurmResources

PORT_BASE = 10000
PORT_SPAN = 20000
"""Rendezvous port = PORT_BASE + job id mod PORT_SPAN: below Linux's ephemeral range (32768+), so
no outgoing connection of another program holds it."""

SIGNALS_TO_TORCHRUN = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
"""torchrun passes these on to its ranks instead of dying of them (SIGUSR1 kills it by default)."""


@dataclass
class BatchJob:
    """What one sbatch script runs: one run, or a sweep's table of runs (array task i = run i)."""

    resources: SlurmResources
    run_dirs: list[Path]
    config_files: list[Path]
    """The resolved config of each run (kept in its run directory)."""
    python: str
    workdir: Path
    """Where the job starts (relative paths of the config resolve from here)."""
    output: Path
    """SLURM's log file pattern (%A the job or array id, %a the array index)."""
    sweep_array: Optional[str] = None
    """The array indices of a sweep (the runs to train); None for a single run."""
    env: dict[str, str] = field(default_factory=dict)
    """Exported as given, over the defaults and the submitting shell's environment."""
    name: str = "mesh"

    @property
    def is_sweep(self) -> bool:
        return self.sweep_array is not None


def default_env(resources: SlurmResources) -> dict[str, str]:
    """Defaults a job exports unless the submitting shell (sbatch passes its environment on) or
    --env sets them."""
    threads = max(1, resources.task_cpus // resources.ranks_per_node)
    env = {"OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    if resources.gpus_per_node:
        env.update({
            "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",  # a hung collective fails the job instead of holding it
            "NCCL_DEBUG": "WARN",
            "CUDA_DEVICE_MAX_CONNECTIONS": "1",  # megatron's TP communication overlap relies on it
        })
    return env


def sbatch_directives(job: BatchJob) -> list[str]:
    r = job.resources
    lines = [f"--job-name={r.job_name or job.name}", f"--nodes={r.nodes}", "--ntasks-per-node=1",
             f"--cpus-per-task={r.task_cpus}", f"--output={job.output}", "--open-mode=append",
             f"--chdir={job.workdir}", f"--signal=B:USR1@{r.signal_seconds}",
             "--requeue" if r.requeue else "--no-requeue"]
    if r.gpus_per_node:
        lines.append(f"--gpus-per-node={r.gpus_per_node}")
    for name in ("partition", "account", "qos", "time", "constraint", "mem"):
        value = getattr(r, name)
        if value is not None:
            lines.append(f"--{name}={value}")
    if r.exclusive:
        lines.append("--exclusive")
    array = job.sweep_array if job.is_sweep else r.array
    if array:
        lines.append(f"--array={array}")
    lines.extend(s.strip() for s in r.sbatch)
    return lines


def torchrun_command(job: BatchJob) -> list[str]:
    """The command each node's srun task runs (variables expanded by the batch shell)."""
    r = job.resources
    return [job.python, "-m", "torch.distributed.run", f"--nnodes={r.nodes}",
            f"--nproc-per-node={r.ranks_per_node}", "--rdzv-backend=c10d",
            "--rdzv-endpoint=$MASTER_ADDR:$MASTER_PORT", "--rdzv-id=$SLURM_JOB_ID", "--max-restarts=0",
            f"--signals-to-handle={SIGNALS_TO_TORCHRUN}", "-m", "pretrain", "$CONFIG"]


def srun_command(job: BatchJob) -> list[str]:
    r = job.resources
    return ["srun", f"--nodes={r.nodes}", f"--ntasks={r.nodes}", "--ntasks-per-node=1",
            f"--cpus-per-task={r.task_cpus}", "--kill-on-bad-exit=1"]


def _bash_words(words: list[str]) -> str:
    """Quoted for bash, leaving $VARIABLES to the batch shell."""
    return " ".join(w if "$" in w else shlex.quote(w) for w in words).replace("$CONFIG", '"$CONFIG"')


def render(job: BatchJob) -> str:
    if len(job.run_dirs) != len(job.config_files) or not job.run_dirs:
        raise ValueError("a batch job needs one config file per run directory")
    env = {**default_env(job.resources)}
    lines = ["#!/bin/bash", "# rendered by `mesh slurm submit` (slurm/batch_script.py); kept with the run"]
    lines += [f"#SBATCH {d}" for d in sbatch_directives(job)]
    lines += ["", "set -uo pipefail", ""]
    lines += [f"export {k}=\"${{{k}:-{v}}}\"" for k, v in env.items()]
    lines += [f"export {k}={shlex.quote(v)}" for k, v in job.env.items()]
    lines += ["", "RUN_DIRS=(" + " ".join(shlex.quote(str(p)) for p in job.run_dirs) + ")",
              "CONFIGS=(" + " ".join(shlex.quote(str(p)) for p in job.config_files) + ")"]
    if job.is_sweep:
        lines += ["INDEX=${SLURM_ARRAY_TASK_ID:?a sweep runs as a job array}",
                  'RUN_DIR=${RUN_DIRS[$INDEX]}', 'CONFIG=${CONFIGS[$INDEX]}',
                  "CHAINED=0",
                  # the run's own log, appended across requeues like a single run's
                  'mkdir -p "$RUN_DIR/slurm"',
                  'exec >>"$RUN_DIR/slurm/job-${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}.log" 2>&1']
    else:
        lines += ["RUN_DIR=${RUN_DIRS[0]}", "CONFIG=${CONFIGS[0]}",
                  # a chain's last task may requeue; the others leave an interrupted run to the next task
                  'CHAINED=0',
                  'if [ -n "${SLURM_ARRAY_TASK_ID:-}" ] && [ "${SLURM_ARRAY_TASK_ID}" != "${SLURM_ARRAY_TASK_MAX:-}" ]; then CHAINED=1; fi']
    lines += [
        f"REQUEUE={1 if job.resources.requeue else 0}",
        "",
        'echo "mesh-slurm: segment start $(date -u +%FT%TZ) job=$SLURM_JOB_ID array=${SLURM_ARRAY_JOB_ID:-}_${SLURM_ARRAY_TASK_ID:-}'
        ' restart=${SLURM_RESTART_COUNT:-0} nodes=$SLURM_JOB_NODELIST run=$RUN_DIR"',
        'if [ -f "$RUN_DIR/COMPLETE" ]; then',
        '  echo "mesh-slurm: $RUN_DIR is COMPLETE, nothing to do"',
        "  exit 0",
        "fi",
        "",
        'export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        f"export MASTER_PORT=$(( {PORT_BASE} + SLURM_JOB_ID % {PORT_SPAN} ))",
        "",
        # the batch shell alone gets B:USR1; srun passes it to its tasks (torchrun), torchrun to the ranks
        'forward_usr1() { echo "mesh-slurm: SIGUSR1 at $(date -u +%FT%TZ): ranks save and stop"; kill -USR1 "$SRUN_PID" 2>/dev/null; }',
        # SIGTERM (scancel, preemption) reaches every process of the job itself: only wait for the save
        'note_term() { echo "mesh-slurm: SIGTERM at $(date -u +%FT%TZ): ranks save and stop"; }',
        # only a marker this segment writes may decide: one left by an earlier segment would requeue a
        # job that failed before training started, again and again
        'rm -f "$RUN_DIR/INTERRUPTED"',
        "trap forward_usr1 USR1",
        "trap note_term TERM",
        "",
        _bash_words(srun_command(job)) + " \\\n  " + _bash_words(torchrun_command(job)) + " &",
        "SRUN_PID=$!",
        # a trapped signal interrupts `wait`; wait again until srun itself has ended
        'while :; do wait "$SRUN_PID"; STATUS=$?; kill -0 "$SRUN_PID" 2>/dev/null || break; done',
        "",
        'if [ -f "$RUN_DIR/COMPLETE" ]; then echo "mesh-slurm: run complete"; exit 0; fi',
        'MARKED=""',
        'if [ -f "$RUN_DIR/INTERRUPTED" ]; then',
        '  MARKED=$(sed -n \'s/.*"exit_code": *\\([0-9]*\\).*/\\1/p\' "$RUN_DIR/INTERRUPTED")',
        "fi",
        'if [ "$MARKED" = 75 ]; then',
        '  if [ "$CHAINED" = 1 ]; then echo "mesh-slurm: interrupted; the next array task continues"; exit 0; fi',
        '  if [ "$REQUEUE" = 1 ]; then',
        '    echo "mesh-slurm: interrupted with a checkpoint saved: requeue $SLURM_JOB_ID"',
        '    scontrol requeue "$SLURM_JOB_ID" && exit 0',
        '    echo "mesh-slurm: scontrol requeue failed; submit again to resume"',
        "  fi",
        "  exit 75",
        "fi",
        'echo "mesh-slurm: training ended with status $STATUS${MARKED:+ (marker $MARKED)}"',
        'exit "${MARKED:-$STATUS}"',
    ]
    return "\n".join(lines) + "\n"
