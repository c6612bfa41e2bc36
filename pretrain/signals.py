"""Stop signals: finish the step, save, exit with a code that says what happened.

SLURM sends SIGUSR1 (``#SBATCH --signal=USR1@120``) or SIGTERM before it kills
a job; a preempting scheduler sends SIGTERM; a user at a terminal presses
Ctrl-C (SIGINT). The handler only records the signal: the training loop
notices it at the next step boundary (or right after an evaluation), agrees
with every other rank (one all-reduce per step, so a signal delivered to a
single rank stops them all at the same step), saves a checkpoint and exits.
A second signal while that happens is reported and otherwise ignored, so it
cannot interrupt the save half-way.

Exit codes of `mesh train` (docs/checkpoints.md lists them all): 0 done, 2 bad input or a
diverged run, 74 a save failed, 75 stopped for a requeue, 130 stopped by Ctrl-C.
"""

from __future__ import annotations

import signal
import sys
import threading
from typing import Optional

REQUEUE_EXIT_CODE = 75
"""EX_TEMPFAIL (sysexits.h): stopped by SIGTERM / SIGUSR1 or train.max_minutes with a checkpoint
saved; run the same command again (a launcher requeues)."""

USER_INTERRUPT_EXIT_CODE = 130
"""128 + SIGINT, the shell's code for Ctrl-C: stopped by the user with a checkpoint saved; not a
reason to requeue."""

SAVE_FAILED_EXIT_CODE = 74
"""EX_IOERR (sysexits.h): a checkpoint or run-folder write failed (no space, read-only, permission,
I/O error); the last complete checkpoint is intact and the partial save removed."""

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


def exit_code_for(signum: int) -> int:
    return USER_INTERRUPT_EXIT_CODE if signum == signal.SIGINT else REQUEUE_EXIT_CODE


class StopRequests:
    def __init__(self, signals=STOP_SIGNALS):
        self.signals = signals
        self.received: Optional[int] = None
        self._previous: dict = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread (e.g. not under some test runners)
        for sig in self.signals:
            if sig not in self._previous:
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
                  f"with code {exit_code_for(signum)}", file=sys.stderr, flush=True)
        else:
            print(f"received {name} again: already stopping, the checkpoint save continues",
                  file=sys.stderr, flush=True)


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"
