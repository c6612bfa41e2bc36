"""Train a SentencePiece tokenizer from Pile-style JSON-lines documents.

Writes three files for ``output_prefix``:

* ``<prefix>.model``: the SentencePiece model, what ``load_tokenizer`` reads;
* ``<prefix>.vocab``: one ``piece<TAB>score`` line per id, for humans
  (backslash, newline, tab and CR inside pieces are written as \\\\, \\n, \\t, \\r);
* ``<prefix>.meta.json``: a sidecar with the training options, the corpus stats and
  the model's sha256. Written last, so it marks a complete, matching model.

Choices, and why:

* Special ids: ``pad=0, unk=1, bos=2, eos=3``. EOD (appended after every
  document) is ``eos``. Pad must be an id of its own: megatron-core's
  ``GPTDataset`` masks pad positions out of the loss, and if pad equalled EOD it
  would either mask every document boundary or (what it does) warn and stop
  masking padding at all. Pad is 0 so a zero-filled buffer reads as padding.
  ``bos`` is defined but never added by us; it costs one id and keeps the
  model usable by tools that expect one.
* Exact round trip: ``identity`` normalisation, no whitespace collapsing and no
  dummy prefix, so ``decode(encode(text)) == text``. Code indentation is
  meaningful; NFKC and whitespace squeezing would silently change the data.
  ``byte_fallback`` encodes any character outside the vocabulary as UTF-8 byte
  tokens instead of ``<unk>``, so nothing is lost either.
* ``allow_whitespace_only_pieces`` lets runs of spaces (indentation) become one
  token; ``split_digits`` stops numbers from eating vocabulary.
* Determinism: documents are sampled with a seeded RNG, fed in file order, and
  sentencepiece's own input shuffling is off. The model is serialised in
  memory (``model_writer``) rather than via ``model_prefix``, because
  sentencepiece records the prefix -- the output path -- inside the model,
  which would make the same tokenizer hash differently in another directory.
  ``num_threads`` is also recorded in the model, hence a fixed default rather
  than the machine's core count.
"""

from __future__ import annotations

import io
import json
import os
import random
import time
from typing import Iterator, Sequence

from data_prep.errors import DataError
from data_prep.inputs.document_reader import ReadStats, check_input_files, iter_documents
from data_prep.tokenizer import file_sha256

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3

#: 4096 for the demo: on the ~6 MB stdlib corpus an 8192 vocabulary gives only
#: ~9% fewer tokens (1.63 M vs 1.78 M) but doubles the embedding and output
#: layer, which dominate a tiny model's parameters and step time. 4096 is also
#: a multiple of 128, so the model's vocabulary padding adds nothing.
DEFAULT_VOCAB_SIZE = 4096
#: Fixed (not os.cpu_count()) because sentencepiece stores it in the model
#: file, and the file's sha256 is the tokenizer's identity.
DEFAULT_NUM_THREADS = 2
DEFAULT_SEED = 1234
#: sentencepiece skips any "sentence" longer than max_sentence_length bytes,
#: so documents are cut into chunks of whole lines below this size. Lines keep
#: their "\n", so newlines (and "):\n"-like pieces) are learned too.
MAX_SENTENCE_BYTES = 8192
CHUNK_BYTES = 4096


def _chunks(text: str, limit: int = CHUNK_BYTES) -> Iterator[str]:
    """Cut ``text`` into pieces of whole lines, each at most ``limit`` UTF-8 bytes.

    A single line longer than ``limit`` (minified data, long string literals)
    is cut every ``limit // 4`` characters: 4 bytes is the longest UTF-8 char,
    so each cut is guaranteed to fit.
    """
    buf: list[str] = []
    size = 0
    for line in text.splitlines(keepends=True):
        nbytes = len(line.encode("utf-8"))
        if nbytes > limit:
            if buf:
                yield "".join(buf)
                buf, size = [], 0
            step = limit // 4
            for start in range(0, len(line), step):
                yield line[start : start + step]
            continue
        if size + nbytes > limit and buf:
            yield "".join(buf)
            buf, size = [], 0
        buf.append(line)
        size += nbytes
    if buf:
        yield "".join(buf)


def _sample(documents: Iterator[str], k: int | None, seed: int) -> list[str]:
    """All documents, or a uniform sample of ``k`` of them in input order.

    Reservoir sampling: one pass, memory for ``k`` documents only. Returning
    them in input order (not reservoir order) keeps the sentencepiece input
    stable and readable.
    """
    if k is None:
        return list(documents)
    rng = random.Random(seed)
    reservoir: list[tuple[int, str]] = []
    for i, doc in enumerate(documents):
        if i < k:
            reservoir.append((i, doc))
        else:
            j = rng.randrange(i + 1)
            if j < k:
                reservoir[j] = (i, doc)
    reservoir.sort()
    return [doc for _, doc in reservoir]


def _escape_piece(piece: str) -> str:
    """Backslash-escape a piece so it fits on one line of the .vocab file.

    Our pieces can contain newlines and tabs (we keep whitespace), which would
    break the one-line-per-id layout sentencepiece's own writer assumes.
    """
    return piece.replace("\\", "\\\\").replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r")


def _write_vocab(model_bytes: bytes, path: str) -> None:
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_proto=model_bytes)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for i in range(sp.get_piece_size()):
            f.write(f"{_escape_piece(sp.id_to_piece(i))}\t{sp.get_score(i):g}\n")


def _atomic_write(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def train_sentencepiece(
    input_files: Sequence[str | os.PathLike],
    output_prefix: str | os.PathLike,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    model_type: str = "bpe",
    character_coverage: float = 0.9995,
    byte_fallback: bool = True,
    sample_documents: int | None = None,
    text_key: str = "text",
    seed: int = DEFAULT_SEED,
    num_threads: int = DEFAULT_NUM_THREADS,
) -> dict:
    """Train a tokenizer on the documents of ``input_files``; return the sidecar dict.

    ``sample_documents``: train on a seeded uniform sample of that many
    documents (None: all). ``character_coverage``: the fraction of characters
    the vocabulary must cover; the rest fall back to bytes.
    Raises DataError for bad options, missing inputs, or no usable documents.
    """
    if model_type not in ("bpe", "unigram"):
        raise DataError(f"model_type must be 'bpe' or 'unigram', got {model_type!r}")
    # 256 byte-fallback pieces + 4 special ids is the floor for a byte_fallback model.
    min_vocab = 256 + 4 + 1 if byte_fallback else 4 + 1
    if vocab_size < min_vocab:
        raise DataError(f"vocab_size {vocab_size} is too small; use at least {min_vocab}")
    if sample_documents is not None and sample_documents <= 0:
        raise DataError(f"sample_documents must be positive, got {sample_documents}")
    if not 0.0 < character_coverage <= 1.0:
        raise DataError(f"character_coverage must be in (0, 1], got {character_coverage}")
    inputs = check_input_files(input_files)  # files, directories, globs; DataError on a typo
    output_prefix = os.fspath(output_prefix)
    out_dir = os.path.dirname(output_prefix)
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)

    import sentencepiece

    read_stats = ReadStats()
    started = time.time()
    paths = [item.path for item in inputs]
    docs = _sample((text for text, _ in iter_documents(paths, text_key, read_stats)), sample_documents, seed)
    if not docs:
        raise DataError(f"no usable documents in {[os.fspath(p) for p in input_files]}; "
                        f"skipped lines: {dict(read_stats.skipped)}")

    # Feeding sentencepiece from an iterator keeps our reader (zstd, bad-line
    # handling) in charge of the input instead of its plain-text file reader.
    def sentences() -> Iterator[str]:
        for doc in docs:
            yield from _chunks(doc)

    sentencepiece.set_random_generator_seed(seed)
    model_buffer = io.BytesIO()
    try:
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=sentences(),
            model_writer=model_buffer,
            vocab_size=vocab_size,
            model_type=model_type,
            character_coverage=character_coverage,
            byte_fallback=byte_fallback,
            pad_id=PAD_ID,
            unk_id=UNK_ID,
            bos_id=BOS_ID,
            eos_id=EOS_ID,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            allow_whitespace_only_pieces=True,
            split_digits=True,
            max_sentence_length=MAX_SENTENCE_BYTES,
            input_sentence_size=0,  # we sample documents ourselves
            shuffle_input_sentence=False,
            num_threads=num_threads,
            minloglevel=2,  # sentencepiece's INFO log is hundreds of lines
        )
    except RuntimeError as err:
        # Typically "Vocabulary size is too high" on a small corpus.
        raise DataError(f"sentencepiece training failed: {err}; try a smaller --vocab-size or more data") from err
    model_bytes = model_buffer.getvalue()
    seconds = time.time() - started

    model_path, vocab_path, sidecar_path = (output_prefix + ext for ext in (".model", ".vocab", ".meta.json"))
    # Remove a previous sidecar first: until the new one exists, the model on
    # disk is not vouched for (a crash mid-way must not pair old and new files).
    if os.path.exists(sidecar_path):
        os.remove(sidecar_path)
    _atomic_write(model_path, model_bytes)
    _write_vocab(model_bytes, vocab_path)

    sidecar = {
        "model": os.path.basename(model_path),
        "sha256": file_sha256(model_path),
        "vocab_size": sentencepiece.SentencePieceProcessor(model_proto=model_bytes).get_piece_size(),
        "special_ids": {"pad": PAD_ID, "unk": UNK_ID, "bos": BOS_ID, "eos_eod": EOS_ID},
        "options": {
            "model_type": model_type,
            "requested_vocab_size": vocab_size,
            "character_coverage": character_coverage,
            "byte_fallback": byte_fallback,
            "sample_documents": sample_documents,
            "text_key": text_key,
            "seed": seed,
            "num_threads": num_threads,
            "normalization": "identity",
        },
        "inputs": [os.path.basename(p) for p in paths],
        "corpus": {
            "documents_read": read_stats.documents,
            "documents_used": len(docs),
            "text_bytes_read": read_stats.text_bytes,
            "skipped": dict(sorted(read_stats.skipped.items())),
            "damaged_inputs": read_stats.damaged,
        },
        "sentencepiece_version": sentencepiece.__version__,
        "train_seconds": round(seconds, 2),
    }
    _atomic_write(sidecar_path, (json.dumps(sidecar, indent=2) + "\n").encode("utf-8"))
    return sidecar


def tokenizer_is_complete(output_prefix: str | os.PathLike) -> bool:
    """True when ``<prefix>.model`` exists and its sidecar vouches for it (same sha256)."""
    output_prefix = os.fspath(output_prefix)
    model_path, sidecar_path = output_prefix + ".model", output_prefix + ".meta.json"
    if not (os.path.isfile(model_path) and os.path.isfile(sidecar_path)):
        return False
    try:
        with open(sidecar_path, encoding="utf-8") as f:
            recorded = json.load(f).get("sha256")
    except (OSError, ValueError):
        return False
    return recorded == file_sha256(model_path)
