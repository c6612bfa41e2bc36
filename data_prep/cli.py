"""The ``mesh data`` commands: demo corpus, tokenizer training, tokenization.

Registered by ``mesh_cli.main`` through ``register(subparsers)``. Each command
is a thin shell around one function of this package, so everything the CLI
does can also be called (and tested) from Python. Bad input raises
``DataError``, which the top-level CLI prints as one line with exit code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from data_prep import demo_corpus, shards, train_tokenizer
from data_prep.errors import DataError
from data_prep.tokenizer import DEFAULT_EOD_TOKEN

#: Names inside a prepare-demo directory. The shard prefixes follow megatron's
#: "<name>_text_document" convention for the text key.
DEMO_CORPUS_DIR = "corpus"
DEMO_TOKENIZER_PREFIX = "tokenizer"
DEMO_TRAIN_PREFIX = "train_text_document"
DEMO_VAL_PREFIX = "val_text_document"
DEMO_MANIFEST = "manifest.json"


def _say(message: str) -> None:
    print(message, flush=True)


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
    _print_corpus_stats(args.out, stats)
    return 0


def _print_corpus_stats(out_dir: str, stats: dict) -> None:
    _say(f"demo corpus in {out_dir}: {stats['modules']} stdlib modules (Python {stats['python_version']})")
    for split, info in stats["splits"].items():
        per_set = ", ".join(f"{k} {v}" for k, v in info["documents_per_set"].items())
        _say(f"  {split:5s} {info['file']}: {info['documents']} documents ({per_set}), "
             f"{info['text_bytes'] / 1e6:.2f} MB of text")


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
    _print_tokenizer_stats(args.out, sidecar)
    return 0


def _print_tokenizer_stats(prefix: str, sidecar: dict) -> None:
    corpus = sidecar["corpus"]
    _say(f"tokenizer {prefix}.model: vocab_size {sidecar['vocab_size']}, eod id "
         f"{sidecar['special_ids']['eos_eod']}, pad id {sidecar['special_ids']['pad']}, "
         f"trained on {corpus['documents_used']} documents in {sidecar['train_seconds']:.1f} s "
         f"(sha256 {sidecar['sha256'][:12]})")
    if corpus["skipped"]:
        _say(f"  skipped input lines: {corpus['skipped']}")


def cmd_tokenize(args: argparse.Namespace) -> int:
    from data_prep.reader import check_input_files
    from data_prep.tokenizer import load_tokenizer

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
    _print_shard_stats(args.out, sidecar)
    return 0


def _print_shard_stats(prefix: str, sidecar: dict) -> None:
    _say(f"shards {prefix}.bin/.idx: {sidecar['documents']} documents, {sidecar['tokens']:,} tokens "
         f"({sidecar['dtype']}), {sidecar['tokens_per_second']:,} tokens/s")
    if sidecar["read"]["skipped"]:
        _say(f"  skipped input lines: {sidecar['read']['skipped']}")


def prepare_demo(
    out_dir: str,
    max_bytes: int = demo_corpus.DEFAULT_MAX_BYTES,
    vocab_size: int = train_tokenizer.DEFAULT_VOCAB_SIZE,
    seed: int = demo_corpus.DEFAULT_SEED,
    progress: bool = True,
) -> dict:
    """Corpus -> tokenizer -> train/val shards in ``out_dir``, skipping finished steps.

    A step is redone when its output is missing or incomplete, when its own
    options changed, or when an earlier step was redone (its input changed).
    Returns the manifest also written to ``out_dir/manifest.json``.
    """
    from data_prep.tokenizer import SentencePieceTokenizer

    started = time.time()
    corpus_dir = os.path.join(out_dir, DEMO_CORPUS_DIR)
    tok_prefix = os.path.join(out_dir, DEMO_TOKENIZER_PREFIX)

    # 1. Corpus.
    manifest_path = os.path.join(corpus_dir, demo_corpus.MANIFEST_FILE)
    corpus_stats = None
    if demo_corpus.corpus_is_complete(corpus_dir):
        with open(manifest_path, encoding="utf-8") as f:
            corpus_stats = json.load(f)
        wanted = {"max_bytes": max_bytes, "seed": seed, "valid_fraction": demo_corpus.DEFAULT_VALID_FRACTION}
        if any(corpus_stats.get(k) != v for k, v in wanted.items()):
            corpus_stats = None  # built with other options: stale
    rebuilt = corpus_stats is None
    if rebuilt:
        _say(f"[1/3] building demo corpus in {corpus_dir}")
        corpus_stats = demo_corpus.build_demo_corpus(corpus_dir, max_bytes=max_bytes, seed=seed)
    else:
        _say(f"[1/3] demo corpus already complete in {corpus_dir}, skipping")
    _print_corpus_stats(corpus_dir, corpus_stats)
    train_jsonl = os.path.join(corpus_dir, demo_corpus.TRAIN_FILE)
    val_jsonl = os.path.join(corpus_dir, demo_corpus.VAL_FILE)

    # 2. Tokenizer, trained on the training split only: validation text must
    #    not shape the vocabulary it is evaluated with.
    tok_sidecar = None
    if not rebuilt and train_tokenizer.tokenizer_is_complete(tok_prefix):
        with open(tok_prefix + ".json", encoding="utf-8") as f:
            tok_sidecar = json.load(f)
        options = tok_sidecar.get("options", {})
        if options.get("requested_vocab_size") != vocab_size or options.get("seed") != seed:
            tok_sidecar = None
    rebuilt = rebuilt or tok_sidecar is None
    if tok_sidecar is None:
        _say(f"[2/3] training tokenizer {tok_prefix}.model")
        tok_sidecar = train_tokenizer.train_sentencepiece([train_jsonl], tok_prefix, vocab_size=vocab_size, seed=seed)
    else:
        _say(f"[2/3] tokenizer {tok_prefix}.model already complete, skipping")
    _print_tokenizer_stats(tok_prefix, tok_sidecar)
    tokenizer = SentencePieceTokenizer(tok_prefix + ".model")

    # 3. Shards. Complete shards from the same tokenizer (sha256) are kept.
    shard_stats = {}
    for name, jsonl, prefix in (
        ("train", train_jsonl, DEMO_TRAIN_PREFIX),
        ("val", val_jsonl, DEMO_VAL_PREFIX),
    ):
        full_prefix = os.path.join(out_dir, prefix)
        if not rebuilt and shards.shards_are_complete(full_prefix, tokenizer):
            _say(f"[3/3] {name} shards {full_prefix} already complete, skipping")
            sidecar = shards.read_sidecar(full_prefix)
        else:
            _say(f"[3/3] tokenizing {name} split into {full_prefix}")
            # overwrite=True: anything at this prefix is incomplete or stale.
            sidecar = shards.tokenize_to_shards([jsonl], tokenizer, full_prefix, overwrite=True, progress=progress)
        _print_shard_stats(full_prefix, sidecar)
        shard_stats[name] = {"prefix": full_prefix, "documents": sidecar["documents"], "tokens": sidecar["tokens"]}

    manifest = {
        "tokenizer": tok_prefix + ".model",
        "tokenizer_sha256": tokenizer.sha256,
        "vocab_size": tokenizer.vocab_size,
        "eod": tokenizer.eod,
        "pad": tokenizer.pad,
        "train_prefix": shard_stats["train"]["prefix"],
        "val_prefix": shard_stats["val"]["prefix"],
        "train_tokens": shard_stats["train"]["tokens"],
        "val_tokens": shard_stats["val"]["tokens"],
        "train_documents": shard_stats["train"]["documents"],
        "val_documents": shard_stats["val"]["documents"],
    }
    with open(os.path.join(out_dir, DEMO_MANIFEST), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2)
        f.write("\n")
    _say(f"demo data ready in {out_dir} ({time.time() - started:.1f} s): "
         f"train {manifest['train_tokens']:,} tokens, val {manifest['val_tokens']:,} tokens, "
         f"vocab_size {manifest['vocab_size']}")
    return manifest


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
    data.set_defaults(func=lambda args: (data.print_help(), 2)[1])

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
            "Train a SentencePiece model and write PREFIX.model, PREFIX.vocab and PREFIX.json "
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
