"""Reading documents one by one, in a single process (tokenizer training, tests).

The parallel tokenizer goes through ``tokenization.plan`` / ``tokenization.encode``;
this is the same chunk readers and the same record validation, consumed serially: every input format
(JSON lines plain / .zst / .gz, parquet), files, directories or globs, bad
records counted per reason, damaged compressed files read up to the damage.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Optional, Sequence

from data_prep.inputs.chunk_readers import chunk_documents, open_reader
from data_prep.inputs.discovery import InputFile, resolve_files
from data_prep.inputs.records import DEFAULT_MAX_DOCUMENT_BYTES
from data_prep.inputs.skips import SkipLog

#: Chunking is irrelevant when reading serially; any size works.
_CHUNK_BYTES = 1 << 20


@dataclass
class ReadStats:
    """Counts gathered while reading; shared across all files of one read."""

    documents: int = 0
    text_bytes: int = 0
    skipped: Counter = field(default_factory=Counter)
    #: One entry per damaged input: {"path", "error", ...}.
    damaged: list = field(default_factory=list)
    log: SkipLog = field(default_factory=SkipLog)

    @property
    def skipped_total(self) -> int:
        return sum(self.skipped.values())


def check_input_files(paths: Iterable[str | os.PathLike]) -> list[InputFile]:
    """Resolve files, directories and globs up front (DataError on the first bad one)."""
    from data_prep.errors import DataError

    paths = list(paths)
    if not paths:
        raise DataError("no input files given; pass one or more .jsonl, .jsonl.zst, .jsonl.gz or .parquet files")
    return resolve_files(paths)


def iter_documents(
    paths: Sequence[str | os.PathLike],
    text_key: str = "text",
    stats: Optional[ReadStats] = None,
    set_key: str = "meta.pile_set_name",
    max_document_bytes: int = DEFAULT_MAX_DOCUMENT_BYTES,
) -> Iterator[tuple[str, Optional[str]]]:
    """Yield ``(text, subset name)`` for every good document, file by file.

    The subset name is None when a record has none. Pass a ``ReadStats`` to
    receive the counts; it fills in as the generator advances.
    """
    inputs = check_input_files(paths)
    if stats is None:
        stats = ReadStats()
    for item in inputs:
        reader = open_reader(item, _CHUNK_BYTES, max_document_bytes, text_key, set_key)
        for chunk in reader:
            chunk.label = item.label
            log = SkipLog()
            for text, utf8, set_name in chunk_documents(chunk, text_key, set_key, max_document_bytes, log):
                stats.documents += 1
                stats.text_bytes += len(utf8)
                yield text, set_name
            stats.skipped.update(log.counts)
            stats.log.merge(log)
        if reader.summary.get("damaged"):
            stats.damaged.append(dict(path=item.path, **reader.summary["damaged"]))


class DocumentReader:
    """Iterable over documents of several inputs, keeping its ``stats``.

    ::

        reader = DocumentReader(["a.jsonl.zst"])
        for text, set_name in reader:
            ...
        print(reader.stats.skipped)
    """

    def __init__(self, paths: Sequence[str | os.PathLike], text_key: str = "text") -> None:
        self.paths = list(paths)
        check_input_files(self.paths)
        self.text_key = text_key
        self.stats = ReadStats()

    def __iter__(self) -> Iterator[tuple[str, Optional[str]]]:
        # A fresh ReadStats per pass, so iterating twice does not double count.
        self.stats = ReadStats()
        return iter_documents(self.paths, self.text_key, self.stats)
