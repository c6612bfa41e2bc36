"""``tokenize_corpus``: inputs -> tokenized, sharded megatron datasets with a manifest.

How a run works:

1. Everything checkable is checked before any work: options, inputs (one-line
   errors for a missing file or an empty directory), the tokenizer, and the
   output prefix (never overwritten without ``overwrite``).
2. The plan (``plan.iter_plan``) cuts the inputs into chunks in a fixed
   order. Workers (a process pool, each loading the tokenizer once) encode
   chunks in parallel; at most a few chunks per worker are in flight, so
   memory is bounded. Results are applied strictly in plan order.
3. Applying a chunk appends each group's tokens to that group's open shard.
   A shard is closed *before* a chunk that would take it over ``shard_bytes``,
   so boundaries depend on the plan only, and no shard exceeds the bound
   unless one chunk alone does.
4. The state (next chunk, shards, counts) is committed to
   ``<out>.progress.json`` every ``checkpoint_seconds`` and whenever a shard
   is finalized. A run killed at any point and started again with the same
   command cuts the shards back to the last commit and continues from there;
   the output is byte-identical to an uninterrupted run.
5. At the end the last shards are finalized, the manifests written (the run
   manifest last: its presence means "complete") and the progress file
   removed.
"""

from __future__ import annotations

import datetime
import multiprocessing
import os
import signal
import sys
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from typing import Iterator, Optional, Sequence, Union

import numpy

from data_prep.errors import DataError
from data_prep.inputs.chunk_readers import open_hf_dataset
from data_prep.inputs.discovery import HFDatasetInput, check_distinct, check_hf_dataset, resolve_files, select_for_node
from data_prep.inputs.records import DEFAULT_MAX_DOCUMENT_BYTES
from data_prep.inputs.skips import SkipLog
from data_prep.outputs.groups import UNLABELLED_LABEL, GroupTable
from data_prep.outputs.manifest import (
    GroupRecord,
    InputRecord,
    PartManifest,
    RunManifest,
    Session,
    ShardRecord,
    SubsetRecord,
    TokenizerRecord,
    ToolVersions,
    Totals,
    manifest_path,
    output_files,
    read_manifest,
    write_manifest,
)
from data_prep.outputs.megatron_shards import OpenShard, remove_shard_files, token_dtype
from data_prep.tokenization import faults
from data_prep.tokenization.encode import ChunkEncoder, EncodedChunk, EncodeOptions, encode_in_worker, init_worker
from data_prep.tokenization.plan import InputEnd, ResumePoint, iter_plan
from data_prep.tokenization.progress_bar import TokenizeProgress
from data_prep.tokenization.progress_file import (
    FinishedInput,
    GroupState,
    OpenShardState,
    ProgressState,
    commit_progress,
    load_progress,
    progress_path,
    remove_progress,
)
from data_prep.tokenization.splits import SPLITS, TEST, VAL
from data_prep.tokenizer import Tokenizer

MiB = 1 << 20
GiB = 1 << 30
DEFAULT_SHARD_BYTES = 4 * GiB
DEFAULT_CHUNK_BYTES = 1 * MiB
DEFAULT_MAX_SETS = 64
DEFAULT_CHECKPOINT_SECONDS = 10.0
#: Chunks in flight per worker: enough to keep workers busy while the parent
#: writes, few enough to bound memory (chunk_bytes of input each).
IN_FLIGHT_PER_WORKER = 3


class Interrupted(Exception):
    """The run was stopped (Ctrl-C, SIGTERM) after committing its progress."""


@dataclass
class TokenizeOptions:
    """Options of ``tokenize_corpus``. Those in ``OUTPUT_OPTIONS`` change the output bytes."""

    text_key: str = "text"
    set_key: str = "meta.pile_set_name"
    split_by_set: bool = False
    val_fraction: float = 0.0
    test_fraction: float = 0.0
    split_seed: int = 1234
    #: Bound on a shard's .bin size; None: one shard per group, named after the group.
    shard_bytes: Optional[int] = DEFAULT_SHARD_BYTES
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    max_document_bytes: int = DEFAULT_MAX_DOCUMENT_BYTES
    max_sets: int = DEFAULT_MAX_SETS
    workers: int = 1
    batch_size: int = 512
    checkpoint_seconds: float = DEFAULT_CHECKPOINT_SECONDS
    #: fsync shards and the progress file at each commit (survives power loss, not only kill -9).
    durable: bool = True

    OUTPUT_OPTIONS = ("text_key", "set_key", "split_by_set", "val_fraction", "test_fraction", "split_seed",
                      "shard_bytes", "chunk_bytes", "max_document_bytes", "max_sets")

    def validate(self) -> None:
        if not 0 <= self.val_fraction < 1 or not 0 <= self.test_fraction < 1:
            raise DataError("--val-fraction and --test-fraction must be in [0, 1)")
        if self.val_fraction + self.test_fraction >= 1:
            raise DataError("--val-fraction + --test-fraction must be below 1 (something must stay for training)")
        for name in ("chunk_bytes", "max_document_bytes", "max_sets", "workers", "batch_size"):
            if getattr(self, name) < 1:
                raise DataError(f"{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.shard_bytes is not None and self.shard_bytes < 1:
            raise DataError(f"--shard-size must be positive, got {self.shard_bytes}")
        if self.checkpoint_seconds < 0:
            raise DataError("--checkpoint-interval must be >= 0 seconds")
        if not self.text_key:
            raise DataError("--text-key must not be empty")

    def output_affecting(self) -> dict:
        return {name: getattr(self, name) for name in self.OUTPUT_OPTIONS}


# --------------------------------------------------------------------------
# Inputs and the output prefix, checked before any work
# --------------------------------------------------------------------------

Spec = Union[str, os.PathLike, HFDatasetInput]


def _resolve(specs: Sequence[Spec], split: Optional[str]) -> list:
    resolved = []
    for spec in specs:
        if isinstance(spec, HFDatasetInput):
            item = HFDatasetInput(spec.name, spec.config, spec.hf_split, spec.data_files, split)
            check_hf_dataset(item)
            open_hf_dataset(item)  # fail now, not after an hour of other inputs
            resolved.append(item)
        else:
            resolved.extend(resolve_files([spec], split))
    return resolved


def resolve_inputs(train: Sequence[Spec], val: Sequence[Spec] = (), test: Sequence[Spec] = (),
                   node_rank: int = 0, num_nodes: int = 1) -> list:
    """All inputs in plan order: training inputs, then validation, then test ones."""
    if not train and not val and not test:
        raise DataError("no inputs given; pass --input (files, directories or globs) or --hf-dataset")
    inputs = _resolve(train, None) + _resolve(val, VAL) + _resolve(test, TEST)
    check_distinct(inputs)
    if num_nodes > 1:
        inputs = select_for_node(inputs, node_rank, num_nodes)
    return inputs


def _fingerprint(inputs: list, tokenizer: Tokenizer, options: TokenizeOptions, splitting: bool) -> dict:
    return {
        "inputs": [item.identity() for item in inputs],
        "tokenizer_sha256": tokenizer.sha256,
        "eod": tokenizer.eod,
        "splitting": splitting,
        "options": options.output_affecting(),
    }


def _plain_prefix_files(out: str) -> list[str]:
    # A plain megatron dataset at the output prefix itself (P.bin / P.idx, as megatron's own
    # tools write it) is someone's data: refused like other output, never overwritten silently.
    return [out + ".bin", out + ".idx"]


def _progress_files(out: str, state: ProgressState) -> list[str]:
    """Files an unfinished run (described by its progress file) may have written."""
    files = [progress_path(out)]
    folder = os.path.dirname(out)
    for group in state.groups.values():
        for shard in group.shards:
            base = os.path.join(folder, shard.prefix)
            files += [base + suffix for suffix in (".bin", ".idx", ".lens.partial")]
        open_prefix = os.path.join(folder, group.open.prefix)
        files += [open_prefix + s for s in (".bin", ".idx", ".bin.partial", ".lens.partial", ".idx.partial")]
        files.append(manifest_path(os.path.join(folder, group.prefix)))
    for prefix in state.split_prefixes.values():
        files.append(manifest_path(os.path.join(folder, prefix)))
    return files


def _remove_files(paths: Sequence[str]) -> None:
    for path in paths:
        try:
            os.remove(path)
        except FileNotFoundError:
            pass


def _planned_group_prefixes(out: str, splitting: bool, shard_bytes: Optional[int]) -> list[str]:
    """Names of first shards we can predict (subsets are only known once read)."""
    groups = [f"{out}_{split}" for split in SPLITS] if splitting else [out]
    return [g if shard_bytes is None else f"{g}_{0:05d}" for g in groups] + groups


def _check_output(out: str, fingerprint: dict, overwrite: bool, splitting: bool,
                  shard_bytes: Optional[int]) -> tuple[str, Union[ProgressState, RunManifest, None]]:
    """Decide what to do with the output prefix: ("fresh" | "resume" | "complete", state).

    Never deletes anything unless ``overwrite``.
    """
    run_manifest = manifest_path(out)
    state = load_progress(out)
    if state is not None:
        if overwrite:
            _remove_files(_progress_files(out, state))
        elif state.fingerprint == fingerprint:
            return "resume", state
        else:
            raise DataError(
                f"{progress_path(out)!r} belongs to an unfinished run with other inputs or options; rerun "
                "that run's exact command to finish it, or pass --overwrite to discard it"
            )
    if os.path.exists(run_manifest):
        manifest = read_manifest(run_manifest)
        if overwrite:
            _remove_files(output_files(run_manifest, manifest))
        elif isinstance(manifest, RunManifest) and manifest.fingerprint == fingerprint and manifest.complete:
            missing = [p for p in output_files(run_manifest, manifest) if not os.path.isfile(p)]
            if missing:
                raise DataError(
                    f"output {out!r} is complete by its manifest but {len(missing)} of its files are gone "
                    f"(e.g. {missing[0]}); rerun with --overwrite to rebuild it"
                )
            return "complete", manifest
        else:
            raise DataError(
                f"output {out!r} already exists ({os.path.basename(run_manifest)}) and was made from other "
                "inputs or options; pass --overwrite to replace it or choose another --out"
            )
    stray = [p for p in _plain_prefix_files(out) + [
        q + suffix for q in _planned_group_prefixes(out, splitting, shard_bytes)
        for suffix in (".bin", ".idx", ".bin.partial", ".manifest.json")
    ] if os.path.exists(p)]
    if stray:
        if not overwrite:
            raise DataError(
                f"output {out!r} already exists ({', '.join(sorted({os.path.basename(p) for p in stray}))}); "
                "pass --overwrite to replace it or choose another --out"
            )
        _remove_files(stray)
        for q in _planned_group_prefixes(out, splitting, shard_bytes):
            remove_shard_files(q)
    return "fresh", None


# --------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------


@dataclass
class _Group:
    """One output group while the run writes it (full paths; ``state`` is what a commit records)."""

    name: str
    prefix: str
    split: Optional[str]
    subset: Optional[str]
    shards: list[ShardRecord]
    open: OpenShard

    def state(self) -> GroupState:
        # Names relative to the output folder: a run may resume from another working directory.
        open_state = OpenShardState(os.path.basename(self.open.prefix), self.open.documents, self.open.tokens)
        return GroupState(os.path.basename(self.prefix), self.split, self.subset, self.shards, open_state)


class _Run:
    """The state of one tokenization run and the rules for changing it."""

    def __init__(self, out: str, inputs: list, tokenizer: Tokenizer, options: TokenizeOptions,
                 splitting: bool, fingerprint: dict, command: Optional[list], progress: bool) -> None:
        self.out = out
        self.folder = os.path.dirname(out)
        self.inputs = inputs
        self.tokenizer = tokenizer
        self.options = options
        self.splitting = splitting
        self.fingerprint = fingerprint
        self.command = command
        self.show_progress = progress
        self.dtype = numpy.dtype(token_dtype(tokenizer.vocab_size))
        self.next_chunk = 0
        self.finished_inputs: dict[int, FinishedInput] = {}
        self.input_counts: dict[int, list] = {}  # index -> [records, documents, tokens]
        self.groups: dict[str, _Group] = {}
        self.skips = SkipLog()
        self.counts: dict[tuple, list] = {}  # (split, subset label) -> [documents, tokens, text bytes]
        self.table = GroupTable(out, options.split_by_set, options.max_sets)
        self.sessions: list[Session] = []
        self.phase = "running"
        self._last_commit = time.monotonic()
        self._stop_signal: Optional[int] = None
        self._bar: Optional[TokenizeProgress] = None

    # ----- shard naming -----------------------------------------------------
    def _shard_prefix(self, group_prefix: str, index: int) -> str:
        if self.options.shard_bytes is None:
            return group_prefix
        return f"{group_prefix}_{index:05d}"

    def _new_group(self, name: str) -> _Group:
        prefix = self.table.prefix(name)
        parts = name.split("/") if name != "all" else []
        split = parts[0] if self.splitting else None
        subset = parts[-1] if self.options.split_by_set else None
        return _Group(name, prefix, split, subset, [], OpenShard(self._shard_prefix(prefix, 0), self.dtype))

    # ----- commit / resume --------------------------------------------------
    def state(self) -> ProgressState:
        return ProgressState(
            fingerprint=self.fingerprint,
            phase=self.phase,
            next_chunk=self.next_chunk,
            finished_inputs=self.finished_inputs,
            input_counts=self.input_counts,
            groups={name: g.state() for name, g in self.groups.items()},
            split_prefixes=self._split_prefixes(),
            skips=self.skips.as_dict(),
            counts=[[k[0], k[1], *v] for k, v in self.counts.items()],
            table=self.table.state(),
            sessions=self.sessions,
        )

    def commit(self) -> None:
        faults.crash_point("commit")
        for group in self.groups.values():
            group.open.sync(self.options.durable)
        self.sessions[-1].seconds = round(time.time() - self._session_started, 3)
        commit_progress(self.out, self.state(), self.options.durable)
        self._last_commit = time.monotonic()
        faults.crash_point("committed")

    def restore(self, state: ProgressState) -> None:
        self.phase = state.phase
        self.next_chunk = state.next_chunk
        self.finished_inputs = state.finished_inputs
        self.input_counts = state.input_counts
        self.skips = SkipLog.from_dict(state.skips)
        self.counts = {(row[0], row[1]): row[2:] for row in state.counts}
        self.table = GroupTable(self.out, self.options.split_by_set, self.options.max_sets, state.table)
        self.sessions = state.sessions
        for name, g in state.groups.items():
            for shard in g.shards:  # finalized and committed: its lengths file is no longer needed
                OpenShard(os.path.join(self.folder, shard.prefix), self.dtype).remove_lens()
            o = g.open
            shard = OpenShard.restore(os.path.join(self.folder, o.prefix), self.dtype, o.documents, o.tokens)
            prefix = os.path.join(self.folder, g.prefix)
            self.groups[name] = _Group(name, prefix, g.split, g.subset, list(g.shards), shard)

    # ----- applying results in plan order ---------------------------------
    def _log_skip(self, reason: str, example: dict) -> None:
        message = f"skipped {example['file']} {example['at']}: {reason}"
        if example["detail"]:
            message += f" ({example['detail']})"
        self._warn(message)

    def _warn(self, message: str) -> None:
        if self._bar is not None:
            self._bar.write(message)
        else:
            print(message, file=sys.stderr, flush=True)

    def apply(self, result: EncodedChunk) -> None:
        parts: dict[str, list] = {}
        for (split, raw_set), arrays in result.groups.items():
            parts.setdefault(self.table.group(split, raw_set), []).append(arrays)

        # Phase 1: new groups and shard closures, committed before any byte of
        # this chunk is written, so the commit describes a state between chunks.
        finalized = []
        for name, arrays in parts.items():
            if name not in self.groups:
                self.groups[name] = self._new_group(name)
                finalized.append(None)
            group = self.groups[name]
            incoming = sum(tokens.size for tokens, _ in arrays) * self.dtype.itemsize
            limit = self.options.shard_bytes
            if limit is not None and group.open.documents and group.open.bin_bytes + incoming > limit:
                group.shards.append(group.open.finalize(self.options.durable))
                faults.crash_point("finalized")
                finalized.append(group.open)
                group.open = OpenShard(self._shard_prefix(group.prefix, len(group.shards)), self.dtype)
        if finalized:
            self.commit()
            for shard in finalized:
                if shard is not None:
                    shard.remove_lens()

        # Phase 2: write the chunk and count it.
        for name, arrays in parts.items():
            for tokens, lengths in arrays:
                self.groups[name].open.append(tokens, lengths)
        for (split, raw_set), (docs, tokens, nbytes) in result.counts.items():
            label = self.table.subset(raw_set)[1] if raw_set is not None else UNLABELLED_LABEL
            row = self.counts.setdefault((split, label), [0, 0, 0])
            row[0] += docs
            row[1] += tokens
            row[2] += nbytes
        per_input = self.input_counts.setdefault(result.input_index, [0, 0, 0])
        per_input[0] += result.records
        per_input[1] += result.documents
        per_input[2] += result.tokens
        self.skips.merge(result.skips, self._log_skip)
        self.next_chunk = result.index + 1
        faults.crash_point("appended")

    def finish_input(self, end: InputEnd) -> None:
        summary = FinishedInput(end.summary["records"], end.summary["damaged"], end.summary["sha256"], end.chunks)
        self.finished_inputs[end.input_index] = summary
        if summary.damaged:
            self._warn(f"damaged input {self.inputs[end.input_index].label}: {summary.damaged['error']}; "
                       f"kept the {summary.records:,} records before the damage")

    def maybe_commit(self) -> None:
        if time.monotonic() - self._last_commit >= self.options.checkpoint_seconds:
            self.commit()

    # ----- the main loop ----------------------------------------------------
    def _results(self, plan: Iterator) -> Iterator[Union[EncodedChunk, InputEnd]]:
        """Encoded chunks (and input ends) in plan order, from a pool or in-process."""
        encode_options = EncodeOptions(
            text_key=self.options.text_key, set_key=self.options.set_key, split_by_set=self.options.split_by_set,
            splitting=self.splitting, val_fraction=self.options.val_fraction,
            test_fraction=self.options.test_fraction, split_seed=self.options.split_seed,
            max_document_bytes=self.options.max_document_bytes, batch_size=self.options.batch_size,
            dtype=self.dtype.name,
        )
        if self.options.workers == 1:
            encoder = ChunkEncoder(self.tokenizer, encode_options)
            for item in plan:
                yield item if isinstance(item, InputEnd) else encoder.encode(item)
            return
        # spawn, not fork: the parent may hold threads (tokenizers, torch) that
        # a forked child would inherit in a broken state. ProcessPoolExecutor,
        # not multiprocessing.Pool: if a worker dies (OOM killer) its futures
        # fail with BrokenProcessPool instead of waiting forever.
        pool = ProcessPoolExecutor(self.options.workers, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=init_worker, initargs=(self.tokenizer, encode_options))
        window = self.options.workers * IN_FLIGHT_PER_WORKER
        pending: deque = deque()
        try:
            for item in plan:
                if isinstance(item, InputEnd):
                    pending.append((item, None))
                else:
                    pending.append((None, pool.submit(encode_in_worker, item)))
                while len(pending) > window or (pending and pending[0][1] is None):
                    end, future = pending.popleft()
                    yield end if future is None else future.result()
            while pending:
                end, future = pending.popleft()
                yield end if future is None else future.result()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def _on_signal(self, signum, _frame) -> None:
        self._stop_signal = signum

    def run(self, resume_state: Optional[ProgressState]) -> RunManifest:
        self._session_started = time.time()
        resumed_at = None
        if resume_state is not None:
            self.restore(resume_state)
            resumed_at = self.next_chunk
        self.sessions.append(Session(
            started=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            seconds=0.0, workers=self.options.workers, resumed_at_chunk=resumed_at,
        ))
        if self.phase == "running":
            self._process()
        return self._complete()

    def _process(self) -> None:
        total = sum(getattr(item, "size", 0) for item in self.inputs)
        done_bytes = sum(getattr(self.inputs[i], "size", 0) for i in self.finished_inputs)
        self._bar = TokenizeProgress(total, done_bytes, self.show_progress)
        plan = iter_plan(
            self.inputs, chunk_bytes=self.options.chunk_bytes, max_record_bytes=self.options.max_document_bytes,
            text_key=self.options.text_key, set_key=self.options.set_key,
            start=ResumePoint(self.next_chunk, {i: v.chunks for i, v in self.finished_inputs.items()}),
        )
        handlers = {}
        try:
            for signum in (signal.SIGINT, signal.SIGTERM):
                handlers[signum] = signal.signal(signum, self._on_signal)
        except ValueError:  # not the main thread: no signal handling
            pass
        results = self._results(plan)
        try:
            self.commit()  # the progress file exists from the first moment of a run
            for item in results:
                if isinstance(item, InputEnd):
                    self.finish_input(item)
                    finished_bytes = sum(getattr(self.inputs[i], "size", 0) for i in self.finished_inputs)
                    self._bar.update(finished_bytes, 0, 0)
                    continue
                self.apply(item)
                finished_bytes = sum(getattr(self.inputs[i], "size", 0) for i in self.finished_inputs)
                self._bar.update(finished_bytes + item.end_offset, item.documents, item.tokens)
                faults.chunk_delay()
                if self._stop_signal is not None:
                    self.commit()
                    raise Interrupted(
                        f"stopped by signal {self._stop_signal} after chunk {self.next_chunk - 1}; progress saved "
                        f"in {progress_path(self.out)}: rerun the same command to continue"
                    )
                self.maybe_commit()
        finally:
            results.close()  # stops the workers
            for signum, handler in handlers.items():
                signal.signal(signum, handler)
            self._bar.close()
            self._bar = None
        if not any(g.shards or g.open.documents for g in self.groups.values()):
            self._abandon()
        finalized = []
        for group in self.groups.values():
            if group.open.documents:
                group.shards.append(group.open.finalize(self.options.durable))
                faults.crash_point("finalized")
                finalized.append(group.open)
                group.open = OpenShard(self._shard_prefix(group.prefix, len(group.shards)), self.dtype)
        self.phase = "finalized"
        self.commit()
        for shard in finalized:
            shard.remove_lens()

    def _abandon(self) -> None:
        """No document survived: remove the progress file and report why."""
        for group in self.groups.values():
            group.open.close()
        remove_progress(self.out)
        skipped = ", ".join(f"{k} {v:,}" for k, v in sorted(self.skips.counts.items())) or "no records at all"
        damaged = [self.inputs[i].label for i, s in self.finished_inputs.items() if s.damaged]
        hint = f"; damaged inputs: {', '.join(damaged)}" if damaged else ""
        raise DataError(f"no usable documents in the inputs (skipped: {skipped}{hint}); check --text-key and the files")

    # ----- manifests -----------------------------------------------------------
    def _split_prefixes(self) -> dict:
        if not self.splitting:
            return {}
        splits = sorted({g.split for g in self.groups.values() if g.split}, key=SPLITS.index)
        return {s: os.path.basename(f"{self.out}_{s}") for s in splits}

    def _group_record(self, group: _Group) -> GroupRecord:
        return GroupRecord(
            name=group.name,
            split=group.split,
            subset=group.subset,
            prefix=os.path.basename(group.prefix),
            documents=sum(s.documents for s in group.shards),
            tokens=sum(s.tokens for s in group.shards),
            shards=group.shards,
        )

    def _input_record(self, index: int) -> InputRecord:
        item = self.inputs[index]
        summary = self.finished_inputs[index]
        _records, documents, tokens = self.input_counts.get(index, [0, 0, 0])
        return InputRecord(
            path=item.label, format=getattr(item, "format", "hf-dataset"), split=item.split,
            size=getattr(item, "size", None), sha256=summary.sha256, records=summary.records, documents=documents,
            tokens=tokens, skipped=summary.records - documents, chunks=summary.chunks, damaged=summary.damaged,
            hf=item.identity() if isinstance(item, HFDatasetInput) else None,
        )

    def _complete(self) -> RunManifest:
        groups = [self._group_record(g) for g in self.groups.values()]
        groups.sort(key=lambda g: (SPLITS.index(g.split) if g.split else -1, g.name))
        tool = _tool_versions()
        tokenizer = TokenizerRecord.from_dict(
            dict(self.tokenizer.describe(), path=os.path.abspath(self.tokenizer.path), dtype=self.dtype.name))
        run_name = os.path.basename(self.out)

        # Part manifests: one per group prefix and, with subsets, one per split.
        parts: dict[str, list[GroupRecord]] = {}
        for g in groups:
            if g.prefix != run_name:
                parts.setdefault(g.prefix, []).append(g)
            if self.splitting and self.options.split_by_set:
                parts.setdefault(os.path.basename(f"{self.out}_{g.split}"), []).append(g)
        for prefix, members in parts.items():
            write_manifest(manifest_path(os.path.join(self.folder, prefix)), PartManifest(
                run_manifest=manifest_path(run_name), prefix=prefix, tool=tool, tokenizer=tokenizer,
                dtype=self.dtype.name, documents=sum(g.documents for g in members),
                tokens=sum(g.tokens for g in members), groups=members,
            ))
        faults.crash_point("manifests")

        inputs = [self._input_record(i) for i in range(len(self.inputs))]
        subsets = [SubsetRecord(split=k[0], subset=k[1], documents=v[0], tokens=v[1], text_bytes=v[2])
                   for k, v in sorted(self.counts.items(), key=lambda kv: (str(kv[0][0]), kv[0][1]))]
        ended = datetime.datetime.now(datetime.timezone.utc)
        self.sessions[-1].seconds = round(time.time() - self._session_started, 3)
        manifest = RunManifest(
            prefix=run_name,
            tool=tool,
            created=ended.isoformat(timespec="seconds"),
            wall_seconds=round(sum(s.seconds for s in self.sessions), 3),
            sessions=self.sessions,
            command=self.command,
            options=dict(asdict(self.options), splitting=self.splitting),
            tokenizer=tokenizer,
            dtype=self.dtype.name,
            totals=Totals(
                records=sum(i.records for i in inputs),
                documents=sum(g.documents for g in groups),
                tokens=sum(g.tokens for g in groups),
                text_bytes=sum(s.text_bytes for s in subsets),
                skipped=self.skips.total,
                input_bytes=sum(i.size or 0 for i in inputs),
                shards=sum(len(g.shards) for g in groups),
            ),
            split_prefixes=self._split_prefixes(),
            groups=groups,
            subsets=subsets,
            sets_merged_into_other=self.table.merged,
            skipped=self.skips.as_dict(),
            damaged_inputs=[dict(path=i.path, **i.damaged) for i in inputs if i.damaged],
            inputs=inputs,
            part_manifests=sorted(manifest_path(p) for p in parts),
            fingerprint=self.fingerprint,
        )
        write_manifest(manifest_path(self.out), manifest)
        remove_progress(self.out)
        return manifest


def _tool_versions() -> ToolVersions:
    from importlib import metadata

    def version(dist: str) -> Optional[str]:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    return ToolVersions(name="mesh-pretrain data_prep", version=version("mesh-pretrain"),
                        sentencepiece=version("sentencepiece"), tokenizers=version("tokenizers"),
                        megatron_core=version("megatron-core"), python=sys.version.split()[0])


def tokenize_corpus(
    inputs: Sequence[Spec],
    tokenizer: Tokenizer,
    out: Union[str, os.PathLike],
    options: Optional[TokenizeOptions] = None,
    *,
    val_inputs: Sequence[Spec] = (),
    test_inputs: Sequence[Spec] = (),
    overwrite: bool = False,
    progress: bool = True,
    command: Optional[list] = None,
    node_rank: int = 0,
    num_nodes: int = 1,
) -> dict:
    """Tokenize ``inputs`` into sharded megatron datasets at prefix ``out``; return the run manifest.

    ``inputs`` (and ``val_inputs`` / ``test_inputs``, which go to the val /
    test splits) are file paths, directories, globs or ``HFDatasetInput``s.
    Rerunning after an interruption continues it; rerunning after completion
    returns the existing manifest (same inputs and options) or refuses
    (otherwise, unless ``overwrite``). Raises DataError for user errors,
    ``Interrupted`` after saving progress on SIGINT / SIGTERM.
    """
    options = options or TokenizeOptions()
    options.validate()
    splitting = bool(val_inputs or test_inputs or options.val_fraction or options.test_fraction)
    if (val_inputs or test_inputs) and (options.val_fraction or options.test_fraction):
        raise DataError("use either --val-fraction/--test-fraction or --val-input/--test-input, not both")
    resolved = resolve_inputs(inputs, val_inputs, test_inputs, node_rank, num_nodes)
    out = os.fspath(out)
    if not os.path.basename(out):
        raise DataError(f"--out {out!r} must be a file prefix (e.g. data/pile/pile), not a directory")
    if os.path.isdir(out):
        raise DataError(f"--out {out!r} is a directory; give a prefix inside it, e.g. {os.path.join(out, 'data')}")
    folder = os.path.dirname(out)
    if folder:
        os.makedirs(folder, exist_ok=True)
    fingerprint = _fingerprint(resolved, tokenizer, options, splitting)
    with _RunLock(out):
        action, state = _check_output(out, fingerprint, overwrite, splitting, options.shard_bytes)
        if action == "complete":
            print(f"{out}: already complete with these inputs and options; nothing to do", file=sys.stderr)
            return state.to_dict()
        run = _Run(out, resolved, tokenizer, options, splitting, fingerprint, command, progress)
        return run.run(state if action == "resume" else None).to_dict()


class _RunLock:
    """An exclusive lock on an output prefix: two runs writing one output would corrupt it.

    ``flock`` is released by the kernel when the process dies, so a killed run
    never leaves a stale lock behind (the empty lock file itself is harmless).
    """

    def __init__(self, out: str) -> None:
        self.path = out + ".lock"
        self._file = None

    def __enter__(self) -> "_RunLock":
        import fcntl

        self._file = open(self.path, "a")
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            self._file.close()
            raise DataError(f"another run is writing {self.path[:-5]!r} right now (it holds {self.path}); "
                            "wait for it or stop it") from err
        return self

    def __exit__(self, *exc) -> None:
        try:
            os.remove(self.path)
        except FileNotFoundError:
            pass
        self._file.close()


def output_is_complete(out: str, tokenizer: Optional[Tokenizer] = None) -> bool:
    """True when ``out`` has a complete run manifest whose shards all exist (and, if
    given, that used the same tokenizer by sha256)."""
    path = manifest_path(os.fspath(out))
    if not os.path.isfile(path) or os.path.exists(progress_path(os.fspath(out))):
        return False
    try:
        manifest = read_manifest(path)
    except DataError:
        return False
    if not manifest.complete:
        return False
    if tokenizer is not None and manifest.tokenizer.sha256 != tokenizer.sha256:
        return False
    return all(os.path.isfile(p) for p in output_files(path, manifest))
