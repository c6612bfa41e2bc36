"""JSON files replaced atomically: a reader sees the old file or the new one, never a part.

Used for the manifests and the progress file: write a temporary file, fsync it, rename it into
place, fsync the folder (``durable``), so after a crash the file holds one complete state.
"""

from __future__ import annotations

import json
import os


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
