"""Train / val / test assignment of documents by fraction.

A document's split is a function of its text alone (a keyed hash of its
UTF-8 bytes), not of its position: the assignment is the same whatever the
worker count or chunking, and exact duplicates always land in the same split,
so a validation set cannot contain verbatim copies of training documents.
The fractions hold in expectation (each document is an independent draw).
"""

from __future__ import annotations

import hashlib

TRAIN, VAL, TEST = "train", "val", "test"
SPLITS = (TRAIN, VAL, TEST)

_SCALE = float(1 << 64)


class SplitAssigner:
    """Maps a document's UTF-8 bytes to "train", "val" or "test"."""

    def __init__(self, val_fraction: float, test_fraction: float, seed: int) -> None:
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        # blake2b's key makes the assignment seed-dependent; 8 bytes of hash
        # give a uniform draw with far more resolution than any fraction needs.
        self._key = seed.to_bytes(8, "little", signed=True)

    def draw(self, utf8: bytes) -> float:
        digest = hashlib.blake2b(utf8, digest_size=8, key=self._key).digest()
        return int.from_bytes(digest, "little") / _SCALE

    def __call__(self, utf8: bytes) -> str:
        u = self.draw(utf8)
        if u < self.val_fraction:
            return VAL
        if u < self.val_fraction + self.test_fraction:
            return TEST
        return TRAIN
