"""Tokenize documents into megatron-core indexed-dataset shards (.bin/.idx).

For an output prefix ``P`` this writes:

* ``P.bin``: all token ids back to back, EOD after every document;
* ``P.idx``: megatron-core's index (sequence lengths, offsets, document bounds);
* ``P.json``: our sidecar (counts, dtype, the tokenizer's sha256, inputs).

``P`` is exactly what megatron-core's ``IndexedDataset`` / ``GPTDataset``
take as a data path. (Not named ``tokenize.py``: that would shadow the stdlib
module of that name, which ``inspect`` and ``linecache`` import.)

Atomicity: the builder writes ``P.tmp-<pid>.bin/.idx``; only after the index is
finalised are they renamed to ``P.bin`` then ``P.idx``, and the sidecar written
last. So a crash leaves either temporary files or an absent sidecar, never a
half-written pair under the final names that a training run would accept.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from typing import Sequence

import numpy

from data_prep.errors import DataError
from data_prep.reader import ReadStats, check_input_files, iter_documents
from data_prep.tokenizer import Tokenizer

DEFAULT_BATCH_SIZE = 256
_SUFFIXES = (".bin", ".idx", ".json")


def output_paths(output_prefix: str) -> dict[str, str]:
    """The three files of a shard prefix, by kind."""
    return {suffix[1:]: output_prefix + suffix for suffix in _SUFFIXES}


def token_dtype(vocab_size: int) -> type[numpy.number]:
    """The on-disk dtype for token ids of a vocabulary of ``vocab_size``.

    megatron-core's own rule (``DType.optimal_dtype``, also used by its
    preprocess_data.py): uint16 below 65500 ids, else int32. uint16 halves the
    .bin size and page-cache footprint against int32 and holds ids up to
    65535; the margin below 65536 is megatron's choice and we keep it so our
    shards are identical to what its own tool would write.
    """
    from megatron.core.datasets.indexed_dataset import DType

    return DType.optimal_dtype(vocab_size)


def _refuse_to_overwrite(output_prefix: str) -> None:
    existing = [p for p in output_paths(output_prefix).values() if os.path.exists(p)]
    if existing:
        raise DataError(
            f"output {output_prefix!r} already exists ({', '.join(os.path.basename(p) for p in existing)}); "
            "pass --overwrite (overwrite=True) to replace it or choose another --out"
        )


def _remove_quietly(*paths: str) -> None:
    for path in paths:
        try:
            os.remove(path)
        except FileNotFoundError:
            pass


def _progress(enabled: bool):
    # tqdm on stderr; disabled in tests and when asked. Imported lazily so the
    # module imports cleanly for code that only needs token_dtype().
    from tqdm import tqdm

    return tqdm(unit="doc", desc="tokenizing", disable=not enabled, mininterval=1.0, dynamic_ncols=True)


def tokenize_to_shards(
    input_files: Sequence[str | os.PathLike],
    tokenizer: Tokenizer,
    output_prefix: str | os.PathLike,
    overwrite: bool = False,
    batch_size: int = DEFAULT_BATCH_SIZE,
    text_key: str = "text",
    progress: bool = True,
) -> dict:
    """Tokenize every document of ``input_files`` into ``output_prefix``.bin/.idx.

    Each document becomes one megatron "document" holding one sequence: its
    token ids followed by ``tokenizer.eod``. Documents are encoded
    ``batch_size`` at a time with ``tokenizer.encode_batch`` (parallel in both
    back ends) while memory stays bounded by one batch.

    Raises DataError if the output exists and ``overwrite`` is False, if an
    input is missing, or if no document is usable. Returns the sidecar dict.
    """
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    if batch_size <= 0:
        raise DataError(f"batch_size must be positive, got {batch_size}")
    input_files = check_input_files(input_files)
    output_prefix = os.fspath(output_prefix)
    if not overwrite:
        _refuse_to_overwrite(output_prefix)
    out_dir = os.path.dirname(output_prefix)
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)

    dtype = token_dtype(tokenizer.vocab_size)
    eod = tokenizer.eod
    tmp_prefix = f"{output_prefix}.tmp-{os.getpid()}"
    tmp_bin, tmp_idx = tmp_prefix + ".bin", tmp_prefix + ".idx"
    final = output_paths(output_prefix)

    read_stats = ReadStats()
    documents = 0
    tokens = 0
    per_set_docs: Counter = Counter()
    per_set_tokens: Counter = Counter()
    started = time.time()
    builder = IndexedDatasetBuilder(tmp_bin, dtype=dtype)
    bar = _progress(progress)

    def flush(batch: list[tuple[str, str | None]]) -> None:
        nonlocal documents, tokens
        encoded = tokenizer.encode_batch([text for text, _ in batch])
        batch_tokens = 0
        for (_, set_name), ids in zip(batch, encoded):
            ids = numpy.asarray(ids + [eod], dtype=numpy.int64)
            # A wrong tokenizer/dtype pairing would wrap ids silently on the
            # uint16 cast inside the builder; this check is cheap by comparison.
            if ids.max() >= tokenizer.vocab_size or ids.min() < 0:
                raise DataError(
                    f"tokenizer {tokenizer.name} produced id {int(ids.max())} outside its "
                    f"vocab_size {tokenizer.vocab_size}; the tokenizer file is inconsistent"
                )
            builder.add_item(torch.from_numpy(ids))
            builder.end_document()
            set_key = set_name or "unknown"
            per_set_docs[set_key] += 1
            per_set_tokens[set_key] += len(ids)
            batch_tokens += len(ids)
        documents += len(batch)
        tokens += batch_tokens
        bar.update(len(batch))
        elapsed = max(time.time() - started, 1e-9)
        bar.set_postfix_str(f"{tokens / elapsed:,.0f} tok/s", refresh=False)

    try:
        batch: list[tuple[str, str | None]] = []
        for doc in iter_documents(input_files, text_key, read_stats):
            batch.append(doc)
            if len(batch) >= batch_size:
                flush(batch)
                batch = []
        if batch:
            flush(batch)
        bar.close()
        if documents == 0:
            raise DataError(
                f"no usable documents in {input_files}; skipped lines: {dict(read_stats.skipped)}"
            )
        builder.finalize(tmp_idx)
    except BaseException:
        # Includes KeyboardInterrupt: never leave temporaries behind.
        bar.close()
        builder.data_file.close()
        _remove_quietly(tmp_bin, tmp_idx)
        raise

    # Commit. The old sidecar goes first, so from here until the new one is
    # written the prefix is visibly incomplete (see shards_are_complete).
    _remove_quietly(final["json"])
    os.replace(tmp_bin, final["bin"])
    os.replace(tmp_idx, final["idx"])
    seconds = time.time() - started
    sidecar = {
        "prefix": os.path.basename(output_prefix),
        "documents": documents,
        "tokens": tokens,
        "dtype": numpy.dtype(dtype).name,
        "eod": eod,
        "tokenizer": tokenizer.describe(),
        "inputs": [os.path.basename(p) for p in input_files],
        "documents_per_set": dict(sorted(per_set_docs.items())),
        "tokens_per_set": dict(sorted(per_set_tokens.items())),
        "read": read_stats.as_dict(),
        "seconds": round(seconds, 2),
        "tokens_per_second": round(tokens / max(seconds, 1e-9)),
    }
    tmp_json = tmp_prefix + ".json"
    with open(tmp_json, "w", encoding="utf-8") as f:
        json.dump(sidecar, f, indent=2)
        f.write("\n")
    os.replace(tmp_json, final["json"])
    return sidecar


def read_sidecar(output_prefix: str | os.PathLike) -> dict | None:
    """The sidecar of a shard prefix, or None if absent or unreadable."""
    try:
        with open(os.fspath(output_prefix) + ".json", encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def shards_are_complete(output_prefix: str | os.PathLike, tokenizer: Tokenizer | None = None) -> bool:
    """True when .bin, .idx and the sidecar all exist (and, if given, the
    sidecar names the same tokenizer by sha256: shards from another tokenizer
    are stale even when complete)."""
    output_prefix = os.fspath(output_prefix)
    paths = output_paths(output_prefix)
    if not (os.path.isfile(paths["bin"]) and os.path.isfile(paths["idx"])):
        return False
    sidecar = read_sidecar(output_prefix)
    if sidecar is None:
        return False
    if tokenizer is not None and sidecar.get("tokenizer", {}).get("sha256") != tokenizer.sha256:
        return False
    return True
