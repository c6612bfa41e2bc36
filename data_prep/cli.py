"""The ``mesh data`` commands: demo corpus, tokenizer training, tokenization.

Registered by ``mesh_cli.main`` through ``register(subparsers)``. Each command
is a thin shell around one function of this package, so everything the CLI
does can also be called (and tested) from Python. Bad input raises
``DataError``, which the top-level CLI prints as one line with exit code 2.
"""

from __future__ import annotations

import argparse
import sys

from data_prep import demo_corpus, shards, train_tokenizer
from data_prep.demo import prepare_demo
from data_prep.errors import DataError
from data_prep.report import print_corpus_stats, print_shard_stats, print_tokenizer_stats
from data_prep.reader import check_input_files
from data_prep.tokenizer import DEFAULT_EOD_TOKEN, load_tokenizer


def _positive_int(value: str) -> int:
    number = int(value)
    if number <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return number


# --------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------


def cmd_demo_corpus(args: argparse.Namespace) -> int:
    stats = demo_corpus.build_demo_corpus(
        args.out, max_bytes=args.max_bytes, valid_fraction=args.valid_fraction, seed=args.seed
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
    check_input_files(args.input)  # cheap; fail on a typo before loading anything
    tokenizer = load_tokenizer(args.tokenizer, eod_token=args.eod_token)
    sidecar = shards.tokenize_to_shards(
        args.input,
        tokenizer,
        args.out,
        overwrite=args.overwrite,
        batch_size=args.batch_size,
        text_key=args.text_key,
        progress=not args.no_progress,
    )
    print_shard_stats(args.out, sidecar)
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
        help="prepare training data: demo corpus, tokenizer, tokenized shards",
        description=(
            "Data preparation. Input documents are JSON lines (.jsonl or zstd-compressed .jsonl.zst, "
            'the Pile\'s format: {"text": ..., "meta": {"pile_set_name": ...}}). Output shards are '
            "megatron-core indexed datasets (PREFIX.bin + PREFIX.idx) that training reads by PREFIX."
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
    p.add_argument("--input", required=True, nargs="+", metavar="FILE", help=".jsonl or .jsonl.zst files")
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
                   help="train on a seeded random sample of N documents (default: all)")
    p.add_argument("--seed", type=int, default=train_tokenizer.DEFAULT_SEED, help="sampling seed (default: %(default)s)")
    _add_text_key(p)
    p.set_defaults(func=cmd_train_tokenizer)

    p = commands.add_parser(
        "tokenize",
        help="tokenize JSON-lines documents into megatron-core .bin/.idx shards",
        description=(
            "Tokenize every document, append the end-of-document token, and write PREFIX.bin, "
            "PREFIX.idx and PREFIX.json. Refuses to replace an existing PREFIX unless --overwrite."
        ),
    )
    p.add_argument("--input", required=True, nargs="+", metavar="FILE", help=".jsonl or .jsonl.zst files")
    p.add_argument("--tokenizer", required=True, metavar="PATH",
                   help="sentencepiece .model or Hugging Face tokenizer.json")
    p.add_argument("--out", required=True, metavar="PREFIX", help="output prefix, e.g. data/train_text_document")
    p.add_argument("--overwrite", action="store_true", help="replace existing output at PREFIX")
    p.add_argument("--batch-size", type=_positive_int, default=shards.DEFAULT_BATCH_SIZE,
                   help="documents encoded per batch (default: %(default)s)")
    p.add_argument("--eod-token", default=DEFAULT_EOD_TOKEN,
                   help="end-of-document token for tokenizer.json files; sentencepiece models use "
                        "their eos (default: %(default)s)")
    _add_text_key(p)
    _add_no_progress(p)
    p.set_defaults(func=cmd_tokenize)

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
