"""``prepare_demo``: everything a CPU demo run needs, in one idempotent call.

corpus (stdlib JSON lines) -> sentencepiece tokenizer -> train/val shards, laid
out in one directory::

    DIR/corpus/{train,val}.jsonl.zst, corpus.json
    DIR/tokenizer.model (+ .vocab, .meta.json sidecar)
    DIR/train_text_document.{bin,idx,manifest.json}
    DIR/val_text_document.{bin,idx,manifest.json}
    DIR/manifest.json     paths, vocab size, EOD/pad ids, token counts

Used by ``mesh data prepare-demo`` and by ``mesh demo`` before training.
Every step writes atomically and records a sidecar or manifest, so "complete"
is cheap to check and a rerun only redoes what is missing or stale. The shards
are single files per split (``shard_bytes=None``), so the prefixes are plain
megatron prefixes that any tool can open.
"""

from __future__ import annotations

import json
import os
import time

from data_prep import demo_corpus, train_tokenizer
from data_prep.outputs.manifest import RunManifest, load_manifest, manifest_path as shard_manifest_path
from data_prep.report import print_corpus_stats, print_run_summary, print_tokenizer_stats, say
from data_prep.tokenization.run import TokenizeOptions, output_is_complete, tokenize_corpus
from data_prep.tokenizer import SentencePieceTokenizer

#: Names inside a prepare-demo directory. The shard prefixes follow megatron's
#: "<name>_text_document" convention for the text key.
DEMO_CORPUS_DIR = "corpus"
DEMO_TOKENIZER_PREFIX = "tokenizer"
DEMO_TRAIN_PREFIX = "train_text_document"
DEMO_VAL_PREFIX = "val_text_document"
DEMO_MANIFEST = "manifest.json"


def prepare_demo(
    out_dir: str | os.PathLike,
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
    started = time.time()
    out_dir = os.fspath(out_dir)
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
        say(f"[1/3] building demo corpus in {corpus_dir}")
        corpus_stats = demo_corpus.build_demo_corpus(corpus_dir, max_bytes=max_bytes, seed=seed)
    else:
        say(f"[1/3] demo corpus already complete in {corpus_dir}, skipping")
    print_corpus_stats(corpus_dir, corpus_stats)
    train_jsonl = os.path.join(corpus_dir, demo_corpus.TRAIN_FILE)
    val_jsonl = os.path.join(corpus_dir, demo_corpus.VAL_FILE)

    # 2. Tokenizer, trained on the training split only: validation text must
    #    not shape the vocabulary it is evaluated with.
    tok_sidecar = None
    if not rebuilt and train_tokenizer.tokenizer_is_complete(tok_prefix):
        with open(tok_prefix + ".meta.json", encoding="utf-8") as f:
            tok_sidecar = json.load(f)
        options = tok_sidecar.get("options", {})
        if options.get("requested_vocab_size") != vocab_size or options.get("seed") != seed:
            tok_sidecar = None
    rebuilt = rebuilt or tok_sidecar is None
    if tok_sidecar is None:
        say(f"[2/3] training tokenizer {tok_prefix}.model")
        tok_sidecar = train_tokenizer.train_sentencepiece([train_jsonl], tok_prefix, vocab_size=vocab_size, seed=seed)
    else:
        say(f"[2/3] tokenizer {tok_prefix}.model already complete, skipping")
    print_tokenizer_stats(tok_prefix, tok_sidecar)
    tokenizer = SentencePieceTokenizer(tok_prefix + ".model")

    # 3. Shards. Complete shards from the same tokenizer (sha256) are kept.
    shard_stats = {}
    for name, jsonl, prefix in (
        ("train", train_jsonl, DEMO_TRAIN_PREFIX),
        ("val", val_jsonl, DEMO_VAL_PREFIX),
    ):
        full_prefix = os.path.join(out_dir, prefix)
        if not rebuilt and output_is_complete(full_prefix, tokenizer):
            say(f"[3/3] {name} shards {full_prefix} already complete, skipping")
            shard_manifest = load_manifest(shard_manifest_path(full_prefix))
        else:
            say(f"[3/3] tokenizing {name} split into {full_prefix}")
            # overwrite=True: anything at this prefix is incomplete or stale.
            # One worker: the demo corpus is a few MB, and worker start-up would dominate.
            shard_manifest = tokenize_corpus([jsonl], tokenizer, full_prefix, TokenizeOptions(shard_bytes=None),
                                             overwrite=True, progress=progress)
        print_run_summary(full_prefix, shard_manifest)
        totals = RunManifest.from_dict(shard_manifest).totals
        shard_stats[name] = {"prefix": full_prefix, "documents": totals.documents, "tokens": totals.tokens}

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
    say(f"demo data ready in {out_dir} ({time.time() - started:.1f} s): "
         f"train {manifest['train_tokens']:,} tokens, val {manifest['val_tokens']:,} tokens, "
         f"vocab_size {manifest['vocab_size']}")
    return manifest
