"""``mesh data inspect PREFIX``: what a tokenization run produced, and a look at the data.

Prints the manifest as a readable summary (or verbatim with ``--json``), then
decodes a few randomly chosen documents back to text, which is the quickest
check that the tokenizer, EOD and dtype are what training will expect.
Shards are read directly (numpy memmap), without importing megatron-core.
(Not named ``inspect.py``: that would shadow the stdlib module.)
"""

from __future__ import annotations

import json
import os
import random
from typing import Optional

import numpy

from data_prep.errors import DataError
from data_prep.outputs.data_prefixes import find_manifest, manifest_shards
from data_prep.outputs.manifest import Manifest, RunManifest, load_manifest, manifest_from_dict
from data_prep.outputs.megatron_shards import check_shard, read_index
from data_prep.tokenizer import Tokenizer, file_sha256, load_tokenizer


def _human_bytes(n: Optional[int]) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return str(n)


def summary_lines(manifest: Manifest) -> list[str]:
    """The manifest as lines of text, most useful first."""
    lines = []
    run = manifest if isinstance(manifest, RunManifest) else None
    documents, tokens = (run.totals.documents, run.totals.tokens) if run else (manifest.documents, manifest.tokens)
    tok = manifest.tokenizer
    lines.append(f"{manifest.kind} manifest for {manifest.prefix}: "
                 f"{documents:,} documents, {tokens:,} tokens ({manifest.dtype})")
    lines.append(f"tokenizer      {tok.name} vocab_size {tok.vocab_size} eod {tok.eod} pad {tok.pad} "
                 f"({tok.path})")
    if run is None:
        lines.append(f"part of        {manifest.run_manifest}")
    else:
        tool, totals = run.tool, run.totals
        lines.append(f"made by        {tool.name} {tool.version} on {run.created}, "
                     f"wall time {run.wall_seconds:.1f} s in {len(run.sessions)} session(s)")
        if run.command:
            lines.append(f"command        {' '.join(run.command)}")
        lines.append("options        " + ", ".join(f"{k}={v}" for k, v in run.options.items()))
        lines.append(f"inputs         {len(run.inputs)} ({_human_bytes(totals.input_bytes)}), "
                     f"{totals.records:,} records, {totals.skipped:,} skipped")
        for item in run.inputs[:20]:
            sha = (item.sha256 or "-")[:16]
            split = f" [{item.split}]" if item.split else ""
            damaged = "  DAMAGED" if item.damaged else ""
            lines.append(f"  {item.path}{split}: {_human_bytes(item.size)} sha256 {sha}.. "
                         f"{item.documents:,} docs, {item.skipped:,} skipped{damaged}")
        if len(run.inputs) > 20:
            lines.append(f"  ... and {len(run.inputs) - 20} more (see --json)")
    lines.append("groups")
    for group in manifest.groups:
        lines.append(f"  {group.prefix}: {group.documents:,} docs, {group.tokens:,} tokens, "
                     f"{len(group.shards)} shard(s)")
    if run and run.subsets:
        lines.append("subsets (split, set: documents, tokens)")
        for row in run.subsets:
            split = f"{row.split}, " if row.split else ""
            lines.append(f"  {split}{row.subset}: {row.documents:,}, {row.tokens:,}")
    skipped = run.skipped if run else None
    if skipped and skipped["total"]:
        lines.append(f"skipped records: {skipped['total']:,}")
        for reason, count in skipped["by_reason"].items():
            lines.append(f"  {reason}: {count:,}")
            for example in skipped["examples"].get(reason, []):
                detail = f" ({example['detail']})" if example["detail"] else ""
                lines.append(f"    {example['file']} {example['at']}{detail}")
    for damaged in (run.damaged_inputs if run else []):
        lines.append(f"damaged input: {damaged['path']}: {damaged['error']}")
    return lines


def shard_document(prefix: str, dtype: numpy.dtype, lengths: numpy.ndarray, index: int) -> numpy.ndarray:
    """Token ids of document ``index`` of a shard (one sequence per document)."""
    offset = int(lengths[:index].sum(dtype=numpy.int64))
    data = numpy.memmap(prefix + ".bin", dtype=dtype, mode="r")
    return numpy.array(data[offset: offset + int(lengths[index])])


def _tokenizer_for(manifest: Manifest, override: Optional[str]) -> Tokenizer:
    recorded = manifest.tokenizer
    path = override or recorded.path
    if not path or not os.path.isfile(path):
        raise DataError(f"the tokenizer {path!r} recorded in the manifest is not here; pass --tokenizer PATH")
    if file_sha256(path) != recorded.sha256:
        raise DataError(f"tokenizer {path!r} is not the one these shards were made with "
                        f"(sha256 {recorded.sha256[:12]}); pass the right --tokenizer")
    return load_tokenizer(path, eod_token=recorded.extra.get("eod_token") or "<|endoftext|>")


def inspect_prefix(prefix: str, samples: int = 3, seed: int = 0, tokenizer_path: Optional[str] = None,
                   as_json: bool = False, list_prefixes: bool = False, verify: bool = False,
                   max_chars: int = 500) -> list[str]:
    """Lines to print for ``mesh data inspect``. Raises DataError for an unknown prefix."""
    path = find_manifest(prefix)
    raw = load_manifest(path) if path else None  # printed verbatim with --json
    manifest = manifest_from_dict(raw) if raw is not None else None
    if manifest is None:
        if not (os.path.isfile(prefix + ".bin") and os.path.isfile(prefix + ".idx")):
            raise DataError(f"{prefix!r} has neither a manifest ({prefix}.manifest.json) nor {prefix}.bin/.idx")
        shards = [(prefix, None)]
    else:
        shards = [(s.prefix, s.documents) for s in manifest_shards(path, manifest)]

    if list_prefixes:
        return [p for p, _ in shards]
    lines = [json.dumps(raw, indent=1)] if (as_json and manifest) else (summary_lines(manifest) if manifest else [])

    if verify:
        if manifest is None:
            raise DataError("--verify needs a manifest (it holds the checksums)")
        # The start-up check of training (megatron_shards.check_shard), with the checksums.
        checked, problems = manifest_shards(path, manifest), []
        for shard in checked:
            try:
                check_shard(shard.prefix, shard.record, path, verify_checksums=True)
            except DataError as err:
                problems.append(str(err))
        if problems:
            raise DataError(problems[0] if len(problems) == 1 else
                            f"{len(problems)} of {len(checked)} shards are damaged; the first: {problems[0]}")
        lines.append(f"verified: {len(checked)} shard(s) match their sizes and sha256 in the manifest")

    if samples > 0:
        if manifest is None and tokenizer_path is None:
            raise DataError(f"{prefix!r} has no manifest naming its tokenizer; pass --tokenizer to decode documents")
        tokenizer = (_tokenizer_for(manifest, tokenizer_path) if manifest is not None
                     else load_tokenizer(tokenizer_path))
        indexes = [(p, read_index(p)) for p, _ in shards]
        counts = [lengths.size for _, (_, lengths) in indexes]
        total = sum(counts)
        rng = random.Random(seed)
        picks = sorted(rng.sample(range(total), min(samples, total)))
        for pick in picks:
            which, local = 0, pick
            while local >= counts[which]:
                local -= counts[which]
                which += 1
            shard_prefix, (dtype, lengths) = indexes[which]
            ids = shard_document(shard_prefix, dtype, lengths, local)
            ends_with_eod = bool(ids.size) and int(ids[-1]) == tokenizer.eod
            text = tokenizer.decode(ids[:-1].tolist() if ends_with_eod else ids.tolist())
            shown = text if len(text) <= max_chars else text[:max_chars] + f" [... {len(text) - max_chars:,} more characters]"
            lines.append("")
            lines.append(f"--- document {local} of {os.path.basename(shard_prefix)} ({ids.size:,} tokens"
                         f"{', ends with EOD' if ends_with_eod else ', NO EOD at the end'}) ---")
            lines.append(shown)
    return lines
