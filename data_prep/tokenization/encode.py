"""The worker side: one chunk of raw records -> token arrays ready to append to shards.

A worker parses and validates each record (``inputs.records``), decides its split,
tokenizes the chunk's documents with the tokenizer's batch encoder, appends
EOD to each, and returns numpy arrays per output group, so the parent only
writes bytes. Each worker process loads the tokenizer once (``init_worker``).

Everything here is a pure function of the chunk and the options, which is
what makes the output independent of the worker count.
"""

from __future__ import annotations

import itertools
import multiprocessing
import multiprocessing.connection
import os
import signal
import threading
from dataclasses import dataclass, field
from typing import Optional

import numpy

from data_prep.errors import DataError
from data_prep.inputs.chunk_readers import Chunk, chunk_documents
from data_prep.inputs.records import DEFAULT_MAX_DOCUMENT_BYTES
from data_prep.inputs.skips import SkipLog
from data_prep.tokenization.splits import TRAIN, SplitAssigner
from data_prep.tokenizer import Tokenizer


@dataclass(frozen=True)
class EncodeOptions:
    text_key: str = "text"
    set_key: str = "meta.pile_set_name"
    split_by_set: bool = False
    #: True when output is split into train/val/test (by fraction or by input).
    splitting: bool = False
    val_fraction: float = 0.0
    test_fraction: float = 0.0
    split_seed: int = 1234
    max_document_bytes: int = DEFAULT_MAX_DOCUMENT_BYTES
    #: Documents per tokenizer call; bounds the tokenizer's temporary memory.
    batch_size: int = 512
    dtype: str = "uint16"


@dataclass
class EncodedChunk:
    """What the parent needs from one chunk. Picklable (numpy arrays travel as raw buffers)."""

    index: int
    input_index: int
    records: int
    end_offset: int
    #: (split, set name or None) -> (tokens with EOD after each document, int32 lengths incl. EOD).
    #: The set is None unless splitting by set; order is first appearance in the chunk.
    groups: dict = field(default_factory=dict)
    #: (split, set name or None) -> [documents, tokens, text bytes], whether or not split by set.
    counts: dict = field(default_factory=dict)
    skips: SkipLog = field(default_factory=SkipLog)

    @property
    def documents(self) -> int:
        return sum(c[0] for c in self.counts.values())

    @property
    def tokens(self) -> int:
        return sum(c[1] for c in self.counts.values())

    @property
    def text_bytes(self) -> int:
        return sum(c[2] for c in self.counts.values())


class ChunkEncoder:
    def __init__(self, tokenizer: Tokenizer, options: EncodeOptions) -> None:
        self.tokenizer = tokenizer
        self.options = options
        self.dtype = numpy.dtype(options.dtype)
        self.assign = SplitAssigner(options.val_fraction, options.test_fraction, options.split_seed)
        self.by_fraction = options.val_fraction > 0 or options.test_fraction > 0

    def _split_of(self, chunk: Chunk, utf8: bytes) -> Optional[str]:
        if not self.options.splitting:
            return None
        if chunk.split is not None:
            return chunk.split
        return self.assign(utf8) if self.by_fraction else TRAIN

    def encode(self, chunk: Chunk) -> EncodedChunk:
        opts = self.options
        result = EncodedChunk(chunk.index, chunk.input_index, chunk.n_records, chunk.end_offset)
        texts: list[str] = []
        keys: list[tuple] = []  # per document: (split, set name)
        text_bytes: list[int] = []
        for text, utf8, set_name in chunk_documents(chunk, opts.text_key, opts.set_key,
                                                    opts.max_document_bytes, result.skips):
            texts.append(text)
            keys.append((self._split_of(chunk, utf8), set_name))
            text_bytes.append(len(utf8))
        if not texts:
            return result

        ids: list[list[int]] = []
        for start in range(0, len(texts), opts.batch_size):
            ids.extend(self.tokenizer.encode_batch(texts[start:start + opts.batch_size]))
        lengths = numpy.fromiter(map(len, ids), numpy.int64, len(ids))
        try:
            flat = numpy.fromiter(itertools.chain.from_iterable(ids), self.dtype, int(lengths.sum()))
        except OverflowError as err:
            raise DataError(f"tokenizer {self.tokenizer.name} produced an id that does not fit {self.dtype}: {err}") from err
        if flat.size and int(flat.max()) >= self.tokenizer.vocab_size:
            raise DataError(
                f"tokenizer {self.tokenizer.name} produced id {int(flat.max())} outside its vocab_size "
                f"{self.tokenizer.vocab_size}; the tokenizer file is inconsistent"
            )

        # Per-subset counts (always) and the output group of each document.
        group_of_doc = []
        group_ids: dict[tuple, int] = {}
        for key, n_tokens, n_bytes in zip(keys, lengths.tolist(), text_bytes):
            counts = result.counts.setdefault(key, [0, 0, 0])
            counts[0] += 1
            counts[1] += n_tokens + 1
            counts[2] += n_bytes
            group = key if opts.split_by_set else (key[0], None)
            group_of_doc.append(group_ids.setdefault(group, len(group_ids)))

        if len(group_ids) == 1:
            (group,) = group_ids
            result.groups[group] = self._with_eod(flat, lengths)
            return result
        doc_group = numpy.asarray(group_of_doc, dtype=numpy.int32)
        token_group = numpy.repeat(doc_group, lengths)
        for group, gid in group_ids.items():
            selected = doc_group == gid
            result.groups[group] = self._with_eod(flat[token_group == gid], lengths[selected])
        return result

    def _with_eod(self, tokens: numpy.ndarray, lengths: numpy.ndarray) -> tuple[numpy.ndarray, numpy.ndarray]:
        """Interleave: doc0 tokens, EOD, doc1 tokens, EOD, ... and the lengths including EOD."""
        with_eod = lengths + 1
        out = numpy.empty(tokens.size + lengths.size, dtype=self.dtype)
        is_eod = numpy.zeros(out.size, dtype=bool)
        is_eod[numpy.cumsum(with_eod) - 1] = True
        out[is_eod] = self.tokenizer.eod
        out[~is_eod] = tokens
        return out, with_eod.astype(numpy.int32)


# Worker-process entry points (a multiprocessing pool's initializer and task).
_encoder: Optional[ChunkEncoder] = None


def init_worker(tokenizer: Tokenizer, options: EncodeOptions) -> None:
    # Ctrl-C (and a batch system's SIGTERM) go to the whole process group;
    # only the parent handles them: it saves progress, then stops the workers.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _exit_with_parent()
    global _encoder
    _encoder = ChunkEncoder(tokenizer, options)


def _exit_with_parent() -> None:
    """End this worker when the parent dies.

    After ``kill -9`` of the parent, a worker would otherwise wait forever on
    its task queue (it holds that pipe's other end itself, so it never sees
    EOF), keeping the output folder busy and the job step alive.
    ``parent_process().sentinel`` becomes ready when the parent is gone, even
    if that happened before this worker finished starting.
    """
    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def watch() -> None:
        multiprocessing.connection.wait([parent.sentinel])
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def encode_in_worker(chunk: Chunk) -> EncodedChunk:
    return _encoder.encode(chunk)
