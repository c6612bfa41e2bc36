"""Output groups: which prefix a document is written to.

A group is one output prefix with its own shards: the whole output, or one
split (``--val-fraction``, ``--val-input``), or one subset (``--split-by-set``),
or one subset of one split. For output prefix ``OUT``::

    no split, no --split-by-set   OUT                  shards OUT_00000, OUT_00001, ...
    splits                        OUT_train, OUT_val, OUT_test
    --split-by-set                OUT_Pile-CC, OUT_Github, ...
    both                          OUT_train_Pile-CC, OUT_val_Pile-CC, ...

(Without ``--shard-size`` each group is a single shard named after the group
itself, e.g. ``OUT.bin``.) Subset names are made safe for file names
(``"Wikipedia (en)"`` -> ``Wikipedia_en``); the mapping is recorded in the
manifest. The table is part of a run's committed state, so a resumed run names
groups exactly as the first session did.
"""

from __future__ import annotations

import re
from typing import Optional

#: Group / subset names for documents without a subset name, and for subsets
#: beyond ``max_sets`` (a mis-set --set-key could otherwise open one group per
#: document).
UNLABELLED = "unlabelled"
OTHER_SETS = "other-sets"
#: Display names in per-subset counts.
UNLABELLED_LABEL = "(no set name)"
OTHER_LABEL = "(other sets)"
#: Raw subset names remembered for the "(other sets)" group.
MAX_MERGED_NAMES = 100


def safe_name(name: str) -> str:
    """A subset name as a file-name part: letters, digits, '.' and '-', other runs -> '_'."""
    return re.sub(r"[^A-Za-z0-9.\-]+", "_", name).strip("_") or "unnamed"


class GroupTable:
    def __init__(self, out_prefix: str, by_set: bool, max_sets: int, state: Optional[dict] = None) -> None:
        self.out_prefix = out_prefix
        self.by_set = by_set
        self.max_sets = max_sets
        state = state or {}
        #: raw subset name -> safe name, in order of first appearance.
        self.safe: dict[str, str] = dict(state.get("safe_names", {}))
        #: The first MAX_MERGED_NAMES raw names that went to OTHER_SETS.
        self.merged: list[str] = list(state.get("merged_names", []))
        self._used = set(self.safe.values()) | {UNLABELLED, OTHER_SETS}

    def state(self) -> dict:
        return {"safe_names": self.safe, "merged_names": self.merged}

    def _known(self, raw: str) -> bool:
        if raw in self.safe:
            return True
        if len(self.safe) >= self.max_sets:
            return False
        name = base = safe_name(raw)
        n = 2
        while name in self._used:
            name = f"{base}-{n}"
            n += 1
        self.safe[raw] = name
        self._used.add(name)
        return True

    def subset(self, raw: Optional[str]) -> tuple[str, str]:
        """(safe name, display label) of a document's subset."""
        if raw is None:
            return UNLABELLED, UNLABELLED_LABEL
        if self._known(raw):
            return self.safe[raw], raw
        if len(self.merged) < MAX_MERGED_NAMES and raw not in self.merged:
            self.merged.append(raw)
        return OTHER_SETS, OTHER_LABEL

    def group(self, split: Optional[str], raw_set: Optional[str]) -> str:
        """The group name ("all", "train", "Pile-CC", "train/Pile-CC") of a document."""
        parts = [split] if split else []
        if self.by_set:
            parts.append(self.subset(raw_set)[0])
        return "/".join(parts) or "all"

    def prefix(self, group: str) -> str:
        if group == "all":
            return self.out_prefix
        return self.out_prefix + "".join("_" + part for part in group.split("/"))
