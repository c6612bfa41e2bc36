"""Manifests: what a run produced, and how training finds all shards of a prefix.

``<OUT>.manifest.json`` (the *run manifest*) is written last, once every shard
is final, so its presence means the output is complete. It records the inputs
(sizes, sha256), the tokenizer (identity, sha256), per-shard, per-group and
per-subset document and token counts, skipped records by reason with their
first locations, damaged inputs, the tool version, options and wall time.
When a run has several groups (splits, subsets), each group prefix also gets
a small *group manifest* ``<OUT>_<group>.manifest.json`` listing its shards.

A *data prefix* given to training (``data.train``) can therefore be:

* a megatron prefix ``P`` with ``P.bin`` / ``P.idx``: used as is;
* a prefix ``P`` with ``P.manifest.json`` (or that file's path): all shards it
  lists, each with its token count (so a blend can weight them by size).

``resolve_data_prefix`` implements this; ``pretrain/data.py`` uses it.
Shard prefixes in a manifest are relative to the manifest's folder, so an
output folder can be moved as a whole.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Optional

from data_prep.errors import DataError
from data_prep.journal import write_json_atomic

MANIFEST_SUFFIX = ".manifest.json"
MANIFEST_FORMAT = "mesh-data-manifest"
MANIFEST_VERSION = 1


def manifest_path(prefix: str) -> str:
    return prefix + MANIFEST_SUFFIX


def write_manifest(path: str, manifest: dict) -> None:
    write_json_atomic(path, manifest)


def load_manifest(path: str) -> dict:
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


def find_manifest(entry: str) -> Optional[str]:
    """The manifest file an entry names (the file itself, or ``entry + .manifest.json``), or None."""
    if entry.endswith(MANIFEST_SUFFIX) and os.path.isfile(entry):
        return entry
    if os.path.isfile(manifest_path(entry)):
        return manifest_path(entry)
    return None


@dataclass
class Shard:
    prefix: str  # usable path (joined with the manifest's folder)
    documents: Optional[int]
    tokens: Optional[int]


def manifest_shards(path: str, manifest: Optional[dict] = None, group: Optional[str] = None) -> list[Shard]:
    """All shards a manifest lists (of one group, if given), in order."""
    manifest = manifest or load_manifest(path)
    folder = os.path.dirname(path)
    shards = []
    for g in manifest["groups"]:
        if group is not None and g["name"] != group:
            continue
        for shard in g["shards"]:
            shards.append(Shard(os.path.join(folder, shard["prefix"]), shard["documents"], shard["tokens"]))
    return shards


def resolve_data_prefix(entry: str) -> list[Shard]:
    """The shards behind one data prefix (see the module docstring).

    An entry with neither a manifest nor a .bin comes back unchanged, so the
    caller's own existence check reports it. A run manifest that holds more
    than one split is refused: training on it would mix validation into
    training data.
    """
    path = find_manifest(entry)
    has_bin = os.path.isfile(entry + ".bin")
    if path is None:
        return [Shard(entry, None, None)]
    manifest = load_manifest(path)
    if not manifest.get("complete", False):
        raise DataError(f"{path!r} describes an unfinished run; finish it (rerun its command) first")
    splits = sorted({g.get("split") or "" for g in manifest["groups"]})
    if len(splits) > 1:
        folder = os.path.dirname(path)
        prefixes = ", ".join(os.path.join(folder, p) for p in manifest.get("split_prefixes", {}).values())
        raise DataError(
            f"{entry!r} holds the splits {', '.join(s or 'none' for s in splits)}; "
            f"name one split's prefix instead: {prefixes}"
        )
    shards = manifest_shards(path, manifest)
    if has_bin and [s.prefix for s in shards] != [entry]:
        raise DataError(
            f"{entry!r} is ambiguous: both {entry}.bin and {path} exist and differ; remove the stale one"
        )
    if not shards:
        raise DataError(f"{path!r} lists no shards (the run kept no documents)")
    return shards


def output_files(path: str, manifest: dict) -> list[str]:
    """Every file a run manifest accounts for (shards, group manifests, the manifest itself)."""
    folder = os.path.dirname(path)
    files = []
    for g in manifest.get("groups", []):
        for shard in g["shards"]:
            base = os.path.join(folder, shard["prefix"])
            files += [base + ".bin", base + ".idx"]
    for part in manifest.get("part_manifests", []):
        files.append(os.path.join(folder, part))
    files.append(path)
    return files
