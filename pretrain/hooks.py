"""Callbacks at fixed points of a training run, for fault injection in tests.

The trainer calls these at their points; the defaults do nothing. Tests pass a
subclass (tests/support/faults.py) to make a step's loss NaN, slow a run down,
or stop a rank inside a checkpoint save, so that library code reads no test
switches of its own.
"""

from __future__ import annotations

from pathlib import Path


class TrainHooks:
    def started(self) -> None:
        """The trainer is built (model, engine, resume, data) and about to run its first step."""

    def before_step(self, step: int) -> None:
        """Before optimizer step `step` (1-based)."""

    def poison_step(self, step: int) -> bool:
        """True: multiply every micro-batch loss of this step by NaN (a numerical blow-up)."""
        return False

    def before_evaluation(self, step: int) -> None:
        """Before the validation pass at `step` (0: before training)."""

    def after_step(self, step: int) -> None:
        """After optimizer step `step`, before the checkpoint policy runs."""

    def save_point(self, point: str, step: int, path: Path, rank: int) -> None:
        """At a named point of saving checkpoint `path` (pretrain/checkpoint/protocol.py SavePoint)."""
