"""Reading an offline wandb run file (``run-<id>.wandb``) back, with wandb's own record schema.

wandb >= 0.2x writes its runs from a Go core and no longer ships a Python reader. The file is a
LevelDB-style log: a 7-byte header (":W&B", magic 0xBEE1, version), then 32 KiB blocks of records,
each with a 7-byte header (CRC, little-endian length, type: 1 full, 2 first, 3 middle, 4 last);
each full record is one ``wandb_internal_pb2.Record`` protobuf.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

BLOCK = 32 * 1024
HEADER = 7


def records(path: Path):
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path}: not a wandb run file"
    offset, pending = HEADER, b""
    while offset + HEADER <= len(data):
        room = BLOCK - offset % BLOCK
        if room < HEADER:  # the block's zero-padded tail
            offset += room
            continue
        length = int.from_bytes(data[offset + 4: offset + 6], "little")
        kind = data[offset + 6]
        if kind == 0 and length == 0:
            offset += room
            continue
        if offset + HEADER + length > len(data):  # still being written
            return
        payload = data[offset + HEADER: offset + HEADER + length]
        offset += HEADER + length
        pending = payload if kind in (1, 2) else pending + payload
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record
            pending = b""


def read_run(run_dir: Path, timeout_s: float = 30.0) -> dict:
    """{"history": [{key: value} per logged row], "config": {key: value}} of the one offline run in
    ``<run_dir>/wandb``.

    wandb's core service writes the file in its own process, and ``run.finish()`` can return
    before the last records are on disk (measured: within the same second), so this waits for
    the run's final "exit" record."""
    files = sorted((Path(run_dir) / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1, files
    deadline = time.monotonic() + timeout_s
    while True:
        found = list(records(files[0]))
        if any(r.WhichOneof("record_type") == "exit" for r in found):
            break
        assert time.monotonic() < deadline, f"{files[0]}: no exit record after {timeout_s} s"
        time.sleep(0.2)
    history, config = [], {}
    for record in found:
        kind = record.WhichOneof("record_type")
        if kind == "history":
            history.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                            for item in record.history.item})
        elif kind == "config":
            for item in record.config.update:
                config[item.key] = json.loads(item.value_json)
        elif kind == "run":
            for item in record.run.config.update:
                config[item.key] = json.loads(item.value_json)
    return {"history": history, "config": config}
