"""One-line human summaries of what each data step produced.

Shared by the ``mesh data`` commands and ``prepare_demo`` so both report the
same way; every function takes the stats dict the step returned (or stored in
its sidecar), so a skipped step can be reported from its sidecar alone.
"""

from __future__ import annotations


def say(message: str) -> None:
    print(message, flush=True)


def print_corpus_stats(out_dir: str, stats: dict) -> None:
    say(f"demo corpus in {out_dir}: {stats['modules']} stdlib modules (Python {stats['python_version']})")
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


def print_shard_stats(prefix: str, sidecar: dict) -> None:
    say(f"shards {prefix}.bin/.idx: {sidecar['documents']} documents, {sidecar['tokens']:,} tokens "
         f"({sidecar['dtype']}), {sidecar['tokens_per_second']:,} tokens/s")
    if sidecar["read"]["skipped"]:
        say(f"  skipped input lines: {sidecar['read']['skipped']}")
