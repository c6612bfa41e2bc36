"""Streaming readers: one input -> a sequence of chunks of raw records.

A chunk is the unit of parallel work: a run of consecutive records of one
input, about ``chunk_bytes`` big. Where chunks begin and end depends only on
the input's content and the chunking options (never on timing or the number
of workers), which is what makes the output independent of ``--workers`` and
lets a resumed run find exactly the chunk it stopped at. Compressed streams
cannot seek, so a resumed run re-reads the current file from its start and
skips the chunks already done; finding chunk boundaries costs a scan for
newlines, no parsing.

Memory stays bounded whatever the input size: a reader holds at most one
chunk plus one record (records longer than ``max_record_bytes`` are skipped
while streaming, never held whole).

Damaged input: a truncated or corrupt .zst/.gz stream keeps everything
decoded before the damage; the reader reports the damage in ``summary`` and
flags the chunk whose last line may be cut off (``damaged_tail``).

Each reader also computes its input's sha256 (from the bytes it reads anyway,
for JSON lines), reported in ``summary`` once the input is exhausted.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import zlib
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional, Union

from data_prep.errors import DataError
from data_prep.inputs.discovery import HFDatasetInput, InputFile
from data_prep.inputs.records import check_row_text, get_field, parse_json_line
from data_prep.inputs.skips import SkipLog, SkipReason
from data_prep.tokenizer import file_sha256

#: Decompressed bytes asked for per read.
READ_BLOCK = 1 << 20
#: Compressed bytes fed to zstd per step. One step's output is this times the
#: compression ratio: ~100 KB for text (ratio 3-10), at most 256 MB for
#: degenerate input (zstd's run-length blocks reach 32768:1). Smaller steps
#: cost Python calls: at 8 KiB, a few minutes over all of the Pile.
ZSTD_RAW_BLOCK = 8 << 10
#: Rows per batch read from parquet files and Hugging Face datasets.
ROW_BATCH = 1024
#: Chunk-size accounting for a row whose text is not a string, so a column of
#: nulls still makes bounded chunks.
NON_TEXT_ROW_BYTES = 16


@dataclass
class Chunk:
    """Consecutive records of one input. Sent to a worker, so plain picklable data."""

    kind: str  # "lines" (payload: bytes of whole lines) or "rows" (payload: [(value, found, set value)])
    payload: Union[bytes, list]
    first_record: int  # lines: 1-based line number; rows: 0-based row index
    n_records: int
    end_offset: int  # input bytes consumed once this chunk is read (for progress)
    damaged_tail: bool = False
    #: Lines the reader dropped while streaming (too large to hold): line
    #: number -> (reason, detail). Each left an empty line in the payload.
    omitted: dict = field(default_factory=dict)
    # Set by the plan:
    index: int = -1
    input_index: int = -1
    label: str = ""
    split: Optional[str] = None

    def location(self, k: int) -> str:
        """Human location of the k-th record of this chunk."""
        if self.kind == "lines":
            return f"line {self.first_record + k}"
        return f"row {self.first_record + k}"


class _HashingFile:
    """A read-only binary file that hashes and counts the bytes read through it."""

    def __init__(self, path: str) -> None:
        self._file = open(path, "rb")
        self._sha = hashlib.sha256()
        self.position = 0

    def read(self, n: int = -1) -> bytes:
        data = self._file.read(n)
        self._sha.update(data)
        self.position += len(data)
        return data

    def readinto(self, buffer) -> int:
        n = self._file.readinto(buffer)
        if n:
            self._sha.update(memoryview(buffer)[:n])
            self.position += n
        return n

    def readable(self) -> bool:
        return True

    def finish(self) -> str:
        """Hash the rest of the file (after damage, the decoder stops early) and close."""
        while self.read(1 << 22):
            pass
        self._file.close()
        return self._sha.hexdigest()

    def close(self) -> None:
        self._file.close()


class _ZstdFrames:
    """zstd decoding frame by frame, which (unlike ``stream_reader``) notices truncation.

    ``zstandard``'s stream reader returns a clean end of stream when a file
    stops in the middle of a frame; a truncated download would then pass for a
    complete one. Here, end of file inside a frame raises ``EOFError``.
    Concatenated frames (files appended together) are all read.
    """

    def __init__(self, raw: _HashingFile) -> None:
        import zstandard

        self._raw = raw
        self._dctx = zstandard.ZstdDecompressor()
        self._frame = None
        self._leftover = b""

    def read(self, _n: int = -1) -> bytes:
        while True:
            if self._frame is None:
                data = self._leftover or self._raw.read(ZSTD_RAW_BLOCK)
                self._leftover = b""
                if not data:
                    return b""  # the file ends between frames: complete
                self._frame = self._dctx.decompressobj()
            else:
                data = self._raw.read(ZSTD_RAW_BLOCK)
                if not data:
                    raise EOFError("the file ends inside a zstd frame (truncated)")
            out = self._frame.decompress(data)
            if self._frame.eof:
                self._leftover = self._frame.unused_data
                self._frame = None
            if out:
                return out


def chunk_documents(chunk: Chunk, text_key: str, set_key: str, max_bytes: int,
                    skips: SkipLog) -> Iterator[tuple[str, bytes, Optional[str]]]:
    """Yield (text, UTF-8 bytes, subset name) for a chunk's good records, logging the rest in ``skips``."""
    if chunk.kind == "lines":
        lines = chunk.payload.split(b"\n")
        if chunk.payload.endswith(b"\n"):
            lines.pop()
        last = len(lines) - 1
        for k, line in enumerate(lines):
            number = chunk.first_record + k
            if number in chunk.omitted:
                reason, detail = chunk.omitted[number]
                skips.add(reason, chunk.label, f"line {number}", detail)
                continue
            text, utf8, set_name, problem = parse_json_line(line, text_key, set_key, max_bytes)
            if problem is not None:
                reason, detail = problem
                if k == last and chunk.damaged_tail and reason != SkipReason.DOCUMENT_TOO_LARGE:
                    reason, detail = SkipReason.TRUNCATED_RECORD, f"cut off by damage to the file ({reason})"
                skips.add(reason, chunk.label, f"line {number}", detail)
                continue
            yield text, utf8, set_name
    else:
        for k, (value, found, set_value) in enumerate(chunk.payload):
            text, utf8, set_name, problem = check_row_text(value, found, set_value, text_key, max_bytes)
            if problem is not None:
                skips.add(problem[0], chunk.label, chunk.location(k), problem[1])
                continue
            yield text, utf8, set_name


def _damage_errors() -> tuple[type[BaseException], ...]:
    import zstandard

    return (zstandard.ZstdError, EOFError, zlib.error, gzip.BadGzipFile, OSError)


class JsonLinesReader:
    """Chunks of whole lines from a .jsonl, .jsonl.zst or .jsonl.gz file."""

    def __init__(self, item: InputFile, chunk_bytes: int, max_record_bytes: int) -> None:
        self.item = item
        self.chunk_bytes = chunk_bytes
        self.max_record_bytes = max_record_bytes
        self.summary: Optional[dict] = None

    def _stream(self, raw: _HashingFile):
        if self.item.format == "jsonl.zst":
            return _ZstdFrames(raw)
        if self.item.format == "jsonl.gz":
            return gzip.GzipFile(fileobj=raw, mode="rb")
        return raw

    def __iter__(self) -> Iterator[Chunk]:
        raw = _HashingFile(self.item.path)
        completed = False
        try:
            yield from self._chunks(raw)
            completed = True
        finally:
            if completed:
                self.summary["sha256"] = raw.finish()
            else:  # abandoned early (an error elsewhere): do not read on
                raw.close()

    def _chunks(self, raw: _HashingFile) -> Iterator[Chunk]:
        stream = self._stream(raw)
        buf = bytearray()
        buf_line = 1  # line number of buf[0]
        omitted: dict[int, tuple[str, str]] = {}
        skipping: Optional[list] = None  # [line number, bytes so far] of an oversize line
        damage: Optional[dict] = None
        decoded = 0
        records = 0

        def emit(n: int, last: bool) -> Chunk:
            nonlocal buf_line, records
            payload = bytes(buf[:n])
            del buf[:n]
            lines = payload.count(b"\n") + (0 if payload.endswith(b"\n") or not payload else 1)
            mine = {k: v for k, v in omitted.items() if buf_line <= k < buf_line + lines}
            for k in mine:
                del omitted[k]
            chunk = Chunk("lines", payload, buf_line, lines, raw.position, omitted=mine,
                          damaged_tail=last and damage is not None and not payload.endswith(b"\n"))
            buf_line += lines
            records += lines
            return chunk

        def end_skip() -> None:
            nonlocal skipping
            line, size = skipping
            omitted[line] = (SkipReason.DOCUMENT_TOO_LARGE,
                             f"{size:,}+ byte line > limit {self.max_record_bytes:,} (not read)")
            buf.extend(b"\n")  # placeholder keeps line numbers right
            skipping = None

        # read1: at most one underlying read, so the data decoded just before
        # damage is returned instead of being lost with the exception.
        read_block = getattr(stream, "read1", stream.read)
        eof = False
        while not eof:
            try:
                block = read_block(READ_BLOCK)
            except _damage_errors() as err:
                damage = {"error": f"{type(err).__name__}: {err}", "decoded_bytes": decoded}
                block = b""
            if not block:
                eof = True
            decoded += len(block)
            if skipping is not None:
                newline = block.find(b"\n")
                if newline < 0:
                    skipping[1] += len(block)
                    if eof:
                        end_skip()
                    continue
                skipping[1] += newline
                block = block[newline + 1:]
                end_skip()
            buf += block
            while len(buf) >= self.chunk_bytes:
                newline = buf.find(b"\n", self.chunk_bytes - 1)
                if newline >= 0:
                    yield emit(newline + 1, last=False)
                    continue
                # The line that crosses the chunk boundary is still incomplete.
                start = buf.rfind(b"\n") + 1
                if len(buf) - start > self.max_record_bytes:
                    skipping = [buf_line + buf.count(b"\n", 0, start), len(buf) - start]
                    del buf[start:]
                    if eof:
                        end_skip()
                break
        if buf or omitted:
            yield emit(len(buf), last=True)
        if damage is not None:
            damage["at_line"] = buf_line
        self.summary = {"records": records, "damaged": damage}


class _RowReader:
    """Shared chunking for columnar inputs: rows grouped until ``chunk_bytes`` of text."""

    def __init__(self, item, chunk_bytes: int, text_key: str, set_key: str) -> None:
        self.item = item
        self.chunk_bytes = chunk_bytes
        self.text_key = text_key
        self.set_key = set_key
        self.summary: Optional[dict] = None

    def _row_dicts(self) -> Iterator[list[dict]]:
        raise NotImplementedError

    def _sha256(self) -> Optional[str]:
        raise NotImplementedError

    def _progress(self, rows_done: int) -> int:
        return 0

    def __iter__(self) -> Iterator[Chunk]:
        sha256 = self._sha256()
        rows: list = []
        size = 0
        first = 0
        damage = None
        total = 0
        try:
            for batch in self._row_dicts():
                for row in batch:
                    found, value = get_field(row, self.text_key)
                    rows.append((value, found, get_field(row, self.set_key)[1]))
                    size += len(value) if isinstance(value, str) else NON_TEXT_ROW_BYTES
                    if size >= self.chunk_bytes:
                        yield Chunk("rows", rows, first, len(rows), self._progress(first + len(rows)))
                        first += len(rows)
                        rows, size = [], 0
                total = first + len(rows)
        except DataError:
            raise
        except Exception as err:  # pyarrow and datasets raise many types for damaged files
            damage = {"error": f"{type(err).__name__}: {err}".strip()[:300], "at_row": first + len(rows)}
            total = first + len(rows)
        if rows:
            yield Chunk("rows", rows, first, len(rows), self._progress(total))
        self.summary = {"records": total, "damaged": damage, "sha256": sha256}


class ParquetReader(_RowReader):
    def __init__(self, item: InputFile, chunk_bytes: int, text_key: str, set_key: str) -> None:
        super().__init__(item, chunk_bytes, text_key, set_key)
        self._rows_total = None

    def _sha256(self) -> str:
        return file_sha256(self.item.path)

    def _progress(self, rows_done: int) -> int:
        if not self._rows_total:
            return self.item.size
        return int(self.item.size * rows_done / self._rows_total)

    def _row_dicts(self) -> Iterator[list[dict]]:
        import pyarrow.parquet as pq

        parquet = pq.ParquetFile(self.item.path)
        self._rows_total = parquet.metadata.num_rows
        names = parquet.schema_arrow.names
        wanted = {key if key in names else key.split(".")[0] for key in (self.text_key, self.set_key)}
        columns = [name for name in names if name in wanted]
        if not columns:
            # No text column at all: every row is a record without text.
            remaining = self._rows_total
            while remaining > 0:
                n = min(remaining, ROW_BATCH)
                remaining -= n
                yield [{}] * n
            return
        for batch in parquet.iter_batches(batch_size=ROW_BATCH, columns=columns):
            yield batch.to_pylist()


class HFDatasetReader(_RowReader):
    def _sha256(self) -> Optional[str]:
        # A local folder's files, hashed in a fixed order; hub datasets have
        # no local bytes to hash (their identity records name and revision).
        if not self.item.is_local:
            return None
        digest = hashlib.sha256()
        for name, _size, _mtime in self.item.identity()["files"]:
            digest.update(name.encode("utf-8") + b"\0")
            digest.update(bytes.fromhex(file_sha256(os.path.join(self.item.name, name))))
        return digest.hexdigest()

    def _row_dicts(self) -> Iterator[list[dict]]:
        dataset = open_hf_dataset(self.item)
        for batch in dataset.iter(batch_size=ROW_BATCH):
            keys = list(batch)
            if not keys:
                continue
            yield [dict(zip(keys, values)) for values in zip(*(batch[k] for k in keys))]


def open_hf_dataset(item: HFDatasetInput) -> Any:
    """The dataset object for ``item``, streaming where possible. Raises DataError."""
    try:
        import datasets
    except ImportError as err:  # pragma: no cover - a declared dependency
        raise DataError("reading a Hugging Face dataset needs the `datasets` package; pip install datasets") from err
    try:
        if item.is_saved_to_disk:
            dataset = datasets.load_from_disk(item.name)
            if isinstance(dataset, datasets.DatasetDict):
                if item.hf_split not in dataset:
                    raise DataError(
                        f"--hf-dataset {item.name!r} has splits {sorted(dataset)}, not {item.hf_split!r}; "
                        "choose one with --hf-split"
                    )
                dataset = dataset[item.hf_split]
            return dataset
        return datasets.load_dataset(
            item.name, item.config, split=item.hf_split,
            data_files=list(item.data_files) if item.data_files else None, streaming=True,
        )
    except DataError:
        raise
    except Exception as err:
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataError(f"cannot open Hugging Face dataset {item.label} ({message[:200]})") from err


def open_reader(item, chunk_bytes: int, max_record_bytes: int, text_key: str, set_key: str):
    """The reader for one input."""
    if isinstance(item, HFDatasetInput):
        return HFDatasetReader(item, chunk_bytes, text_key, set_key)
    if item.format == "parquet":
        return ParquetReader(item, chunk_bytes, text_key, set_key)
    return JsonLinesReader(item, chunk_bytes, max_record_bytes)
