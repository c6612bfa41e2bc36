"""Where a conversion writes: a new or empty folder (or any, with --overwrite), filled under a
temporary name beside it and moved into place only when complete, so a failure leaves nothing
behind and an overwritten folder is replaced only by a whole one."""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Iterator


def check_output_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty; choose an empty or new folder, "
                              "or pass --overwrite to replace it")


@contextlib.contextmanager
def written_whole(out: Path) -> Iterator[Path]:
    """Yields the temporary folder to fill; on success it replaces `out`, on failure it is removed."""
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
