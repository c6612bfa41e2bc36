"""One run per run folder: an exclusive lock held for the whole run by global rank 0.

    runs/x/.lock   {"host": ..., "pid": ..., "started": ..., "command": ...} of the holder

Two processes training into one folder (a double-submitted job, a requeue racing
a manual restart) would interleave metrics.jsonl and prune each other's
checkpoints. The lock is `fcntl.flock` on the lock file: the kernel releases it
when the holder exits or is killed, so a dead run never blocks the next one; the
file's content then still names the dead holder, and the next run says that it
took the lock over. On a clean exit the content is cleared.

Shared cluster filesystems: `flock` is exclusive across nodes on NFSv4 (through
its lock manager) and on Lustre mounted with `-o flock`; with Lustre's
`-o localflock` it only excludes processes of the same node, and some mounts
refuse it (ENOLCK / EOPNOTSUPP). Where `flock` is refused, the lock falls back to
creating the file exclusively (O_EXCL): a holder on the same host that no longer
runs is detected by its pid and taken over; a holder on another host cannot be
checked from here, so the message names the file to delete once that run is
known to be gone.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Optional

_UNSUPPORTED = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


class RunFolderBusy(Exception):
    """Another live run holds the run folder (a one-line user error)."""


def _holder_text(info: dict) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.get("started", 0)))
    return f"pid {info.get('pid', '?')} on host {info.get('host', '?')} since {started}"


def _read_holder(path: Path) -> dict:
    try:
        text = path.read_text().strip()
        return json.loads(text) if text else {}
    except (OSError, ValueError):
        return {}


def _alive_here(info: dict) -> bool:
    """True when the holder runs on this host (or cannot be told not to)."""
    if info.get("host") != socket.gethostname():
        return True
    try:
        os.kill(int(info.get("pid", -1)), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, TypeError):
        return True
    return True


class RunLock:
    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / ".lock"
        self._file = None
        self._exclusive_file = False

    def _busy(self, info: dict, hint: str = "") -> RunFolderBusy:
        return RunFolderBusy(
            f"logging.run_dir={self.run_dir} is in use by another run ({_holder_text(info)}; lock {self.path}); "
            f"wait for it to finish or stop it, or choose another logging.run_dir{hint}"
        )

    def check_free(self) -> None:
        """Raises RunFolderBusy if a live run holds the folder (the launcher's early check)."""
        if not self.path.exists():
            return
        import fcntl

        try:
            with open(self.path) as f:
                fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            raise self._busy(_read_holder(self.path)) from None
        except OSError as err:
            if err.errno not in _UNSUPPORTED:
                raise

    def acquire(self) -> Optional[str]:
        """Takes the lock; returns a line to report when a dead holder's lock was taken over."""
        import fcntl

        self.run_dir.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise self._busy(_read_holder(self.path)) from None
        except OSError as err:
            handle.close()
            if err.errno not in _UNSUPPORTED:
                raise
            return self._acquire_exclusive_file()
        previous = _read_holder(self.path)
        self._file = handle
        self._write_holder(handle)
        if previous:
            return f"took over the lock {self.path} of {_holder_text(previous)}, which is no longer running"
        return None

    def _acquire_exclusive_file(self) -> Optional[str]:
        note = None
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                info = _read_holder(self.path)
                if _alive_here(info):
                    raise self._busy(info, hint=f" (this filesystem has no flock; if that run is gone, delete "
                                                f"{self.path})") from None
                note = f"took over the lock {self.path} of {_holder_text(info)}, which is no longer running"
                self.path.unlink(missing_ok=True)
                continue
            self._file = os.fdopen(fd, "w")
            self._exclusive_file = True
            self._write_holder(self._file)
            return note
        raise self._busy(_read_holder(self.path))

    def _write_holder(self, handle) -> None:
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "started": time.time(),
                                 "command": " ".join(sys.argv)}) + "\n")
        handle.flush()
        os.fsync(handle.fileno())

    def release(self) -> None:
        if self._file is None:
            return
        try:
            if self._exclusive_file:
                self.path.unlink(missing_ok=True)
            else:
                self._file.seek(0)
                self._file.truncate()  # a clean exit leaves no holder to report
        except OSError:
            pass
        self._file.close()
        self._file = None
