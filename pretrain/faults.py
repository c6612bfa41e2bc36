"""Fault-injection hooks for the checkpoint and resume tests (environment variables, off by default).

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
* ``MESH_CKPT_SLOW=<seconds>``: at the ``files`` point of every save, touch
  ``<checkpoint>/.slow-rank<R>``, sleep, remove it: a window for a test to
  signal a rank in the middle of a save.

Each costs one dictionary lookup per call when unset.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

NAN_STEPS_ENV = "MESH_TRAIN_NAN_STEPS"
STEP_DELAY_ENV = "MESH_TRAIN_STEP_DELAY"
PAUSE_ENV = "MESH_CKPT_PAUSE"
PAUSE_RANKS_ENV = "MESH_CKPT_PAUSE_RANKS"
SLOW_ENV = "MESH_CKPT_SLOW"


def nan_steps() -> frozenset[int]:
    spec = os.environ.get(NAN_STEPS_ENV, "")
    return frozenset(int(s) for s in spec.split(",") if s.strip())


def step_delay() -> None:
    seconds = os.environ.get(STEP_DELAY_ENV)
    if seconds:
        time.sleep(float(seconds))


def pause_point(point: str, step: int, checkpoint: Path, rank: int) -> None:
    slow = os.environ.get(SLOW_ENV)
    if slow and point == "files":
        marker = checkpoint / f".slow-rank{rank}"
        marker.touch()
        time.sleep(float(slow))
        marker.unlink()
    spec = os.environ.get(PAUSE_ENV)
    if not spec:
        return
    name, _, at_step = spec.partition(":")
    if name != point or (at_step and int(at_step) != step):
        return
    ranks = os.environ.get(PAUSE_RANKS_ENV)
    if ranks and str(rank) not in ranks.split(","):
        return
    (checkpoint / f".paused-rank{rank}").touch()
    while True:
        time.sleep(3600)
