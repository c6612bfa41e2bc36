"""CheckpointManager: when to save, what to resume from, what to keep.

The training loop calls :meth:`CheckpointManager.after_step` once per step and
does what the returned :class:`StepEnd` says. Behind that call:

* the save policy (`checkpoint.*`): every `save_interval` steps, `log_spaced`
  steps, `save_interval_minutes` since the last save, the end of training;
  and the saves that end a run early: SIGTERM / SIGUSR1 (pretrain/signals.py),
  `train.max_minutes`, `train.stop_after_step`;
* the cross-rank agreement: one small all-reduce per step, so that a signal seen
  by one rank, clocks that differ and a background save still writing on some
  rank lead every rank to the same decision at the same step;
* the pending background save (`checkpoint.async_save`), committed once every
  rank has written its files;
* retention (`keep_last`, `keep_every`, `log_spaced`) after each commit.

:meth:`resume` chooses the checkpoint to start from (rank 0 decides, every rank
loads it): `checkpoint.resume=auto` takes the newest complete checkpoint whose
files verify and says why it passed over newer ones.

A new save reason is one branch in :meth:`_save_reason`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from mesh_model.config import ConfigError
from pretrain.checkpoint import format as fmt
from pretrain.checkpoint import protocol
from pretrain.engine import reapply_lr_schedule
from pretrain.resume_policy import resume_changes
from pretrain.signals import REQUEUE_EXIT_CODE, StopRequests, exit_code_for, signal_name


@dataclass
class StepEnd:
    """What the loop does after a step: go on (``stop`` None) or stop."""

    stop: Optional[str] = None
    """None, "interrupted" (a signal or train.max_minutes, a checkpoint saved: run again to
    resume) or "stop_after_step"."""
    interrupted_by: Optional[str] = None
    """The signal name, or "train.max_minutes"."""
    exit_code: int = 0
    """75 (requeue) for SIGTERM / SIGUSR1 / train.max_minutes, 130 for SIGINT."""


@dataclass
class Resumed:
    """What :meth:`CheckpointManager.resume` found and did."""

    report: Optional[protocol.LoadReport] = None
    passed_over: list = field(default_factory=list)
    """One line per newer checkpoint it passed over, and why."""
    config_changes: list = field(default_factory=list)
    """One line per config field that differs from the saving run's (all applied)."""
    removed_partial: list = field(default_factory=list)
    """Interrupted saves removed before anything new is written."""


class CheckpointManager:
    def __init__(self, config, plan, device: torch.device, *, engine, scheduler, tokenizer_sha256: Optional[str],
                 log: Callable[[str], None], save_point: protocol.SavePoint):
        self.config = config
        self.policy = config.checkpoint
        self.plan = plan
        self.device = device
        self.engine, self.scheduler = engine, scheduler
        self.tokenizer_sha256 = tokenizer_sha256
        self.log = log
        self.save_point = save_point
        self.root = Path(config.checkpoint.dir or Path(config.logging.run_dir) / "checkpoints")
        self.stop_requests = StopRequests()
        self.pending: Optional[protocol.PendingSave] = None
        self.last_saved: Optional[str] = None
        self.last_saved_step: Optional[int] = None
        self.started = self.last_save_time = time.monotonic()

    # ------------------------------------------------------------------ resume
    def resume(self) -> Resumed:
        """Loads the checkpoint to start from, if any (collective), after checking the config
        changes against the resume policy; then removes interrupted saves (rank 0)."""
        decision = [None]
        if self.plan.rank == 0:
            try:
                decision[0] = self._choose(self.policy.resume)
            except (ConfigError, fmt.CheckpointError) as err:
                decision[0] = err  # every rank raises the same one-line error
        torch.distributed.broadcast_object_list(decision, src=0)
        if isinstance(decision[0], Exception):
            raise decision[0]
        path, passed_over, changes = decision[0]
        resumed = Resumed(passed_over=passed_over, config_changes=changes)
        if path is not None:
            resumed.report = protocol.load(path, engine=self.engine, scheduler=self.scheduler,
                                           plan=self.plan, model_config=self.config.model)
            # Applied, not just claimed: the schedule restarts from the saved step with this config's LR.
            reapply_lr_schedule(self.engine, self.scheduler, self.config.optim.lr)
        if self.plan.rank == 0:
            resumed.removed_partial = fmt.remove_partial_saves(self.root)
        return resumed

    def _choose(self, resume: str) -> tuple[Optional[Path], list[str], list[str]]:
        """(checkpoint to load or None, newer ones passed over, config changes); raises the
        one-line error that stops the start."""
        verify = self.policy.verify_checksums
        if resume == "none":
            return None, [], []
        if resume != "auto":
            problems = fmt.verify(resume, verify)
            if problems:
                raise fmt.CheckpointError(f"checkpoint.resume={resume}: {problems[0]}")
            path = Path(resume)
            return path, [], self._config_changes(path, fmt.read_meta(path))
        info, passed_over = fmt.choose_resume(self.root, verify)
        if info is None and passed_over:
            raise fmt.CheckpointError(f"no loadable checkpoint in {self.root}: " + "; ".join(passed_over))
        if info is None:
            return None, passed_over, []
        return info.path, passed_over, self._config_changes(info.path, info.meta)

    def _config_changes(self, path: Path, meta: fmt.CheckpointMeta) -> list[str]:
        """The resume policy's lines for this config against the one the checkpoint was saved
        with; ConfigError for a refused change."""
        import yaml

        saved = yaml.safe_load((path / "config.yaml").read_text()) or {}
        return resume_changes(saved, self.config.to_dict(), meta.tokenizer_sha256, self.tokenizer_sha256)

    def newest_complete(self) -> Optional[fmt.CheckpointInfo]:
        return fmt.choose_resume(self.root, checksums=False)[0]

    # ------------------------------------------------------------------ the loop's call
    def start(self) -> None:
        """The run's clock starts (train.max_minutes, save_interval_minutes); signals are caught."""
        self.started = self.last_save_time = time.monotonic()
        self.stop_requests.install()

    def after_step(self, step: int, state) -> StepEnd:
        """Saves if the policy says so (collective: every rank calls it after every step)."""
        train = self.config.train
        now = time.monotonic()
        minutes = self.policy.save_interval_minutes
        signum, time_due, out_of_time, writing = self._agree(
            bool(minutes) and now - self.last_save_time >= 60 * minutes,
            bool(train.max_minutes) and now - self.started >= 60 * train.max_minutes,
        )
        if self.pending is not None and not writing:
            self.finish()  # every rank's files are written: commit
        stop_here = step == train.stop_after_step and step != train.steps
        if signum:
            reason = f"{signal_name(signum)} received"
        elif out_of_time:
            reason = f"train.max_minutes={train.max_minutes:g} reached"
        elif stop_here:
            reason = f"train.stop_after_step={step}"
        else:
            reason = self._save_reason(step, time_due)
        if reason:
            ends_run = bool(signum or out_of_time or stop_here or step == train.steps)
            self.save(step, state, reason, background=self.policy.async_save and not ends_run)
        if signum or out_of_time:
            return StepEnd("interrupted", signal_name(signum) if signum else "train.max_minutes",
                           exit_code_for(signum) if signum else REQUEUE_EXIT_CODE)
        if stop_here:
            return StepEnd("stop_after_step")
        return StepEnd()

    def after_evaluation(self, step: int, state) -> StepEnd:
        """A signal that arrived during an evaluation stops the run right after it (collective):
        this step is saved (if it is not already) and the loop exits."""
        signum, _, _, _ = self._agree(False, False)
        if not signum:
            return StepEnd()
        if self.last_saved_step != step:
            self.save(step, state, f"{signal_name(signum)} received", background=False)
        return StepEnd("interrupted", signal_name(signum), exit_code_for(signum))

    def _save_reason(self, step: int, time_due: bool) -> str:
        """Why the checkpoint of this step is due ("" if it is not)."""
        policy = self.policy
        if policy.save_interval and step % policy.save_interval == 0:
            return f"every {policy.save_interval} steps"
        if policy.log_spaced and step & (step - 1) == 0:
            return "log-spaced"
        if time_due:
            return f"{policy.save_interval_minutes:g} minutes since the last save"
        if step == self.config.train.steps and policy.save_at_end:
            return "end of training"
        return ""

    def _agree(self, time_due: bool, out_of_time: bool) -> tuple[int, bool, bool, bool]:
        """(signal number or 0, time_due, out_of_time, a background save still writing) as any
        rank saw them, agreed by all ranks with one small all-reduce per step: clocks, signals
        and disks differ between ranks."""
        writing = self.pending is not None and not self.pending.written()
        flags = torch.tensor([float(self.stop_requests.received or 0), float(time_due), float(out_of_time),
                              float(writing)], device=self.device)
        if self.plan.world_size > 1:
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
        return int(flags[0].item()), bool(flags[1].item()), bool(flags[2].item()), bool(flags[3].item())

    # ------------------------------------------------------------------ saving
    def save(self, step: int, state, reason: str, background: bool = False) -> str:
        """Saves this step; with ``background`` the files are written while training goes on
        and the checkpoint is committed later (:meth:`finish`)."""
        self.finish()
        self.pending = protocol.begin_save(
            self.root, step, engine=self.engine, scheduler=self.scheduler, plan=self.plan,
            run_config=self.config, counters=state.state_dict(), reason=reason, background=background,
            tokenizer_sha256=self.tokenizer_sha256, save_point=self.save_point,
        )
        self.last_saved = str(self.pending.path)
        self.last_saved_step = step
        self.last_save_time = time.monotonic()
        if not background:
            self.finish()
        return self.last_saved

    def finish(self) -> None:
        """Commits the pending save, if any (collective), then applies retention."""
        pending, self.pending = self.pending, None
        if pending is None:
            return
        path = protocol.finish_save(pending)
        if self.plan.rank != 0:
            return
        policy = self.policy
        removed = fmt.prune(self.root, policy.keep_last, policy.keep_every, policy.log_spaced, protect=pending.step,
                            keep_set_aside=policy.keep_set_aside)
        meta = fmt.read_meta(path)
        how = ", written in the background" if meta.asynchronous else ""
        self.log(f"step {pending.step:>6}: checkpoint {path} ({meta.reason}, {meta.save_seconds:.1f} s{how})"
                 + (f"; removed {', '.join(removed)}" if removed else ""))

    def close(self) -> None:
        self.stop_requests.restore()
