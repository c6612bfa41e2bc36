"""The deterministic plan: every input's chunks, numbered in one global order.

Chunk ``i`` is the same records in every run with the same inputs and
options: inputs are read in their (sorted) order and each is cut into chunks
by content (see ``inputs.chunk_readers``). Workers may finish chunks in any
order; the writer applies them in plan order, so shard contents and boundaries
are a function of the plan alone, not of ``--workers``, timing, or
interruptions.

The plan is not materialised up front (a zstd file's chunk count is unknown
until it is read); it is a generator that can start at any chunk: inputs
already finished in an earlier session are skipped without being opened, and
the input in progress is re-read from its start, with its chunks before the
resume point passed over.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional, Sequence, Union

from data_prep.inputs.chunk_readers import Chunk, open_reader


@dataclass
class InputEnd:
    """Marks the end of one input in the plan: its chunk count and reader summary."""

    input_index: int
    chunks: int
    summary: dict
    end_offset: int


@dataclass
class ResumePoint:
    """Where a run starts: the first chunk to do, and the inputs already finished (index -> chunk count)."""

    next_chunk: int = 0
    finished_inputs: Optional[dict] = None


def iter_plan(
    inputs: Sequence,
    *,
    chunk_bytes: int,
    max_record_bytes: int,
    text_key: str,
    set_key: str,
    start: Optional[ResumePoint] = None,
) -> Iterator[Union[Chunk, InputEnd]]:
    """Yield the chunks from ``start.next_chunk`` on, and an InputEnd after each input."""
    start = start or ResumePoint()
    finished = start.finished_inputs or {}
    index = 0
    for input_index, item in enumerate(inputs):
        if input_index in finished:
            index += finished[input_index]
            continue
        reader = open_reader(item, chunk_bytes, max_record_bytes, text_key, set_key)
        count = 0
        end_offset = 0
        for chunk in reader:
            chunk.index = index
            chunk.input_index = input_index
            chunk.label = item.label
            chunk.split = item.split
            end_offset = chunk.end_offset
            if index >= start.next_chunk:
                yield chunk
            index += 1
            count += 1
        yield InputEnd(input_index, count, reader.summary, getattr(item, "size", end_offset))
