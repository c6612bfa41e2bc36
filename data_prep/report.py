"""One-line human summaries of what each data step produced.

Shared by the ``mesh data`` commands and ``prepare_demo`` so both report the
same way; every function takes the stats dict the step returned (or stored in
its sidecar), so a skipped step can be reported from its sidecar alone.
"""

from __future__ import annotations

import os

from data_prep.outputs.manifest import RunManifest


def say(message: str) -> None:
    print(message, flush=True)


def print_corpus_stats(out_dir: str, stats: dict) -> None:
    docs = f" + {stats['docs_documents']} documentation sources" if stats.get("docs_documents") else ""
    say(f"demo corpus in {out_dir}: {stats['modules']} stdlib modules{docs} (Python {stats['python_version']})")
    for split, info in stats["splits"].items():
        per_set = ", ".join(f"{k} {v}" for k, v in info["documents_per_set"].items())
        say(f"  {split:5s} {info['file']}: {info['documents']} documents ({per_set}), "
             f"{info['text_bytes'] / 1e6:.2f} MB of text")


def print_tokenizer_stats(prefix: str, sidecar: dict) -> None:
    corpus = sidecar["corpus"]
    say(f"tokenizer {prefix}.model: vocab_size {sidecar['vocab_size']}, eod id "
         f"{sidecar['special_ids']['eos_eod']}, pad id {sidecar['special_ids']['pad']}, "
         f"trained on {corpus['documents_used']} documents in {sidecar['train_seconds']:.1f} s "
         f"(sha256 {sidecar['sha256'][:12]})")
    if corpus["skipped"]:
        say(f"  skipped input lines: {corpus['skipped']}")


def print_run_summary(out: str, manifest: dict) -> None:
    """What a tokenization run produced (its run manifest), and what to put in a training config."""
    run = RunManifest.from_dict(manifest)
    totals = run.totals
    rate = totals.tokens / max(run.wall_seconds, 1e-9)
    say(f"{out}: {totals.documents:,} documents, {totals.tokens:,} tokens ({run.dtype}) "
        f"in {totals.shards} shard(s), {rate:,.0f} tokens/s over {run.wall_seconds:.1f} s")
    for group in run.groups:
        say(f"  {group.prefix}: {group.documents:,} documents, {group.tokens:,} tokens, "
            f"{len(group.shards)} shard(s)")
    skipped = run.skipped
    if skipped["total"]:
        reasons = ", ".join(f"{k} {v:,}" for k, v in skipped["by_reason"].items())
        say(f"  skipped {skipped['total']:,} records: {reasons} (first locations in the manifest)")
    for damaged in run.damaged_inputs:
        say(f"  damaged input {damaged['path']}: {damaged['error']}")
    split_prefixes = run.split_prefixes or {}
    folder = os.path.dirname(out)
    if split_prefixes:
        names = ", ".join(f"{split}: {os.path.join(folder, p)}" for split, p in split_prefixes.items())
        say(f"  data prefixes for training ({names})")
    else:
        say(f"  data prefix for training: {out}")
    say(f"  manifest: {out}.manifest.json (mesh data inspect {out})")
