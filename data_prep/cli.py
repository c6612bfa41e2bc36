"""The ``mesh data`` commands: demo corpus, tokenizer training, tokenization.

Registered by ``mesh_cli.main`` through ``register(subparsers)``. Each command
is a thin shell around one function of this package, so everything the CLI
does can also be called (and tested) from Python. Bad input raises
``DataError``, which the top-level CLI prints as one line with exit code 2.
"""

from __future__ import annotations

import argparse
import sys

import os
import re

from data_prep import demo_corpus, train_tokenizer
from data_prep.demo import prepare_demo
from data_prep.errors import DataError
from data_prep.inputs.discovery import HFDatasetInput
from data_prep.inputs.records import DEFAULT_MAX_DOCUMENT_BYTES
from data_prep.outputs.inspect_output import inspect_prefix
from data_prep.report import print_corpus_stats, print_run_summary, print_tokenizer_stats
from data_prep.tokenization.run import (
    DEFAULT_CHECKPOINT_SECONDS,
    DEFAULT_CHUNK_BYTES,
    DEFAULT_MAX_SETS,
    DEFAULT_SHARD_BYTES,
    Interrupted,
    TokenizeOptions,
    resolve_inputs,
    tokenize_corpus,
)
from data_prep.tokenizer import DEFAULT_EOD_TOKEN, load_tokenizer


def _positive_int(value: str) -> int:
    number = int(value)
    if number <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return number


_SIZE_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
               "t": 1000**4, "tb": 1000**4, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}


def parse_size(value: str) -> int:
    """A byte count: 123, 64MiB, 4GiB, 1.5GB (decimal units are powers of 1000)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", value)
    if not match or match.group(2).lower() not in _SIZE_UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {value!r} (examples: 1048576, 64MiB, 4GiB)")
    size = int(float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()])
    if size <= 0:
        raise argparse.ArgumentTypeError(f"size must be positive, got {value!r}")
    return size


def _shard_size(value: str):
    if value.strip().lower() in ("0", "none", "unlimited"):
        return None
    return parse_size(value)


def _fraction(value: str) -> float:
    number = float(value)
    if not 0 <= number < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {value}")
    return number


# --------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------


def cmd_demo_corpus(args: argparse.Namespace) -> int:
    stats = demo_corpus.build_demo_corpus(
        args.out, max_bytes=args.max_bytes, valid_fraction=args.valid_fraction, seed=args.seed,
        docs_dir=args.docs_dir,
    )
    print_corpus_stats(args.out, stats)
    return 0


def cmd_train_tokenizer(args: argparse.Namespace) -> int:
    sidecar = train_tokenizer.train_sentencepiece(
        args.input,
        args.out,
        vocab_size=args.vocab_size,
        model_type=args.model_type,
        character_coverage=args.character_coverage,
        byte_fallback=not args.no_byte_fallback,
        sample_documents=args.sample_documents,
        text_key=args.text_key,
        seed=args.seed,
    )
    print_tokenizer_stats(args.out, sidecar)
    return 0


def cmd_tokenize(args: argparse.Namespace) -> int:
    inputs = list(args.input or [])
    if args.hf_dataset:
        inputs.append(HFDatasetInput(args.hf_dataset, args.hf_config, args.hf_split,
                                     tuple(args.hf_data_files) if args.hf_data_files else None))
    elif args.hf_config or args.hf_data_files:
        raise DataError("--hf-config and --hf-data-files need --hf-dataset")
    if not inputs:
        raise DataError("no inputs: pass --input (files, directories or globs) and/or --hf-dataset")
    # Inputs are checked before the tokenizer is loaded: a typo should not wait for anything.
    resolve_inputs(inputs, args.val_input or (), args.test_input or (), args.node_rank, args.num_nodes)
    tokenizer = load_tokenizer(args.tokenizer, eod_token=args.eod_token)
    options = TokenizeOptions(
        text_key=args.text_key, set_key=args.set_key, split_by_set=args.split_by_set,
        val_fraction=args.val_fraction, test_fraction=args.test_fraction, split_seed=args.split_seed,
        shard_bytes=args.shard_size, chunk_bytes=args.chunk_size, max_document_bytes=args.max_document_size,
        max_sets=args.max_sets, workers=args.workers, batch_size=args.batch_size,
        checkpoint_seconds=args.checkpoint_interval, durable=not args.no_fsync,
    )
    try:
        manifest = tokenize_corpus(
            inputs, tokenizer, args.out, options,
            val_inputs=args.val_input or (), test_inputs=args.test_input or (),
            overwrite=args.overwrite, progress=not args.no_progress, command=list(sys.argv),
            node_rank=args.node_rank, num_nodes=args.num_nodes,
        )
    except Interrupted as stop:
        print(f"mesh data tokenize: {stop}", file=sys.stderr)
        return 130
    print_run_summary(args.out, manifest)
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    samples = args.samples if args.samples is not None else (0 if args.json or args.prefixes else 3)
    lines = inspect_prefix(
        args.prefix, samples=samples, seed=args.seed, tokenizer_path=args.tokenizer, as_json=args.json, list_prefixes=args.prefixes,
        verify=args.verify, max_chars=args.chars,
    )
    for line in lines:
        print(line)
    return 0


def cmd_prepare_demo(args: argparse.Namespace) -> int:
    prepare_demo(args.out, max_bytes=args.max_bytes, vocab_size=args.vocab_size, seed=args.seed,
                 progress=not args.no_progress)
    return 0


# --------------------------------------------------------------------------
# Argument parsing
# --------------------------------------------------------------------------


def _add_text_key(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--text-key", default="text", metavar="KEY",
                        help="JSON key holding each document's text (default: %(default)s)")


def _add_no_progress(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-progress", action="store_true", help="do not show the progress bar")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``data`` command and its subcommands to the top-level CLI."""
    data = subparsers.add_parser(
        "data",
        help="prepare training data: demo corpus, tokenizer, tokenized shards, inspection",
        description=(
            "Data preparation. Input documents are JSON lines (.jsonl, .jsonl.zst as in the Pile: "
            '{"text": ..., "meta": {"pile_set_name": ...}}, or .jsonl.gz), parquet files or Hugging Face '
            "datasets. Output shards are megatron-core indexed datasets (.bin + .idx) with a manifest; "
            "training names their prefix. See docs/data_prep.md."
        ),
    )
    commands = data.add_subparsers(dest="data_command", metavar="SUBCOMMAND")

    def show_help(args: argparse.Namespace) -> int:
        # `mesh data` without a subcommand: explain, and fail like argparse does.
        data.print_help()
        return 2

    data.set_defaults(func=show_help)

    p = commands.add_parser(
        "demo-corpus",
        help="build a small real corpus from this machine's Python standard library (no download)",
        description=(
            "Write OUT/train.jsonl.zst and OUT/val.jsonl.zst: one StdlibCode document per stdlib "
            "module (its source) and one StdlibDocs document (its docstrings). Deterministic for "
            "a given Python install and seed."
        ),
    )
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.add_argument("--max-bytes", type=_positive_int, default=demo_corpus.DEFAULT_MAX_BYTES,
                   help="text budget in bytes across both splits (default: %(default)s)")
    p.add_argument("--valid-fraction", type=float, default=demo_corpus.DEFAULT_VALID_FRACTION,
                   help="fraction of modules held out for validation (default: %(default)s)")
    p.add_argument("--seed", type=int, default=demo_corpus.DEFAULT_SEED,
                   help="seed for module selection and the split (default: %(default)s)")
    p.add_argument("--docs-dir", metavar="DIR", default=None,
                   help="also add every reStructuredText source of the Python documentation under "
                        "DIR as one PythonDocsRst document each, outside --max-bytes (Debian's "
                        f"python3.X-doc package: {demo_corpus.DEBIAN_DOCS_DIR})")
    p.set_defaults(func=cmd_demo_corpus)

    p = commands.add_parser(
        "train-tokenizer",
        help="train a SentencePiece tokenizer on JSON-lines documents",
        description=(
            "Train a SentencePiece model and write PREFIX.model, PREFIX.vocab and PREFIX.meta.json "
            "(options and sha256). Special ids: pad 0, unk 1, bos 2, eos 3 (end of document). "
            "Lossless: identity normalisation, whitespace kept, byte fallback."
        ),
    )
    p.add_argument("--input", required=True, nargs="+", metavar="PATH",
                   help=".jsonl, .jsonl.zst, .jsonl.gz or .parquet files, directories or quoted globs")
    p.add_argument("--out", required=True, metavar="PREFIX", help="output prefix, e.g. data/tokenizer")
    p.add_argument("--vocab-size", type=_positive_int, default=train_tokenizer.DEFAULT_VOCAB_SIZE,
                   help="vocabulary size including special and byte tokens (default: %(default)s)")
    p.add_argument("--model-type", choices=("bpe", "unigram"), default="bpe",
                   help="sentencepiece algorithm (unigram trains ~30x slower) (default: %(default)s)")
    p.add_argument("--character-coverage", type=float, default=0.9995,
                   help="fraction of characters covered by the vocabulary; the rest use byte tokens (default: %(default)s)")
    p.add_argument("--no-byte-fallback", action="store_true",
                   help="map unknown characters to <unk> instead of UTF-8 byte tokens (lossy)")
    p.add_argument("--sample-documents", type=_positive_int, default=None, metavar="N",
                   help="train on a seeded uniform sample of N documents (default: all). The sample is drawn "
                        "from everything read; for the Pile, whose files are shuffled, one file is enough input")
    p.add_argument("--seed", type=int, default=train_tokenizer.DEFAULT_SEED, help="sampling seed (default: %(default)s)")
    _add_text_key(p)
    p.set_defaults(func=cmd_train_tokenizer)

    p = commands.add_parser(
        "tokenize",
        help="tokenize documents into megatron-core .bin/.idx shards (parallel, resumable)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Tokenize every document, append the end-of-document (EOD) token, and write megatron-core\n"
            "indexed datasets (.bin/.idx) in shards of bounded size, plus OUT.manifest.json describing\n"
            "the run (inputs and checksums, tokenizer, counts per shard and subset, skipped records).\n\n"
            "Output names: OUT_00000, OUT_00001, ... (or OUT itself with --shard-size 0); with splits\n"
            "OUT_train_*, OUT_val_*, OUT_test_*; with --split-by-set OUT_<subset>_*. A training config\n"
            "names a prefix (OUT, OUT_train, OUT_Pile-CC, ...): its manifest lists all its shards.\n\n"
            "Interrupted (Ctrl-C, kill -9, a node failure)? Run the same command again: it continues\n"
            "where it stopped and the output is byte-identical to an uninterrupted run. The output does\n"
            "not depend on --workers. Existing output is never replaced without --overwrite.\n\n"
            "Bad records (malformed JSON, invalid UTF-8, no text, empty text, too large) are skipped and\n"
            "counted per reason in the manifest, the first few locations logged; a truncated or corrupt\n"
            ".zst/.gz file keeps everything before the damage and is reported."
        ),
        epilog=(
            "example (the Pile, one node):\n"
            "  mesh data tokenize --input pile/train --val-input pile/val.jsonl.zst \\\n"
            "      --test-input pile/test.jsonl.zst --tokenizer 20B_tokenizer.json \\\n"
            "      --out data/pile/pile --workers 32"
        ),
    )
    src = p.add_argument_group("inputs")
    src.add_argument("--input", nargs="+", metavar="PATH",
                     help=".jsonl, .jsonl.zst, .jsonl.gz or .parquet files, directories (searched recursively) or "
                          "quoted globs; read in the order given, each directory/glob sorted")
    src.add_argument("--val-input", nargs="+", metavar="PATH", help="inputs for the validation split (e.g. the Pile's val.jsonl.zst)")
    src.add_argument("--test-input", nargs="+", metavar="PATH", help="inputs for the test split")
    src.add_argument("--hf-dataset", metavar="NAME_OR_DIR",
                     help="a Hugging Face dataset through `datasets`: a save_to_disk folder, a local dataset "
                          "folder, or a hub name (online only); read after --input, into the training split")
    src.add_argument("--hf-config", metavar="NAME", help="dataset configuration name for --hf-dataset")
    src.add_argument("--hf-split", default="train", metavar="SPLIT", help="split of --hf-dataset to read (default: %(default)s)")
    src.add_argument("--hf-data-files", nargs="+", metavar="FILE",
                     help="data_files for datasets.load_dataset (with --hf-dataset json / parquet / text)")
    src.add_argument("--text-key", default="text", metavar="KEY",
                     help="field holding each document's text; dots reach into objects (default: %(default)s)")
    src.add_argument("--set-key", default="meta.pile_set_name", metavar="KEY",
                     help="field naming each document's subset (default: %(default)s)")
    src.add_argument("--max-document-size", type=parse_size, default=DEFAULT_MAX_DOCUMENT_BYTES,
                     metavar="SIZE", help="skip documents larger than this: the JSON line, or for parquet / HF "
                                          "datasets the text, in bytes (default: 64MiB)")
    src.add_argument("--num-nodes", type=_positive_int, default=1, metavar="K",
                     help="split the inputs over K nodes: this node takes every K-th input (default: 1)")
    src.add_argument("--node-rank", type=int, default=0, metavar="R",
                     help="this node's index in [0, K); give each node its own --out (default: 0)")

    tok = p.add_argument_group("tokenizer")
    tok.add_argument("--tokenizer", required=True, metavar="PATH",
                     help="sentencepiece .model or Hugging Face tokenizer.json (e.g. GPT-NeoX-20B's)")
    tok.add_argument("--eod-token", default=DEFAULT_EOD_TOKEN,
                     help="end-of-document token for tokenizer.json files; sentencepiece models use "
                          "their eos (default: %(default)s)")

    out = p.add_argument_group("output")
    out.add_argument("--out", required=True, metavar="PREFIX", help="output prefix, e.g. data/pile/pile")
    out.add_argument("--overwrite", action="store_true", help="replace existing output at PREFIX")
    out.add_argument("--shard-size", type=_shard_size, default=DEFAULT_SHARD_BYTES, metavar="SIZE",
                     help="largest .bin per shard, e.g. 1GiB; 0: one shard per prefix (default: 4GiB)")
    out.add_argument("--split-by-set", action="store_true",
                     help="one output prefix per subset (--set-key), for weighted blends in training")
    out.add_argument("--max-sets", type=_positive_int, default=DEFAULT_MAX_SETS, metavar="N",
                     help="subsets beyond the first N seen go to one 'other-sets' prefix (default: %(default)s)")
    out.add_argument("--val-fraction", type=_fraction, default=0.0, metavar="F",
                     help="send this fraction of documents (chosen by a hash of their text) to OUT_val")
    out.add_argument("--test-fraction", type=_fraction, default=0.0, metavar="F",
                     help="send this fraction of documents to OUT_test")
    out.add_argument("--split-seed", type=int, default=1234, help="seed of the split hash (default: %(default)s)")

    run = p.add_argument_group("performance and resume")
    run.add_argument("--workers", type=_positive_int, default=os.cpu_count() or 1, metavar="N",
                     help="tokenizer processes (default: all %(default)s cores); the output does not depend on it")
    run.add_argument("--chunk-size", type=parse_size, default=DEFAULT_CHUNK_BYTES, metavar="SIZE",
                     help="input per unit of work (default: 1MiB); part of the output's identity: keep it "
                          "when resuming")
    run.add_argument("--batch-size", type=_positive_int, default=512,
                     help="documents per tokenizer call (default: %(default)s)")
    run.add_argument("--checkpoint-interval", type=float, default=DEFAULT_CHECKPOINT_SECONDS,
                     metavar="SECONDS", help="save resumable progress this often (default: %(default)s)")
    run.add_argument("--no-fsync", action="store_true",
                     help="do not fsync at checkpoints (still safe against kill -9, not against power loss)")
    _add_no_progress(run)
    p.set_defaults(func=cmd_tokenize)

    p = commands.add_parser(
        "inspect",
        help="print a tokenized output's manifest and decode a few random documents",
        description=(
            "Summarise PREFIX's manifest (inputs, tokenizer, counts per group and subset, skipped records, "
            "damaged inputs) and decode a few randomly chosen documents back to text. PREFIX is what "
            "`mesh data tokenize --out` was given, a group prefix (PREFIX_train, PREFIX_Pile-CC), a "
            ".manifest.json file, or a plain megatron prefix (then pass --tokenizer)."
        ),
    )
    p.add_argument("prefix", metavar="PREFIX")
    p.add_argument("--samples", type=int, default=None, metavar="N", help="documents to decode (default: 3)")
    p.add_argument("--seed", type=int, default=0, help="which documents (default: %(default)s)")
    p.add_argument("--chars", type=_positive_int, default=500, help="characters shown per document (default: %(default)s)")
    p.add_argument("--tokenizer", metavar="PATH", help="tokenizer to decode with (default: the manifest's)")
    p.add_argument("--json", action="store_true", help="print the manifest verbatim")
    p.add_argument("--prefixes", action="store_true",
                   help="print only the shard prefixes, one per line (for scripts and configs)")
    p.add_argument("--verify", action="store_true", help="check every shard file against its sha256 in the manifest")
    p.set_defaults(func=cmd_inspect)

    p = commands.add_parser(
        "prepare-demo",
        help="demo-corpus + train-tokenizer + tokenize, in one idempotent step",
        description=(
            "Build everything a CPU demo run needs in DIR: corpus/ (stdlib JSON lines), "
            "tokenizer.model, train_text_document and val_text_document shards, and manifest.json. "
            "Steps whose outputs are complete and current are skipped, so rerunning is cheap."
        ),
    )
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.add_argument("--max-bytes", type=_positive_int, default=demo_corpus.DEFAULT_MAX_BYTES,
                   help="corpus text budget in bytes (default: %(default)s)")
    p.add_argument("--vocab-size", type=_positive_int, default=train_tokenizer.DEFAULT_VOCAB_SIZE,
                   help="tokenizer vocabulary size (default: %(default)s)")
    p.add_argument("--seed", type=int, default=demo_corpus.DEFAULT_SEED, help="seed for corpus and tokenizer (default: %(default)s)")
    _add_no_progress(p)
    p.set_defaults(func=cmd_prepare_demo)


def main(argv: list[str] | None = None) -> int:
    """Run the data commands alone (``python -m data_prep.cli``), without the full CLI."""
    parser = argparse.ArgumentParser(prog="mesh")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except DataError as err:
        print(f"mesh {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
