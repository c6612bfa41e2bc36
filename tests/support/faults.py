"""Fault injection for the checkpoint and resume tests, through pretrain.hooks.TrainHooks.

    python -m tests.support.faults train [--nproc-per-node N] CONFIG [overrides]

runs `mesh train` with :class:`EnvFaults` hooks; with N > 1 each torchrun worker
is this module again. The faults are chosen by environment variables, read once
when the hooks are built (library code reads none of them):

* ``MESH_TRAIN_NAN_STEPS="4,5"``: the loss of every micro-batch of those
  optimizer steps is multiplied by NaN, so the gradients are NaN too, as after
  a real numerical blow-up.
* ``MESH_TRAIN_STEP_DELAY=<seconds>``: sleep after every optimizer step, so a
  test can signal or kill a real run from outside while it is mid-way.
* ``MESH_CKPT_PAUSE="<point>[:<step>]"``: at that point of saving (the
  checkpoint of ``<step>``, or every one), the rank touches
  ``<checkpoint>/.paused-rank<R>`` and sleeps forever, so a test can kill -9 it
  inside the save. Points: ``files`` (this rank's state files written, the
  metadata not yet), ``meta`` (the metadata written, ``latest`` not yet moved).
* ``MESH_CKPT_PAUSE_RANKS="0,1"``: the ranks that pause (default: all).
* ``MESH_EVAL_DELAY=<seconds>``: before every validation pass after step 0, print
  ``[faults] evaluating at step N`` and sleep: a window to signal a run inside an evaluation.
* ``MESH_CKPT_SLOW=<seconds>``: at the ``files`` point of every save, touch
  ``<checkpoint>/.slow-rank<R>``, sleep, remove it: a window for a test to
  signal a rank in the middle of a save.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from pretrain.hooks import TrainHooks


class EnvFaults(TrainHooks):
    def __init__(self, environ=os.environ):
        self.nan_steps = frozenset(int(s) for s in environ.get("MESH_TRAIN_NAN_STEPS", "").split(",") if s.strip())
        self.step_delay = float(environ.get("MESH_TRAIN_STEP_DELAY") or 0)
        self.slow = float(environ.get("MESH_CKPT_SLOW") or 0)
        point, _, at_step = environ.get("MESH_CKPT_PAUSE", "").partition(":")
        self.pause_point, self.pause_step = point, int(at_step) if at_step else None
        ranks = environ.get("MESH_CKPT_PAUSE_RANKS")
        self.pause_ranks = {int(r) for r in ranks.split(",")} if ranks else None
        self.eval_delay = float(environ.get("MESH_EVAL_DELAY") or 0)

    def poison_step(self, step: int) -> bool:
        return step in self.nan_steps

    def before_evaluation(self, step: int) -> None:
        if self.eval_delay and step > 0:
            print(f"[faults] evaluating at step {step}", file=sys.stderr, flush=True)
            time.sleep(self.eval_delay)

    def after_step(self, step: int) -> None:
        if self.step_delay:
            time.sleep(self.step_delay)

    def save_point(self, point: str, step: int, path: Path, rank: int) -> None:
        if self.slow and point == "files":
            marker = path / f".slow-rank{rank}"
            marker.touch()
            time.sleep(self.slow)
            marker.unlink()
        if point != self.pause_point or (self.pause_step is not None and self.pause_step != step):
            return
        if self.pause_ranks is not None and rank not in self.pause_ranks:
            return
        (path / f".paused-rank{rank}").touch()
        while True:
            time.sleep(3600)


def main(argv: list[str]) -> int:
    """`mesh train` with these hooks; under torchrun (RANK set) a worker of it."""
    import argparse

    from mesh_cli.main import run_command
    from pretrain import cli

    if "RANK" in os.environ:  # a torchrun worker: `-m tests.support.faults CONFIG overrides`
        argv = ["train", *argv]
    parser = argparse.ArgumentParser(prog="tests.support.faults")
    cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return run_command(args, lambda a: cli._train(a, hooks=EnvFaults(), worker_module="tests.support.faults"))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
