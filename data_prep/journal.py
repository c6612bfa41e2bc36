"""The progress file: the last committed state of a run, from which it resumes.

``<out>.progress.json`` exists only while a run is unfinished. Each commit
replaces it atomically (write a temporary file, fsync, rename), so after a
crash it holds one complete, consistent state: the next chunk to process,
every finished shard, the size of every open shard, and all counts so far.
Anything written to the shards after that commit is cut back on resume
(``shards.OpenShard.restore``).
"""

from __future__ import annotations

import json
import os
from typing import Optional

from data_prep.errors import DataError

PROGRESS_SUFFIX = ".progress.json"
PROGRESS_FORMAT = "mesh-data-progress"
PROGRESS_VERSION = 1


def progress_path(out_prefix: str) -> str:
    return out_prefix + PROGRESS_SUFFIX


def write_json_atomic(path: str, data: dict, durable: bool = True) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1, sort_keys=False)
        f.write("\n")
        if durable:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)
    if durable:
        # The rename itself (and the shard renames before it) must reach the disk too.
        folder = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)


def load_progress(out_prefix: str) -> Optional[dict]:
    path = progress_path(out_prefix)
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            state = json.load(f)
    except (OSError, ValueError) as err:
        raise DataError(f"cannot read the progress file {path!r} ({err}); rerun with --overwrite to start over") from err
    if state.get("format") != PROGRESS_FORMAT or state.get("version") != PROGRESS_VERSION:
        raise DataError(f"{path!r} is not a progress file of this tool version; rerun with --overwrite to start over")
    return state


def commit_progress(out_prefix: str, state: dict, durable: bool = True) -> None:
    state = dict(state, format=PROGRESS_FORMAT, version=PROGRESS_VERSION)
    write_json_atomic(progress_path(out_prefix), state, durable)


def remove_progress(out_prefix: str) -> None:
    try:
        os.remove(progress_path(out_prefix))
    except FileNotFoundError:
        pass
