"""The run folder: what one run keeps in `logging.run_dir`, and the rules for starting in one.

    runs/NAME/
      config.yaml                      the resolved config of the first segment
      config.resumed-stepNNNNNNN.yaml  the config of each resumed segment
      metrics.jsonl                    one row per logged step; a {"event": "resumed"} row per restart
      loss.png                         the loss curve of the latest segment
      wandb/, wandb-run-id             the offline wandb run (one id across restarts)
      checkpoints/                     pretrain/checkpoint (unless checkpoint.dir says elsewhere)
      INTERRUPTED                      present while the run waits to be resumed (stopped by a signal
                                       or a time limit): launchers requeue on it, since torchrun
                                       reports a worker's exit code 75 as a plain failure
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from mesh_model.config import ConfigError
from pretrain.checkpoint import format as ckpt_format
from pretrain.signals import REQUEUE_EXIT_CODE

INTERRUPTED = "INTERRUPTED"


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
        """The first segment's config stays; a resumed segment's config is kept beside it."""
        self.path.mkdir(parents=True, exist_ok=True)
        if not self.holds_a_run():
            config.save(self.config_file)
        elif resumed_at is not None:
            config.save(self.path / f"config.resumed-step{resumed_at:07d}.yaml")

    def clear_interrupted(self) -> None:
        self.interrupted_marker.unlink(missing_ok=True)

    def mark_interrupted(self, why: str, step: int, checkpoint: Optional[str]) -> None:
        self.interrupted_marker.write_text(json.dumps(
            {"signal": why, "step": step, "checkpoint": checkpoint, "exit_code": REQUEUE_EXIT_CODE}) + "\n")
