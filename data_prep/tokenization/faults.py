"""Fault-injection hooks for the resume tests (environment variables, off by default).

* ``MESH_DATA_CRASH_AT="<point>:<n>"``: the n-th time the run passes ``<point>``
  it kills itself with SIGKILL, as ``kill -9`` would. Points, in the order a
  run passes them: ``appended`` (a chunk written, not yet committed),
  ``finalized`` (a shard renamed into place, not yet committed), ``committed``
  (progress file just written), ``manifests`` (part manifests written, run
  manifest not yet).
* ``MESH_DATA_CHUNK_DELAY=<seconds>``: sleep after writing each chunk, so a
  test can kill a real run from outside while it is mid-way.

The tests use these to check that a run killed at each point resumes to
byte-identical output. They cost one dictionary lookup per call when unset.
"""

from __future__ import annotations

import os
import signal
import time
from collections import Counter

CRASH_ENV = "MESH_DATA_CRASH_AT"
DELAY_ENV = "MESH_DATA_CHUNK_DELAY"

_passes: Counter = Counter()


def crash_point(name: str) -> None:
    spec = os.environ.get(CRASH_ENV)
    if not spec:
        return
    point, _, count = spec.partition(":")
    if point != name:
        return
    _passes[name] += 1
    if _passes[name] >= int(count or 1):
        os.kill(os.getpid(), signal.SIGKILL)


def chunk_delay() -> None:
    seconds = os.environ.get(DELAY_ENV)
    if seconds:
        time.sleep(float(seconds))
