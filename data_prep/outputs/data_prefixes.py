"""Data prefixes for training: how ``data.train`` / ``data.valid`` entries become shards.

A *data prefix* given to training can be:

* a megatron prefix ``P`` with ``P.bin`` / ``P.idx``: used as is;
* a prefix ``P`` with ``P.manifest.json`` (or that file's path): all shards it
  lists, each with its token count (so a blend can weight them by size).

``resolve_data_prefix`` implements this; ``pretrain/data.py`` uses it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

from data_prep.errors import DataError
from data_prep.outputs.manifest import MANIFEST_SUFFIX, Manifest, RunManifest, ShardRecord, manifest_path, read_manifest


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
    #: The manifest's record of the shard and the manifest's path (None for a plain prefix):
    #: what the start-up check (``megatron_shards.check_shard``) compares the files with.
    record: Optional[ShardRecord] = None
    manifest: Optional[str] = None


def manifest_shards(path: str, manifest: Manifest) -> list[Shard]:
    """All shards a manifest lists, in order."""
    folder = os.path.dirname(path)
    return [Shard(os.path.join(folder, shard.prefix), shard.documents, shard.tokens, shard, path)
            for g in manifest.groups for shard in g.shards]


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
    manifest = read_manifest(path)
    if not manifest.complete:
        raise DataError(f"{path!r} describes an unfinished run; finish it (rerun its command) first")
    splits = sorted({g.split or "" for g in manifest.groups})
    if len(splits) > 1:
        folder = os.path.dirname(path)
        split_prefixes = manifest.split_prefixes if isinstance(manifest, RunManifest) else {}
        prefixes = ", ".join(os.path.join(folder, p) for p in split_prefixes.values())
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
