"""`mesh sweep plan`: every run's size, budget and cost, before anything is trained.

GPU-hours need a throughput. The user gives one (`--tokens-per-s`, measured elsewhere) or a
probe measures it (`--probe`: a few steps of the smallest run on this machine). Either figure
is taken as the throughput of the smallest run (fewest FLOPs per token) and carried to every
other run at equal FLOP/s: tokens/s_run = tokens/s_smallest x F_token_smallest / F_token_run.
That is the usual first-order model (a larger model runs at about the same MFU); it ignores
that small models often run at lower MFU, so it tends to overestimate the large runs' cost.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from mesh_model.config import ConfigError
from sweep.spec import Sweep, SweepRun


@dataclass(frozen=True)
class Probe:
    run_id: str
    tokens_per_s: float
    steps: int
    processes: int


def smallest_run(sweep: Sweep) -> SweepRun:
    return min(sweep.runs, key=lambda r: (r.flops_per_token, r.run_id))


def gpus_per_run(sweep: Sweep, given: Optional[int] = None) -> int:
    if given is not None:
        if given < 1:
            raise ConfigError(f"--gpus-per-run={given} must be >= 1")
        return given
    try:
        return int(sweep.slurm.get("nodes", 1)) * int(sweep.slurm.get("gpus_per_node", 1))
    except (TypeError, ValueError):
        raise ConfigError(f"{sweep.path}: slurm.nodes / slurm.gpus_per_node must be integers") from None


def devices_per_run(sweep: Sweep, given: Optional[int] = None) -> tuple[int, str]:
    """(count, unit) that the hours are charged in: GPUs, or on a CPU sweep (slurm.gpus_per_node: 0)
    its cores, nodes x procs_per_node x cpus_per_task."""
    gpus = gpus_per_run(sweep, given)
    if gpus > 0:
        return gpus, "GPU"
    try:
        procs = int(sweep.slurm.get("procs_per_node", 1))
        cores = int(sweep.slurm.get("nodes", 1)) * procs * int(sweep.slurm.get("cpus_per_task", 1))
    except (TypeError, ValueError):
        raise ConfigError(f"{sweep.path}: slurm.procs_per_node / slurm.cpus_per_task must be integers") from None
    return max(1, cores), "core"


def run_hours(run: SweepRun, reference: SweepRun, tokens_per_s: float) -> float:
    """Wall-clock hours of `run`, at the reference run's FLOP/s."""
    rate = tokens_per_s * reference.flops_per_token / run.flops_per_token
    return run.tokens / rate / 3600


def plan_rows(sweep: Sweep, tokens_per_s: Optional[float], devices: int) -> list[dict]:
    """One row per run; "device_hours" are hours x `devices` per run (GPUs, or cores on a CPU
    sweep: devices_per_run says which)."""
    reference = smallest_run(sweep)
    rows = []
    for run in sweep.runs:
        hours = run_hours(run, reference, tokens_per_s) if tokens_per_s else None
        rows.append({
            "run_id": run.run_id, "variant": run.variant, "size": run.size,
            "parameters": run.params_non_embedding, "parameters_total": run.params_total,
            "tokens": run.tokens, "steps": run.steps, "flops": run.flops,
            "device_hours": None if hours is None else hours * devices,
        })
    return rows


def plan_table(sweep: Sweep, tokens_per_s: Optional[float] = None, probe: Optional[Probe] = None,
               gpus_per_run: Optional[int] = None) -> str:
    if tokens_per_s is not None and not tokens_per_s > 0:
        raise ConfigError(f"--tokens-per-s={tokens_per_s} must be > 0")
    if probe is not None:
        tokens_per_s = probe.tokens_per_s
    devices, unit = devices_per_run(sweep, gpus_per_run)
    rows = plan_rows(sweep, tokens_per_s, devices)
    header = ("run", "variant", "size", "non-emb params", "total params", "tokens", "steps", "FLOPs", f"{unit}-hours")
    lines = [[r["run_id"], r["variant"], r["size"], f"{r['parameters']:,}", f"{r['parameters_total']:,}",
              f"{r['tokens']:,}", f"{r['steps']:,}", f"{r['flops']:.3e}",
              _hours(r["device_hours"])] for r in rows]
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
    right = {3, 4, 5, 6, 7, 8}

    def fmt(cells):
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    out = [f"sweep {sweep.name}: {len(rows)} runs under {sweep.root}", fmt(header), fmt(["-" * w for w in widths])]
    out += [fmt(line) for line in lines]
    total_flops = sum(r["flops"] for r in rows)
    out.append(f"total: {sum(r['tokens'] for r in rows):,} tokens, {total_flops:.3e} FLOPs")
    reference = smallest_run(sweep)
    if tokens_per_s:
        hours = sum(r["device_hours"] for r in rows)
        source = (f"measured by a {probe.steps}-step probe of {probe.run_id} on this machine ({probe.processes} process"
                  f"{'es' if probe.processes > 1 else ''})" if probe else "given")
        wall = hours / devices  # the runs one after another
        out.append(f"{unit}-hours: {_hours(hours)} in all, {devices} {unit}(s) per run ({_hours(wall)} run-hours one after "
                   f"another), from {tokens_per_s:,.0f} tokens/s for {reference.run_id} ({source}), scaled to each run "
                   "by its FLOPs per token")
    else:
        out.append(f"{unit}-hours: give --tokens-per-s (the smallest run's throughput) or --probe to estimate them")
    return "\n".join(out)


def _hours(hours: Optional[float]) -> str:
    if hours is None:
        return "-"
    return f"{hours:,.2f}" if hours >= 1 else f"{hours:.2g}"


def probe_tokens_per_s(sweep: Sweep, steps: int = 6, timeout_s: float = 900) -> Probe:
    """Trains the smallest run for `steps` steps in a scratch folder (nothing of the sweep is
    written) and returns its median tokens/s over the steps after the first (which pays for
    start-up and warm-up)."""
    if steps < 2:
        raise ConfigError(f"--probe-steps={steps} must be >= 2 (the first step is not timed)")
    run = smallest_run(sweep)
    processes = run.config.parallel.tensor * run.config.parallel.pipeline
    with tempfile.TemporaryDirectory(prefix="mesh-sweep-probe-") as scratch:
        overrides = [o for o in run.overrides if not o.startswith("logging.run_dir=")] + [
            f"train.steps={steps}", "train.log_interval=1", "train.eval_interval=0", "train.eval_batches=1",
            "train.stop_after_step=0", "train.max_minutes=0", "checkpoint.save_at_end=false",
            "checkpoint.save_interval=0", "checkpoint.save_interval_minutes=0", "checkpoint.resume=none",
            "logging.wandb_mode=disabled", "logging.progress_bar=false", f"logging.run_dir={scratch}/run",
        ]
        cmd = [sys.executable, "-m", "mesh_cli", "train", str(run.config_path), *overrides]
        if processes > 1:
            cmd[4:4] = ["--nproc-per-node", str(processes)]
        env = dict(os.environ, WANDB_MODE="disabled")
        print(f"probe: {steps} steps of {run.run_id} ({processes} process{'es' if processes > 1 else ''}) ...",
              file=sys.stderr, flush=True)
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
        metrics = Path(scratch) / "run" / "metrics.jsonl"
        if done.returncode != 0 or not metrics.is_file():
            last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise ConfigError(f"probe run of {run.run_id} failed (exit {done.returncode}): {last}")
        rates = [row["train/tokens_per_s"] for row in map(json.loads, metrics.read_text().splitlines())
                 if "train/tokens_per_s" in row and row["step"] >= 2]
    if not rates:
        raise ConfigError(f"probe run of {run.run_id} logged no throughput; raise --probe-steps")
    return Probe(run_id=run.run_id, tokens_per_s=statistics.median(rates), steps=steps, processes=processes)
