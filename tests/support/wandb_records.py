"""Reading an offline wandb run file (``run-<id>.wandb``) back, with wandb's own record schema.

wandb >= 0.2x writes its runs from a Go core and no longer ships a Python reader. The file is a
LevelDB-style log: a 7-byte header (":W&B", magic 0xBEE1, version), then 32 KiB blocks of records,
each with a 7-byte header (CRC, little-endian length, type: 1 full, 2 first, 3 middle, 4 last);
each full record is one ``wandb_internal_pb2.Record`` protobuf.
"""

from __future__ import annotations

import json
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
        payload = data[offset + HEADER: offset + HEADER + length]
        offset += HEADER + length
        pending = payload if kind in (1, 2) else pending + payload
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record
            pending = b""


def read_run(run_dir: Path) -> dict:
    """{"history": [{key: value} per logged row], "config": {key: value}} of the one offline run in
    ``<run_dir>/wandb``."""
    files = sorted((Path(run_dir) / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1, files
    history, config = [], {}
    for record in records(files[0]):
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
