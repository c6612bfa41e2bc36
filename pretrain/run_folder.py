"""The run folder: what one run keeps in `logging.run_dir`, and the rules for starting in one.

    runs/NAME/
      config.yaml                      the resolved config of the first segment
      config.resumed-stepNNNNNNN.yaml  the config of each resumed segment
      metrics.jsonl                    one row per logged step; a {"event": "resumed"} row per restart
      loss.png                         the loss curve of the latest segment
      wandb/, wandb-run-id             the offline wandb run (one id across restarts)
      checkpoints/                     pretrain/checkpoint (unless checkpoint.dir says elsewhere)
      COMPLETE                         written when the run reached train.steps: a JSON summary
                                       (step, tokens, final validation loss, checkpoint); launchers
                                       and sweeps skip such a run
      INTERRUPTED                      present while the run waits to be resumed (stopped by a signal
                                       or a time limit), with the exit code: launchers requeue on
                                       75, since torchrun reports a worker's exit code as a failure
      .lock                            held by the running process (pretrain/run_lock.py)
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

from mesh_model.config import ConfigError
from pretrain.checkpoint import format as ckpt_format
from pretrain.checkpoint.protocol import describe_os_error
from pretrain.signals import REQUEUE_EXIT_CODE

INTERRUPTED = "INTERRUPTED"
COMPLETE = "COMPLETE"


def read_jsonl(path: str | Path) -> list[dict]:
    """The rows of a JSON-lines file the run appends to (metrics.jsonl, slurm/jobs.jsonl); a line
    that does not parse (the one being written right now, or torn by a kill) is skipped, and a
    missing file has no rows."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return []
    rows = []
    for line in text.splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows


class RunFolderError(OSError):
    """The run folder cannot be written (one line; exit code 74 like a failed save)."""


def _read_only(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


class RunFolder:
    def __init__(self, run_dir: str | Path, checkpoint_dir: Optional[str | Path] = None):
        self.path = Path(run_dir)
        self.checkpoints = Path(checkpoint_dir) if checkpoint_dir else self.path / "checkpoints"

    @classmethod
    def of(cls, config) -> "RunFolder":
        return cls(config.logging.run_dir, config.checkpoint.dir)

    @property
    def config_file(self) -> Path:
        return self.path / "config.yaml"

    @property
    def metrics_file(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def interrupted_marker(self) -> Path:
        return self.path / INTERRUPTED

    @property
    def complete_marker(self) -> Path:
        return self.path / COMPLETE

    def metrics(self) -> list[dict]:
        """metrics.jsonl's rows (read_jsonl)."""
        return read_jsonl(self.metrics_file)

    def holds_a_run(self) -> bool:
        return self.config_file.exists()

    def check_start(self, resume: str) -> None:
        """One-line ConfigError if a run may not start here with ``checkpoint.resume=resume``."""
        if resume not in ("auto", "none") and not Path(resume).is_dir():
            raise ConfigError(f"checkpoint.resume={resume} is not a checkpoint directory")
        if self.holds_a_run() and resume == "none":
            raise ConfigError(
                f"logging.run_dir={self.path} already holds a run and checkpoint.resume=none; choose a new "
                "logging.run_dir, or resume it with checkpoint.resume=auto (nothing is overwritten)"
            )
        if self.holds_a_run() and resume == "auto":
            if not any(info.complete for info in ckpt_format.list_checkpoints(self.checkpoints)):
                raise ConfigError(
                    f"logging.run_dir={self.path} already holds a run but {self.checkpoints} has no complete "
                    "checkpoint to resume from; choose a new logging.run_dir (nothing is overwritten)"
                )

    def write_config(self, config, resumed_at: Optional[int]) -> None:
        """The first segment's config stays; a resumed segment's config is kept beside it.
        Written to a temporary name and renamed: a full disk leaves no empty file behind."""
        if not self.holds_a_run():
            target = self.config_file
        elif resumed_at is not None:
            target = self.path / f"config.resumed-step{resumed_at:07d}.yaml"
        else:
            return
        tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            config.save(tmp)
            os.replace(tmp, target)
        except OSError as err:
            tmp.unlink(missing_ok=True)
            raise RunFolderError(f"cannot write {target}: {describe_os_error(err)}; free space or fix the folder, "
                                 "then run the same command again") from None

    def clear_markers(self) -> None:
        """A segment starts: the run is neither waiting to resume nor (if it trains on) finished."""
        self.interrupted_marker.unlink(missing_ok=True)
        self.complete_marker.unlink(missing_ok=True)

    def mark_interrupted(self, why: str, step: int, checkpoint: Optional[str], exit_code: int) -> None:
        """``exit_code`` 75 asks a launcher to requeue; 130 (Ctrl-C) does not."""
        self.interrupted_marker.write_text(json.dumps(
            {"signal": why, "step": step, "checkpoint": checkpoint, "exit_code": exit_code}) + "\n")

    def mark_complete(self, summary: dict) -> None:
        """Written last, atomically: its presence means the run finished (a reader never sees half)."""
        tmp = self.complete_marker.with_name(f".{COMPLETE}.tmp-{os.getpid()}")
        try:
            tmp.write_text(json.dumps(summary, indent=1) + "\n")
            os.replace(tmp, self.complete_marker)
        except OSError as err:
            tmp.unlink(missing_ok=True)
            raise RunFolderError(f"cannot write {self.complete_marker}: {describe_os_error(err)}") from None

    def completion(self) -> Optional[dict]:
        """The COMPLETE summary, or None if the run has not finished (or the marker is unreadable)."""
        try:
            summary = json.loads(self.complete_marker.read_text())
        except (OSError, ValueError):
            return None
        return summary if isinstance(summary, dict) else None

    def interrupted_exit_code(self) -> Optional[int]:
        """The exit code the marker records (None without a marker)."""
        try:
            return int(json.loads(self.interrupted_marker.read_text()).get("exit_code", REQUEUE_EXIT_CODE))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError, AttributeError):
            return REQUEUE_EXIT_CODE

    def check_writable(self) -> None:
        """One-line RunFolderError if the run folder or the checkpoint folder cannot be written
        (a read-only mount, missing permission): found before any training, not at the first save."""
        for what, path in (("logging.run_dir", self.path), ("checkpoint.dir", self.checkpoints)):
            existing = path
            while not existing.exists() and existing != existing.parent:
                existing = existing.parent
            if not os.access(existing, os.W_OK | os.X_OK):
                reason = "read-only file system" if _read_only(existing) else "permission denied"
                raise RunFolderError(f"{what}={path} cannot be written ({reason} at {existing}); "
                                     "choose a writable folder")
