"""megatron-core indexed-dataset shards (.bin/.idx): the on-disk format and a crash-safe writer.

A shard with prefix ``P`` is what megatron-core's ``IndexedDataset(P)`` reads:

* ``P.bin``: token ids back to back (EOD after every document);
* ``P.idx``: the index: a header, then per sequence its length (int32) and
  byte offset (int64), then the document boundaries (int64). We write one
  sequence per document, so the boundaries are 0..n. ``write_index`` writes
  this format directly with numpy; ``tests`` check it byte for byte against
  megatron-core's own ``IndexedDatasetBuilder``.

Start-up check. ``check_shard`` reads one shard's ``.idx`` (header, lengths, pointers,
document indices) and the ``.bin``'s size, and with a manifest record also compares counts,
size and (optionally, reading every byte) the sha256 of both files: a damaged or cut-short
copy is one line naming the file before training builds anything.

Crash safety. While a shard is being written its data lives in
``P.bin.partial`` and ``P.lens.partial`` (document lengths); names megatron
never opens. Finalising writes ``P.idx.partial`` and then renames ``.bin``
and ``.idx`` into place, so a shard under its final names is always
complete. A writer can be reopened at any earlier committed size
(``OpenShard.restore``): the partial files are cut back to it, which is how a
run killed with -9 resumes without duplicating or losing a document.
"""

from __future__ import annotations

import hashlib
import os
import struct
from typing import Optional

import numpy

from data_prep.errors import DataError
from data_prep.outputs.manifest import ShardRecord
from data_prep.tokenizer import file_sha256

#: megatron-core's index header and version (``indexed_dataset._INDEX_HEADER``).
INDEX_MAGIC = b"MMIDIDX\x00\x00"
INDEX_VERSION = 1
#: megatron-core's dtype codes (``indexed_dataset.DType``) for the two token dtypes we write.
DTYPE_CODES = {numpy.dtype(numpy.uint16): 8, numpy.dtype(numpy.int32): 4}
#: Item sizes of every dtype code megatron-core reads (``indexed_dataset.DType``: uint8, int8, int16,
#: int32, int64, float64, float32, uint16): a shard written by another tool may use any of them.
MEGATRON_DTYPE_SIZES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 8, 7: 4, 8: 2}
#: Magic, version (<Q), dtype code (<B), sequence count (<Q), document-index count (<Q).
INDEX_HEADER_BYTES = len(INDEX_MAGIC) + 8 + 1 + 8 + 8
SHARD_FIX = "re-copy it or rerun `mesh data tokenize`"
#: Largest vocabulary stored as uint16. megatron-core's ``DType.optimal_dtype``
#: switches to int32 at 65500 (not 65536); we follow it so its tools and ours agree.
UINT16_VOCAB_LIMIT = 65500


def token_dtype(vocab_size: int) -> type:
    """The on-disk dtype for token ids of a vocabulary of ``vocab_size``: uint16 or int32.

    uint16 halves the .bin size and page-cache footprint against int32.
    """
    return numpy.uint16 if vocab_size < UINT16_VOCAB_LIMIT else numpy.int32


def shard_paths(prefix: str) -> dict[str, str]:
    return {
        "bin": prefix + ".bin",
        "idx": prefix + ".idx",
        "bin.partial": prefix + ".bin.partial",
        "lens.partial": prefix + ".lens.partial",
        "idx.partial": prefix + ".idx.partial",
    }


def index_bytes(lengths: numpy.ndarray, dtype) -> bytes:
    """The .idx file for sequences of ``lengths`` tokens, one sequence per document."""
    dtype = numpy.dtype(dtype)
    lengths = numpy.asarray(lengths, dtype=numpy.int32)
    count = lengths.size
    pointers = numpy.zeros(count, dtype=numpy.int64)
    if count > 1:
        numpy.cumsum(lengths[:-1], dtype=numpy.int64, out=pointers[1:])
    pointers *= dtype.itemsize
    header = (
        INDEX_MAGIC
        + struct.pack("<Q", INDEX_VERSION)
        + struct.pack("<B", DTYPE_CODES[dtype])
        + struct.pack("<Q", count)
        + struct.pack("<Q", count + 1)
    )
    documents = numpy.arange(count + 1, dtype=numpy.int64)
    return header + lengths.tobytes() + pointers.tobytes() + documents.tobytes()


def read_index(prefix: str) -> tuple[numpy.dtype, numpy.ndarray]:
    """(token dtype, sequence lengths) of an existing shard, read without megatron-core."""
    path = prefix + ".idx"
    with open(path, "rb") as f:
        head = f.read(INDEX_HEADER_BYTES)
        if len(head) < INDEX_HEADER_BYTES or not head.startswith(INDEX_MAGIC):
            raise DataError(f"{path!r} is not a megatron-core index file")
        code = head[len(INDEX_MAGIC) + 8]
        (count,) = struct.unpack("<Q", head[len(INDEX_MAGIC) + 9: len(INDEX_MAGIC) + 17])
        lengths = numpy.fromfile(f, dtype=numpy.int32, count=count)
    codes = {v: k for k, v in DTYPE_CODES.items()}
    if code not in codes:
        raise DataError(f"{path!r} stores dtype code {code}, not a token dtype this tool writes")
    return codes[code], lengths


def check_shard(prefix: str, record: Optional[ShardRecord] = None, manifest: Optional[str] = None,
                verify_checksums: bool = False) -> None:
    """One-line DataError (the file, what is wrong, the fix) unless shard ``prefix`` is whole.

    Always (fast: the .idx is read, the .bin only stat'ed): the .idx header (magic, version,
    dtype code), that its size matches its counts, that the lengths are >= 0, the pointers
    are where the lengths put them and the document indices run from 0 to the sequence count
    in order, and that the .bin holds exactly the bytes the .idx implies. With the shard's
    manifest ``record`` (and the ``manifest`` path, for the message): the sequence and token
    counts and the .bin size it records; with ``verify_checksums`` also the sha256 of both files
    (reads every byte). ``mesh data inspect --verify`` and training's start-up check use this.
    """
    idx, bin_ = prefix + ".idx", prefix + ".bin"
    try:
        idx_size, bin_size = os.path.getsize(idx), os.path.getsize(bin_)
        with open(idx, "rb") as f:
            head = f.read(INDEX_HEADER_BYTES)
    except OSError as err:
        raise DataError(f"shard {prefix!r} cannot be read ({err.strerror}: {err.filename}); {SHARD_FIX}") from None

    def damaged(path: str, what: str) -> DataError:
        return DataError(f"{path} is damaged: {what}; {SHARD_FIX}")

    if len(head) < INDEX_HEADER_BYTES:
        raise damaged(idx, f"it has {idx_size} bytes, fewer than a megatron index header ({INDEX_HEADER_BYTES})")
    if not head.startswith(INDEX_MAGIC):
        raise damaged(idx, f"it does not start with megatron's index magic {INDEX_MAGIC!r}")
    version, code, count, doc_count = struct.unpack_from("<QBQQ", head, len(INDEX_MAGIC))
    if version != INDEX_VERSION:
        raise damaged(idx, f"index version {version}, not {INDEX_VERSION}")
    if code not in MEGATRON_DTYPE_SIZES:
        raise damaged(idx, f"dtype code {code} is none of megatron's codes {sorted(MEGATRON_DTYPE_SIZES)}")
    expected = INDEX_HEADER_BYTES + 12 * count + 8 * doc_count
    # megatron's multimodal index appends one int8 mode per sequence; GPT training ignores it.
    if idx_size not in (expected, expected + count):
        raise damaged(idx, f"it has {idx_size} bytes, but its header's {count} sequences and {doc_count} document "
                           f"indices need {expected}")
    index = numpy.memmap(idx, dtype=numpy.uint8, mode="r")
    offset = INDEX_HEADER_BYTES
    lengths = numpy.frombuffer(index, dtype=numpy.int32, count=count, offset=offset)
    pointers = numpy.frombuffer(index, dtype=numpy.int64, count=count, offset=offset + 4 * count)
    documents = numpy.frombuffer(index, dtype=numpy.int64, count=doc_count, offset=offset + 12 * count)
    itemsize = MEGATRON_DTYPE_SIZES[code]
    if count and int(lengths.min()) < 0:
        raise damaged(idx, f"sequence {int(numpy.argmin(lengths))} has a negative length")
    ends = numpy.cumsum(lengths, dtype=numpy.int64) * itemsize
    starts = numpy.concatenate([numpy.zeros(min(count, 1), numpy.int64), ends[:-1]])
    if not numpy.array_equal(pointers, starts):
        i = int(numpy.flatnonzero(pointers != starts)[0])
        raise damaged(idx, f"sequence {i} starts at byte {int(pointers[i])}, but the lengths before it end at "
                           f"byte {int(starts[i])}")
    if not doc_count or int(documents[0]) != 0 or int(documents[-1]) != count or (numpy.diff(documents) < 0).any():
        raise damaged(idx, f"its document indices do not run in order from 0 to its {count} sequences")
    tokens = int(ends[-1]) // itemsize if count else 0
    if bin_size != tokens * itemsize:
        how = "cut short" if bin_size < tokens * itemsize else "longer than its index"
        raise damaged(bin_, f"it has {bin_size} bytes, but {os.path.basename(idx)} says {tokens} tokens of "
                            f"{itemsize} bytes = {tokens * itemsize} bytes ({how})")
    if record is None:
        return
    source = f"manifest {manifest}" if manifest else "its manifest"
    for what, actual, recorded in (("bytes", bin_size, record.bin_bytes), ("sequences", count, record.documents),
                                   ("tokens", tokens, record.tokens)):
        if actual != recorded:
            path = bin_ if what == "bytes" else idx
            raise damaged(path, f"it holds {actual} {what} but {source} records {recorded} (another shard's file?)")
    if verify_checksums:
        for path, recorded in ((bin_, record.bin_sha256), (idx, record.idx_sha256)):
            if file_sha256(path) != recorded:
                raise damaged(path, f"its sha256 has changed since {source} was written")


def _fsync(f) -> None:
    f.flush()
    os.fsync(f.fileno())


class OpenShard:
    """The shard currently being written for one output group.

    Files are created on the first append, so a shard that never receives a
    document leaves nothing behind.
    """

    def __init__(self, prefix: str, dtype) -> None:
        self.prefix = prefix
        self.dtype = numpy.dtype(dtype)
        self.paths = shard_paths(prefix)
        self.documents = 0
        self.tokens = 0
        self._sha = hashlib.sha256()
        self._bin = None
        self._lens = None

    @property
    def bin_bytes(self) -> int:
        return self.tokens * self.dtype.itemsize

    def _open(self) -> None:
        if self._bin is None:
            for kind in ("bin", "idx"):
                if os.path.exists(self.paths[kind]):
                    raise DataError(
                        f"{self.paths[kind]!r} already exists and is not part of this run; "
                        "another output uses the same name: choose another --out (or --overwrite)"
                    )
            self._bin = open(self.paths["bin.partial"], "ab")
            self._lens = open(self.paths["lens.partial"], "ab")

    def append(self, tokens: numpy.ndarray, lengths: numpy.ndarray) -> None:
        self._open()
        data = memoryview(numpy.ascontiguousarray(tokens, dtype=self.dtype)).cast("B")
        self._bin.write(data)
        self._sha.update(data)
        self._lens.write(numpy.ascontiguousarray(lengths, dtype=numpy.int32).tobytes())
        self.documents += int(lengths.size)
        self.tokens += int(tokens.size)

    def sync(self, durable: bool) -> None:
        """Push buffered data to the OS (and to disk when ``durable``) before a commit."""
        for f in (self._bin, self._lens):
            if f is not None:
                if durable:
                    _fsync(f)
                else:
                    f.flush()

    def close(self) -> None:
        for f in (self._bin, self._lens):
            if f is not None:
                f.close()
        self._bin = self._lens = None

    def finalize(self, durable: bool = True) -> ShardRecord:
        """Write the index and move the shard under its final names; return its record."""
        self.sync(durable)
        self.close()
        lengths = numpy.fromfile(self.paths["lens.partial"], dtype=numpy.int32)
        if lengths.size != self.documents or int(lengths.sum(dtype=numpy.int64)) != self.tokens:
            raise DataError(f"shard {self.prefix!r}: the partial files disagree with the writer; rerun with --overwrite")
        index = index_bytes(lengths, self.dtype)
        with open(self.paths["idx.partial"], "wb") as f:
            f.write(index)
            if durable:
                _fsync(f)
        # .bin first: a .bin without its .idx is not a dataset megatron would open.
        os.replace(self.paths["bin.partial"], self.paths["bin"])
        os.replace(self.paths["idx.partial"], self.paths["idx"])
        return ShardRecord(
            prefix=os.path.basename(self.prefix),
            documents=self.documents,
            tokens=self.tokens,
            bin_bytes=self.bin_bytes,
            bin_sha256=self._sha.hexdigest(),
            idx_sha256=hashlib.sha256(index).hexdigest(),
        )

    def remove_lens(self) -> None:
        """Drop the lengths file of a finalized shard (once its finalization is committed)."""
        _remove(self.paths["lens.partial"])

    @classmethod
    def restore(cls, prefix: str, dtype, documents: int, tokens: int) -> "OpenShard":
        """Reopen a shard at a committed size, undoing anything written after that commit.

        After a crash the shard may be ahead of the commit (appends not yet
        committed), or even renamed to its final names (finalized but not
        committed). Both are rolled back here.
        """
        shard = cls(prefix, dtype)
        paths = shard.paths
        if os.path.exists(paths["bin"]) and not os.path.exists(paths["bin.partial"]):
            os.replace(paths["bin"], paths["bin.partial"])
        _remove(paths["idx"])
        _remove(paths["idx.partial"])
        if documents == 0:
            _remove(paths["bin.partial"])
            _remove(paths["lens.partial"])
            return shard
        bin_size = tokens * shard.dtype.itemsize
        for kind, size in (("bin.partial", bin_size), ("lens.partial", documents * 4)):
            path = paths[kind]
            if not os.path.exists(path) or os.path.getsize(path) < size:
                raise DataError(
                    f"cannot resume: {path!r} is missing or shorter than the progress file records; "
                    "the output was changed by hand; rerun with --overwrite"
                )
            os.truncate(path, size)
        with open(paths["bin.partial"], "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                shard._sha.update(block)
        shard.documents, shard.tokens = documents, tokens
        shard._bin = open(paths["bin.partial"], "ab")
        shard._lens = open(paths["lens.partial"], "ab")
        return shard


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def remove_shard_files(prefix: str) -> None:
    """Delete every file this module may have written for shard ``prefix``."""
    for path in shard_paths(prefix).values():
        _remove(path)
