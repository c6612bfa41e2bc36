"""Streaming reader for Pile-style JSON-lines documents (.jsonl and .jsonl.zst).

One line is one document: ``{"text": ..., "meta": {"pile_set_name": ...}}``.
Files are read line by line through a streaming zstd decompressor, so memory is
bounded by the longest line, never by the file size: the real Pile shards are
tens of GB each.

Bad lines are counted per reason and skipped. The reasons and the policy live
in one place (``SkipReason`` and ``ReadStats.record_skip``), so a stricter
policy (a maximum bad-line fraction, raising on the first error, logging the
offending line numbers) can be added later without touching the callers.
"""

from __future__ import annotations

import io
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import BinaryIO, Iterable, Iterator, Sequence

from data_prep.errors import DataError

#: File name endings the reader accepts, longest first so ".jsonl.zst" wins.
SUPPORTED_SUFFIXES = (".jsonl.zst", ".jsonl")


class SkipReason:
    """Why a line was skipped. Plain strings so the counts serialise to JSON."""

    BLANK_LINE = "blank_line"
    INVALID_UTF8 = "invalid_utf8"
    MALFORMED_JSON = "malformed_json"
    NOT_AN_OBJECT = "not_an_object"
    MISSING_TEXT = "missing_text"
    TEXT_NOT_STRING = "text_not_string"
    EMPTY_TEXT = "empty_text"


@dataclass
class ReadStats:
    """Counts gathered while reading; shared across all files of one read."""

    documents: int = 0
    text_bytes: int = 0
    skipped: Counter = field(default_factory=Counter)

    def record_skip(self, reason: str) -> None:
        # The single place where the bad-line policy lives. For now: count and
        # move on. A later hardening pass can raise here past a threshold.
        self.skipped[reason] += 1

    @property
    def skipped_total(self) -> int:
        return sum(self.skipped.values())

    def as_dict(self) -> dict:
        return {
            "documents": self.documents,
            "text_bytes": self.text_bytes,
            "skipped": dict(sorted(self.skipped.items())),
        }


def check_input_files(paths: Iterable[str | os.PathLike]) -> list[str]:
    """Validate input paths up front so a typo fails before hours of work.

    Returns the paths as strings. Raises DataError for an empty list, a missing
    file, or an unsupported file type.
    """
    paths = [os.fspath(p) for p in paths]
    if not paths:
        raise DataError("no input files given; pass one or more .jsonl or .jsonl.zst files")
    for path in paths:
        if not path.endswith(SUPPORTED_SUFFIXES):
            raise DataError(
                f"unsupported input file {path!r}: expected a .jsonl or .jsonl.zst file"
            )
        if not os.path.isfile(path):
            raise DataError(f"input file {path!r} does not exist; check the path")
    return paths


def _open_binary_lines(path: str) -> tuple[BinaryIO, BinaryIO]:
    """Open ``path`` as a buffered binary stream of (decompressed) lines.

    Returns (stream, raw file) so the caller can close both.
    """
    raw = open(path, "rb")
    if not path.endswith(".zst"):
        return raw, raw
    import zstandard  # imported here: plain .jsonl reading must not need it

    # read_across_frames: files made by concatenating .zst files (common when
    # shards are appended to) hold several frames; without it only the first
    # frame would be read and the rest silently dropped.
    reader = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
    # BufferedReader gives us efficient readline() over the decompressor with a
    # fixed-size buffer, which is what keeps memory bounded.
    return io.BufferedReader(reader, buffer_size=1 << 20), raw


def _parse_line(line: bytes, text_key: str, stats: ReadStats) -> tuple[str, str | None] | None:
    """Turn one raw line into (text, pile_set_name), or record why not."""
    if not line.strip():
        stats.record_skip(SkipReason.BLANK_LINE)
        return None
    try:
        decoded = line.decode("utf-8")
    except UnicodeDecodeError:
        stats.record_skip(SkipReason.INVALID_UTF8)
        return None
    try:
        record = json.loads(decoded)
    except json.JSONDecodeError:
        stats.record_skip(SkipReason.MALFORMED_JSON)
        return None
    if not isinstance(record, dict):
        stats.record_skip(SkipReason.NOT_AN_OBJECT)
        return None
    if text_key not in record:
        stats.record_skip(SkipReason.MISSING_TEXT)
        return None
    text = record[text_key]
    if not isinstance(text, str):
        stats.record_skip(SkipReason.TEXT_NOT_STRING)
        return None
    if not text:
        stats.record_skip(SkipReason.EMPTY_TEXT)
        return None
    meta = record.get("meta")
    set_name = meta.get("pile_set_name") if isinstance(meta, dict) else None
    return text, set_name


def iter_documents(
    paths: Sequence[str | os.PathLike],
    text_key: str = "text",
    stats: ReadStats | None = None,
) -> Iterator[tuple[str, str | None]]:
    """Yield ``(text, pile_set_name)`` for every good document, file by file.

    ``pile_set_name`` is None when the line has no ``meta.pile_set_name``.
    Pass a ``ReadStats`` to receive the document and skip counts; it is filled
    in as the generator advances, so read it after the loop.
    """
    paths = check_input_files(paths)
    if stats is None:
        stats = ReadStats()
    for path in paths:
        stream, raw = _open_binary_lines(path)
        try:
            while True:
                try:
                    line = stream.readline()
                except Exception as err:  # zstd raises its own ZstdError type
                    raise DataError(
                        f"cannot read {path!r} ({err}); the file is corrupt or truncated, "
                        "re-download or re-create it"
                    ) from err
                if not line:
                    break
                parsed = _parse_line(line, text_key, stats)
                if parsed is None:
                    continue
                stats.documents += 1
                stats.text_bytes += len(parsed[0].encode("utf-8"))
                yield parsed
        finally:
            stream.close()
            raw.close()


class DocumentReader:
    """Iterable over documents of several files, keeping its ``stats``.

    A convenience around ``iter_documents`` for callers that want the counts
    as an attribute::

        reader = DocumentReader(["a.jsonl.zst"])
        for text, set_name in reader:
            ...
        print(reader.stats.skipped)
    """

    def __init__(self, paths: Sequence[str | os.PathLike], text_key: str = "text") -> None:
        self.paths = check_input_files(paths)
        self.text_key = text_key
        self.stats = ReadStats()

    def __iter__(self) -> Iterator[tuple[str, str | None]]:
        # A fresh ReadStats per pass, so iterating twice does not double count.
        self.stats = ReadStats()
        return iter_documents(self.paths, self.text_key, self.stats)
