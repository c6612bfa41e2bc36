"""The progress file: the last committed state of a run, from which it resumes.

``<out>.progress.json`` exists only while a run is unfinished. Each commit
replaces it atomically (write a temporary file, fsync, rename), so after a
crash it holds one complete, consistent state (``ProgressState``): the next
chunk to process, every finished shard, the size of every open shard, and all
counts so far. Anything written to the shards after that commit is cut back on
resume (``megatron_shards.OpenShard.restore``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Optional

from data_prep.errors import DataError
from data_prep.outputs.atomic_json import write_json_atomic
from data_prep.outputs.manifest import JsonRecord, Session, ShardRecord

PROGRESS_SUFFIX = ".progress.json"
PROGRESS_FORMAT = "mesh-data-progress"
PROGRESS_VERSION = 1


@dataclass
class OpenShardState(JsonRecord):
    """The shard a group is writing, at the size of the commit."""

    prefix: str  # relative to the output folder
    documents: int
    tokens: int


@dataclass
class GroupState(JsonRecord):
    """One output group: its finished shards and its open one."""

    KEYS = {"subset": "set"}
    RECORDS = {"shards": ShardRecord, "open": OpenShardState}

    prefix: str  # relative to the output folder
    split: Optional[str]
    subset: Optional[str]
    shards: list[ShardRecord]
    open: OpenShardState


@dataclass
class FinishedInput(JsonRecord):
    """An input read to its end: the reader's summary and its chunk count."""

    records: int
    damaged: Optional[dict]
    sha256: Optional[str]
    chunks: int


@dataclass
class ProgressState:
    """Everything a commit records; JSON keys in this order, then ``format`` and ``version``."""

    fingerprint: dict
    phase: str  # "running", or "finalized" once the last shards are renamed into place
    next_chunk: int
    finished_inputs: dict[int, FinishedInput]
    input_counts: dict[int, list]  # input index -> [records, documents, tokens]
    groups: dict[str, GroupState]
    split_prefixes: dict
    skips: dict  # SkipLog.as_dict()
    counts: list  # [split, subset label, documents, tokens, text bytes] rows
    table: dict  # GroupTable.state()
    sessions: list[Session]

    def to_dict(self) -> dict:
        return {
            "fingerprint": self.fingerprint,
            "phase": self.phase,
            "next_chunk": self.next_chunk,
            "finished_inputs": {str(k): v.to_dict() for k, v in self.finished_inputs.items()},
            "input_counts": {str(k): v for k, v in self.input_counts.items()},
            "groups": {name: g.to_dict() for name, g in self.groups.items()},
            "split_prefixes": self.split_prefixes,
            "skips": self.skips,
            "counts": self.counts,
            "table": self.table,
            "sessions": [s.to_dict() for s in self.sessions],
            "format": PROGRESS_FORMAT,
            "version": PROGRESS_VERSION,
        }

    @classmethod
    def from_dict(cls, data: dict) -> "ProgressState":
        return cls(
            fingerprint=data["fingerprint"], phase=data["phase"], next_chunk=data["next_chunk"],
            finished_inputs={int(k): FinishedInput.from_dict(v) for k, v in data["finished_inputs"].items()},
            input_counts={int(k): v for k, v in data["input_counts"].items()},
            groups={name: GroupState.from_dict(g) for name, g in data["groups"].items()},
            split_prefixes=data["split_prefixes"], skips=data["skips"], counts=data["counts"], table=data["table"],
            sessions=[Session.from_dict(s) for s in data["sessions"]],
        )


def progress_path(out_prefix: str) -> str:
    return out_prefix + PROGRESS_SUFFIX


def load_progress(out_prefix: str) -> Optional[ProgressState]:
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
    try:
        return ProgressState.from_dict(state)
    except (KeyError, TypeError, ValueError) as err:
        raise DataError(f"cannot read the progress file {path!r} (it lacks {err}); "
                        "rerun with --overwrite to start over") from err


def commit_progress(out_prefix: str, state: ProgressState, durable: bool = True) -> None:
    write_json_atomic(progress_path(out_prefix), state.to_dict(), durable)


def remove_progress(out_prefix: str) -> None:
    try:
        os.remove(progress_path(out_prefix))
    except FileNotFoundError:
        pass
