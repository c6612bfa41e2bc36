"""`mesh slurm status RUN_DIR`: the job's state from the scheduler, and the run's progress from
its directory (metrics.jsonl, COMPLETE / INTERRUPTED)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from slurm import scheduler
from slurm.submit import submissions


@dataclass
class RunStatus:
    run_dir: Path
    job_id: Optional[str]
    state: str
    """The scheduler's state of the last job, COMPLETE / INTERRUPTED from the run directory once
    the scheduler has forgotten it, or NOT SUBMITTED."""
    restarts: int
    """Requeues of the last job (scontrol's Restarts) or, once it is forgotten, resumed segments."""
    step: Optional[int]
    total_steps: Optional[int]
    loss: Optional[float]
    valid_loss: Optional[float]
    tokens_per_s: Optional[float]
    eta_seconds: Optional[float]
    complete: bool

    def describe(self) -> str:
        step = f"{self.step}/{self.total_steps}" if self.step is not None else "-"
        lines = [f"run        {self.run_dir}",
                 f"job        {self.job_id or '-'}  {self.state}",
                 f"restarts   {self.restarts}",
                 f"step       {step}",
                 f"loss       {_num(self.loss)}   validation {_num(self.valid_loss)}",
                 f"tokens/s   {_num(self.tokens_per_s, '{:,.0f}')}",
                 f"ETA        {'done' if self.complete else _duration(self.eta_seconds)}"]
        return "\n".join(lines)


def _num(value, form: str = "{:.4f}") -> str:
    return "-" if value is None else form.format(value)


def _duration(seconds: Optional[float]) -> str:
    if seconds is None:
        return "-"
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    return f"{h}h{rest // 60:02d}m" if h else f"{rest // 60}m{rest % 60:02d}s"


def _total_steps(run_dir: Path) -> Optional[int]:
    import yaml

    for path in sorted((Path(run_dir) / "slurm").glob("config-*.yaml"))[-1:] or [Path(run_dir) / "config.yaml"]:
        try:
            return int(yaml.safe_load(path.read_text())["train"]["steps"])
        except (OSError, KeyError, TypeError, ValueError):
            return None
    return None


def run_status(run_dir: str | Path) -> RunStatus:
    from pretrain.run_folder import RunFolder

    run_dir = Path(run_dir)
    folder = RunFolder(run_dir)
    jobs = submissions(run_dir)
    job_id = str(jobs[-1]["job_id"]) if jobs else None
    rows = folder.metrics()
    train = [r for r in rows if "train/loss" in r]
    valid = [r for r in rows if "valid/loss" in r]
    resumed = sum(1 for r in rows if r.get("event") == "resumed")
    completion = folder.completion()
    restarts, state = resumed, "NOT SUBMITTED" if job_id is None else "UNKNOWN"
    if job_id is not None:
        tasks = scheduler.show_job(job_id)
        if tasks:
            state = scheduler.job_state(job_id) or state
            restarts = max(restarts, sum(int(t.get("Restarts", 0) or 0) for t in tasks))
    if state != "COMPLETED" and state not in scheduler.ACTIVE_STATES:
        if completion is not None:  # the scheduler forgot the job, the run finished in an earlier one, or off SLURM
            # SLURM's own word, so that a sweep's counts do not split finished runs in two.
            state = "COMPLETED" if state in ("UNKNOWN", "NOT SUBMITTED") else f"{state} (run COMPLETE)"
        elif folder.interrupted_exit_code() is not None and state in ("UNKNOWN", "NOT SUBMITTED"):
            state = "INTERRUPTED"
    total = _total_steps(run_dir)
    last = train[-1] if train else None
    step = completion.get("step") if completion else (last["step"] if last else None)
    tokens_per_s = last.get("train/tokens_per_s") if last else None
    eta = None
    if completion is None and last is not None and total and tokens_per_s:
        tokens_per_step = _tokens_per_step(train)
        if tokens_per_step:
            eta = (total - last["step"]) * tokens_per_step / tokens_per_s
    return RunStatus(run_dir=run_dir, job_id=job_id, state=state, restarts=restarts, step=step, total_steps=total,
                     loss=last.get("train/loss") if last else None,
                     valid_loss=(completion or {}).get("valid_loss") or (valid[-1]["valid/loss"] if valid else None),
                     tokens_per_s=tokens_per_s, eta_seconds=eta, complete=completion is not None)


def _tokens_per_step(train_rows: list[dict]) -> Optional[float]:
    """Tokens per optimizer step, from two logged rows' cumulative token counts."""
    with_tokens = [r for r in train_rows if r.get("train/tokens") is not None]
    if len(with_tokens) >= 2:
        a, b = with_tokens[-2], with_tokens[-1]
        if b["step"] > a["step"]:
            return (b["train/tokens"] - a["train/tokens"]) / (b["step"] - a["step"])
    if with_tokens and with_tokens[-1]["step"]:
        return with_tokens[-1]["train/tokens"] / with_tokens[-1]["step"]
    return None
