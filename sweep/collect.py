"""`mesh sweep collect`: every run's validation losses, intermediate and final, in one table.

Each run folder's metrics.jsonl holds a `valid/loss` row per evaluation (a resumed run appends
again from its checkpoint's step, so a step evaluated twice keeps its last row) and, once the
run reached train.steps, a COMPLETE marker (pretrain/run_folder.py). A row is `final` when it is
a finished run's evaluation at its last step. `tokens` and `flops` are those trained up to the
row's step (step x global_batch_size x seq_length, x F_token): the same axis for an intermediate
evaluation as for a final one.
"""

from __future__ import annotations

import csv
import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from pretrain.run_folder import RunFolder
from sweep.spec import Sweep, SweepRun

COLUMNS = ("run_id", "variant", "size", "parameters", "parameters_total", "tokens", "flops", "step", "loss",
           "final", "seed", "budget", "tokens_per_s")
"""The CSV's columns; `mesh sweep fit` needs variant, parameters, tokens and loss (and reads final, flops, run_id)."""

NOT_STARTED, RUNNING, INTERRUPTED, FINISHED = "not started", "unfinished", "interrupted", "finished"


@dataclass
class RunStatus:
    run_id: str
    status: str
    last_step: int
    steps: int
    final_loss: Optional[float]
    evaluations: int
    segment_seconds: Optional[float] = None
    """The finished run's last segment's wall time (COMPLETE), for the sweep's overhead."""


@dataclass
class Collection:
    sweep: Sweep
    rows: list[dict] = field(default_factory=list)
    runs: list[RunStatus] = field(default_factory=list)

    def by_status(self, status: str) -> list[RunStatus]:
        return [r for r in self.runs if r.status == status]

    def summary(self) -> str:
        counts = ", ".join(f"{len(self.by_status(s))} {s}" for s in (FINISHED, RUNNING, INTERRUPTED, NOT_STARTED)
                           if self.by_status(s))
        lines = [f"sweep {self.sweep.name}: {len(self.runs)} runs ({counts}), {len(self.rows)} validation rows"]
        for status in (RUNNING, INTERRUPTED):
            for run in self.by_status(status):
                lines.append(f"  {status}: {run.run_id} at step {run.last_step} of {run.steps}")
        missing = self.by_status(NOT_STARTED)
        if missing:
            lines.append(f"  not started: {', '.join(r.run_id for r in missing)}")
        return "\n".join(lines)


def collect_run(run: SweepRun) -> tuple[RunStatus, list[dict]]:
    folder = RunFolder(run.run_dir)
    metrics = folder.metrics()
    completion = folder.completion()
    evaluations: dict[int, float] = {}
    for row in metrics:
        if "valid/loss" in row:
            evaluations[int(row["step"])] = float(row["valid/loss"])
    if completion is not None and completion.get("valid_loss") is not None:
        evaluations[int(completion["step"])] = float(completion["valid_loss"])
    rates = [row["train/tokens_per_s"] for row in metrics if "train/tokens_per_s" in row]
    tokens_per_s = statistics.median(rates) if rates else None
    last_step = max([int(row.get("step", 0)) for row in metrics] + [int(completion["step"]) if completion else 0])

    if completion is not None:
        status = FINISHED
    elif folder.interrupted_exit_code() is not None:
        status = INTERRUPTED
    elif folder.metrics_file.is_file():
        status = RUNNING
    else:
        status = NOT_STARTED
    final_step = int(completion["step"]) if completion is not None else None
    rows = []
    for step in sorted(evaluations):
        tokens = step * run.tokens_per_step
        rows.append({
            "run_id": run.run_id, "variant": run.variant, "size": run.size,
            "parameters": run.params_non_embedding, "parameters_total": run.params_total,
            "tokens": tokens, "flops": tokens * run.flops_per_token, "step": step, "loss": evaluations[step],
            "final": step == final_step, "seed": run.seed, "budget": run.budget, "tokens_per_s": tokens_per_s,
        })
    final_loss = evaluations.get(final_step) if final_step is not None else None
    seconds = completion.get("segment_seconds") if completion is not None else None
    return RunStatus(run.run_id, status, last_step, run.steps, final_loss, len(evaluations), seconds), rows


def collect(sweep: Sweep) -> Collection:
    collection = Collection(sweep)
    for run in sweep.runs:
        status, rows = collect_run(run)
        collection.runs.append(status)
        collection.rows.extend(rows)
    return collection


def write_collection(collection: Collection, out_dir: str | Path) -> tuple[Path, Path]:
    """results.csv (one row per evaluation) and results.json (the same rows and each run's status),
    each written to a temporary name and renamed, so a reader never sees half a file."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    csv_path, json_path = out / "results.csv", out / "results.json"
    tmp = csv_path.with_name(f".{csv_path.name}.tmp")
    with tmp.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        for row in collection.rows:
            writer.writerow({k: ("" if row[k] is None else row[k]) for k in COLUMNS})
    tmp.replace(csv_path)
    payload = {
        "sweep": collection.sweep.name, "sweep_file": str(collection.sweep.path), "root": str(collection.sweep.root),
        "runs": [vars(status) for status in collection.runs],
        "rows": collection.rows,
    }
    tmp = json_path.with_name(f".{json_path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    tmp.replace(json_path)
    return csv_path, json_path
