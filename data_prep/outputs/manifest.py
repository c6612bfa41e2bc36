"""The manifest schema: what a run produced, as typed records, and its file on disk.

``<OUT>.manifest.json`` (the *run manifest*, ``RunManifest``) is written last, once every shard
is final, so its presence means the output is complete. It records the inputs (sizes, sha256),
the tokenizer (identity, sha256), per-shard, per-group and per-subset document and token
counts, skipped records by reason with their first locations, damaged inputs, the tool
version, options and wall time. When a run has several groups (splits, subsets), each group
prefix (and, with subsets, each split) also gets a smaller *part manifest*
``<OUT>_<group>.manifest.json`` (``PartManifest``) listing its shards.

Every record here is a ``JsonRecord``: ``to_dict()`` gives its JSON object (one key per
field, in field order, which is the order written) and ``from_dict()`` reads one back; every
writer and reader of a manifest goes through them. Shard prefixes are
relative to the manifest's folder, so an output folder can be moved as a whole. How training
turns a prefix into shards is ``data_prefixes``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Optional, Union

from data_prep.errors import DataError
from data_prep.outputs.atomic_json import write_json_atomic

MANIFEST_SUFFIX = ".manifest.json"
MANIFEST_FORMAT = "mesh-data-manifest"
MANIFEST_VERSION = 1


class JsonRecord:
    """A dataclass stored as a JSON object: one key per field, in field order.

    ``KEYS`` names the JSON key of a field where the two differ (``set``, ``class``).
    ``RECORDS`` names the record type of fields that hold records (one, or a list).
    ``OPTIONAL`` fields are left out of the object while None.
    """

    KEYS: ClassVar[dict[str, str]] = {}
    RECORDS: ClassVar[dict[str, type]] = {}
    OPTIONAL: ClassVar[tuple[str, ...]] = ()

    def to_dict(self) -> dict:
        data = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None and f.name in self.OPTIONAL:
                continue
            data[self.KEYS.get(f.name, f.name)] = _plain(value)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> Any:
        values = {}
        for f in fields(cls):
            key = cls.KEYS.get(f.name, f.name)
            value = data.get(key) if f.name in cls.OPTIONAL else data[key]
            record = cls.RECORDS.get(f.name)
            if record is not None:
                value = [record.from_dict(v) for v in value] if isinstance(value, list) else record.from_dict(value)
            values[f.name] = value
        return cls(**values)


def _plain(value: Any) -> Any:
    if isinstance(value, JsonRecord):
        return value.to_dict()
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


@dataclass
class ShardRecord(JsonRecord):
    """One finished shard (``OpenShard.finalize``), in a group's list of shards."""

    prefix: str  # relative to the manifest's folder
    documents: int
    tokens: int
    bin_bytes: int
    bin_sha256: str
    idx_sha256: str


@dataclass
class GroupRecord(JsonRecord):
    """One output prefix (``outputs.groups``) with its shards."""

    KEYS = {"subset": "set"}
    RECORDS = {"shards": ShardRecord}

    name: str
    split: Optional[str]
    subset: Optional[str]
    prefix: str
    documents: int
    tokens: int
    shards: list[ShardRecord]


@dataclass
class InputRecord(JsonRecord):
    """One input of a run: identity, what it held, and what became of it."""

    OPTIONAL = ("hf",)

    path: str
    format: str
    split: Optional[str]
    size: Optional[int]
    sha256: Optional[str]
    records: int
    documents: int
    tokens: int
    skipped: int
    chunks: int
    #: The reader's damage report (error and where it stopped), None for an intact input.
    damaged: Optional[dict]
    #: A Hugging Face dataset's identity (``HFDatasetInput.identity``); absent for files.
    hf: Optional[dict] = None


@dataclass
class SubsetRecord(JsonRecord):
    """Counts of one (split, subset name) pair, whether or not the output is split by subset."""

    KEYS = {"subset": "set"}

    split: Optional[str]
    subset: str
    documents: int
    tokens: int
    text_bytes: int


@dataclass
class Totals(JsonRecord):
    records: int
    documents: int
    tokens: int
    text_bytes: int
    skipped: int
    input_bytes: int
    shards: int


@dataclass
class Session(JsonRecord):
    """One session of a run (a start, or a resume); kept in the progress file and the manifest."""

    started: str  # ISO time, UTC
    seconds: float
    workers: int
    resumed_at_chunk: Optional[int]


@dataclass
class ToolVersions(JsonRecord):
    """What wrote the output: this tool and the libraries that decide its bytes."""

    name: str
    version: Optional[str]
    sentencepiece: Optional[str]
    tokenizers: Optional[str]
    megatron_core: Optional[str]
    python: str


@dataclass(kw_only=True)
class TokenizerRecord(JsonRecord):
    """The tokenizer (``Tokenizer.describe()``, with its absolute path) and the token dtype.

    Back-end specific construction arguments (a tokenizer.json's ``eod_token`` and
    ``pad_token``) are kept in ``extra`` and written between ``pad`` and ``dtype``.
    """

    KEYS = {"tokenizer_class": "class"}

    name: str
    tokenizer_class: str
    path: str
    sha256: str
    vocab_size: int
    eod: int
    pad: int
    extra: dict = field(default_factory=dict)
    dtype: str

    def to_dict(self) -> dict:
        data = super().to_dict()
        dtype = data.pop("dtype")
        data.update(data.pop("extra"))
        data["dtype"] = dtype
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "TokenizerRecord":
        known = {cls.KEYS.get(f.name, f.name) for f in fields(cls)}
        extra = {k: v for k, v in data.items() if k not in known}
        return super().from_dict(dict(data, extra=extra))


@dataclass(kw_only=True)
class PartManifest(JsonRecord):
    """``<group prefix>.manifest.json``: the shards of one group, or of one split's groups."""

    RECORDS = {"tool": ToolVersions, "tokenizer": TokenizerRecord, "groups": GroupRecord}

    format: str = MANIFEST_FORMAT
    version: int = MANIFEST_VERSION
    kind: str = "part"
    complete: bool = True
    run_manifest: str  # file name of the run manifest, in the same folder
    prefix: str
    tool: ToolVersions
    tokenizer: TokenizerRecord
    dtype: str
    documents: int
    tokens: int
    groups: list[GroupRecord]


@dataclass(kw_only=True)
class RunManifest(JsonRecord):
    """``<OUT>.manifest.json``: everything about one run (see the module docstring)."""

    RECORDS = {"tool": ToolVersions, "sessions": Session, "tokenizer": TokenizerRecord, "totals": Totals,
               "groups": GroupRecord, "subsets": SubsetRecord, "inputs": InputRecord}

    format: str = MANIFEST_FORMAT
    version: int = MANIFEST_VERSION
    kind: str = "run"
    complete: bool = True
    prefix: str
    tool: ToolVersions
    created: str  # ISO time the run ended, UTC
    wall_seconds: float
    sessions: list[Session]
    command: Optional[list]
    #: Every option of the run (``TokenizeOptions``) and whether it was split into train/val/test.
    options: dict
    tokenizer: TokenizerRecord
    dtype: str
    totals: Totals
    split_prefixes: dict  # split -> prefix
    groups: list[GroupRecord]
    subsets: list[SubsetRecord]
    sets_merged_into_other: list
    #: ``SkipLog.as_dict()``: total, by_reason, examples.
    skipped: dict
    #: One per damaged input: its path and the reader's damage report.
    damaged_inputs: list
    inputs: list[InputRecord]
    part_manifests: list
    #: What a rerun must match: input identities, tokenizer, output-affecting options.
    fingerprint: dict


Manifest = Union[RunManifest, PartManifest]


def manifest_path(prefix: str) -> str:
    return prefix + MANIFEST_SUFFIX


def write_manifest(path: str, manifest: Manifest) -> None:
    write_json_atomic(path, manifest.to_dict())


def load_manifest(path: str) -> dict:
    """A manifest file as its JSON object, after checking it is one this tool can read."""
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, ValueError) as err:
        raise DataError(f"cannot read manifest {path!r} ({err})") from err
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise DataError(f"{path!r} is not a mesh data manifest")
    if manifest.get("version", 0) > MANIFEST_VERSION:
        raise DataError(f"{path!r} was written by a newer version of this tool (manifest version {manifest['version']})")
    return manifest


def manifest_from_dict(data: dict) -> Manifest:
    """The typed manifest for a manifest's JSON object: a run or a part manifest, by its ``kind``."""
    return PartManifest.from_dict(data) if data["kind"] == "part" else RunManifest.from_dict(data)


def read_manifest(path: str) -> Manifest:
    """``load_manifest`` as a typed ``RunManifest`` or ``PartManifest``."""
    try:
        return manifest_from_dict(load_manifest(path))
    except (KeyError, TypeError) as err:
        raise DataError(f"cannot read manifest {path!r} (it lacks {err})") from err


def output_files(path: str, manifest: Manifest) -> list[str]:
    """Every file a manifest accounts for (shards, part manifests, the manifest itself)."""
    folder = os.path.dirname(path)
    files = []
    for g in manifest.groups:
        for shard in g.shards:
            base = os.path.join(folder, shard.prefix)
            files += [base + ".bin", base + ".idx"]
    for part in (manifest.part_manifests if isinstance(manifest, RunManifest) else []):
        files.append(os.path.join(folder, part))
    files.append(path)
    return files
