"""Pre-termination signals: finish the step, save, exit with a code that asks for a requeue.

SLURM sends SIGUSR1 (``#SBATCH --signal=USR1@120``) or SIGTERM before it kills
a job; a preempting scheduler sends SIGTERM. The handler only records the
signal: the training loop notices it at the next step boundary, agrees with
every other rank (one all-reduce per step, so a signal delivered to a single
rank stops them all at the same step), saves a checkpoint and exits with
:data:`REQUEUE_EXIT_CODE`. A second signal while that happens is reported and
otherwise ignored, so it cannot interrupt the save half-way.
"""

from __future__ import annotations

import signal
import sys
import threading
from typing import Optional

REQUEUE_EXIT_CODE = 75
"""EX_TEMPFAIL (sysexits.h): stopped on request with a checkpoint saved; run the same command again."""

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequests:
    def __init__(self, signals=STOP_SIGNALS):
        self.signals = signals
        self.received: Optional[int] = None
        self._previous: dict = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread (e.g. not under some test runners)
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.received is None:
            self.received = signum
            print(f"received {name}: finishing this step, then saving a checkpoint and exiting "
                  f"with code {REQUEUE_EXIT_CODE}", file=sys.stderr, flush=True)
        else:
            print(f"received {name} again: already stopping, the checkpoint save continues",
                  file=sys.stderr, flush=True)


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"
