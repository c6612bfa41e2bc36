"""Tests for data_prep: serial reader, demo corpus, tokenizers, GPTDataset on our shards, CLI.

The parallel tokenizer has its own files: test_data_prep_pipeline.py (round
trips, workers, sharding, splits, formats), test_data_prep_bad_input.py,
test_data_prep_resume.py (kill and resume) and test_data_prep_blend.py.
Inputs are tiny so the whole file runs in seconds.
"""

from __future__ import annotations

import json
import os
import warnings

import pytest
import zstandard

from data_prep import demo_corpus
from data_prep.cli import main as data_main
from data_prep.errors import DataError
from data_prep.inputs.document_reader import DocumentReader, ReadStats, iter_documents
from data_prep.inputs.skips import SkipReason
from data_prep.tokenization.run import TokenizeOptions, tokenize_corpus
from data_prep.tokenizer import HFTokenizer, SentencePieceTokenizer, load_tokenizer
from data_prep.train_tokenizer import (
    EOS_ID,
    PAD_ID,
    _chunks,
    tokenizer_is_complete,
    train_sentencepiece,
)

from tests.support.data import TRICKY_DOCS, hf_tokenizer_json as common_hf_tokenizer_json
from tests.support.data import write_zst as _write_zst


def _filler_docs(n: int = 120) -> list[str]:
    """Enough varied English-and-code text for a 400-piece BPE vocabulary."""
    words = ("the data model reads tokens from shards and writes the index for training "
             "while every document ends with a special token so the loader knows").split()
    docs = []
    for i in range(n):
        sentence = " ".join(words[(i + k) % len(words)] for k in range(12 + i % 7))
        docs.append(f"{sentence.capitalize()}.\n\ndef f_{i}(x):\n    return x * {i} + {i % 10}\n")
    return docs


@pytest.fixture(scope="module")
def corpus_and_tokenizer(tmp_path_factory):
    """A small .jsonl.zst corpus and a sentencepiece model trained on it (shared)."""
    root = tmp_path_factory.mktemp("sp")
    docs = TRICKY_DOCS + _filler_docs()
    corpus = _write_zst(root / "docs.jsonl.zst", docs)
    sidecar = train_sentencepiece([corpus], root / "tok", vocab_size=400)
    return docs, corpus, str(root / "tok"), sidecar


# --------------------------------------------------------------------------
# Reader
# --------------------------------------------------------------------------


def test_reader_counts_and_skips_bad_lines(tmp_path):
    path = tmp_path / "mixed.jsonl"
    lines = [
        json.dumps({"text": "good one", "meta": {"pile_set_name": "A"}}).encode(),
        b"{not json",
        json.dumps({"meta": {"pile_set_name": "A"}}).encode(),  # no text
        json.dumps({"text": ""}).encode(),
        json.dumps(["a", "list"]).encode(),
        json.dumps({"text": 42}).encode(),
        b"   ",
        b'{"text": "bad \xff byte"}',
        json.dumps({"text": "good two"}).encode(),  # no meta: set name None
    ]
    path.write_bytes(b"\n".join(lines) + b"\n")
    stats = ReadStats()
    docs = list(iter_documents([path], stats=stats))
    assert docs == [("good one", "A"), ("good two", None)]
    assert stats.documents == 2
    assert stats.skipped == {
        SkipReason.MALFORMED_JSON: 1,
        SkipReason.MISSING_TEXT: 1,
        SkipReason.EMPTY_TEXT: 1,
        SkipReason.NOT_AN_OBJECT: 1,
        SkipReason.TEXT_NOT_STRING: 1,
        SkipReason.BLANK_LINE: 1,
        SkipReason.INVALID_UTF8: 1,
    }
    assert stats.skipped_total == 7


def test_reader_custom_text_key_and_multi_frame_zst(tmp_path):
    # Two zstd frames concatenated (as produced by appending to a shard):
    # both must be read, not only the first.
    frames = [
        zstandard.ZstdCompressor().compress((json.dumps({"content": f"doc {i}"}) + "\n").encode())
        for i in range(2)
    ]
    path = tmp_path / "two_frames.jsonl.zst"
    path.write_bytes(b"".join(frames))
    reader = DocumentReader([path], text_key="content")
    assert [text for text, _ in reader] == ["doc 0", "doc 1"]
    assert reader.stats.documents == 2
    assert [text for text, _ in reader] == ["doc 0", "doc 1"]  # re-iterable
    assert reader.stats.documents == 2  # and stats are per pass


def test_reader_rejects_missing_and_unsupported_files(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        list(iter_documents([tmp_path / "missing.jsonl.zst"]))
    (tmp_path / "data.txt").write_text("hello")
    with pytest.raises(DataError, match="unsupported input file"):
        list(iter_documents([tmp_path / "data.txt"]))
    with pytest.raises(DataError, match="no input files"):
        list(iter_documents([]))
    with pytest.raises(DataError, match="holds no .jsonl"):
        list(iter_documents([tmp_path]))  # a directory without inputs


def test_reader_reports_corrupt_zst_and_reads_on(tmp_path):
    # Damage is reported, not raised: the other inputs are still read.
    corrupt = tmp_path / "a_corrupt.jsonl.zst"
    corrupt.write_bytes(b"this is not zstd data at all")
    good = _write_zst(tmp_path / "b_good.jsonl.zst", ["still read"])
    stats = ReadStats()
    assert [t for t, _ in iter_documents([corrupt, good], stats=stats)] == ["still read"]
    assert len(stats.damaged) == 1 and stats.damaged[0]["path"] == str(corrupt)
    assert "ZstdError" in stats.damaged[0]["error"]


# --------------------------------------------------------------------------
# Demo corpus
# --------------------------------------------------------------------------


def _read_lines(path):
    with open(path, "rb") as f:
        data = zstandard.ZstdDecompressor().stream_reader(f).read()
    return [json.loads(line) for line in data.decode("utf-8").splitlines()]


def test_demo_corpus_is_deterministic_and_in_pile_format(tmp_path):
    kwargs = dict(max_bytes=300_000, valid_fraction=0.25, seed=7)
    stats_a = demo_corpus.build_demo_corpus(tmp_path / "a", **kwargs)
    stats_b = demo_corpus.build_demo_corpus(tmp_path / "b", **kwargs)
    for name in (demo_corpus.TRAIN_FILE, demo_corpus.VAL_FILE):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert stats_a == stats_b
    assert demo_corpus.corpus_is_complete(tmp_path / "a")

    sources = {}
    total_bytes = 0
    for split, name in (("train", demo_corpus.TRAIN_FILE), ("val", demo_corpus.VAL_FILE)):
        records = _read_lines(tmp_path / "a" / name)
        assert len(records) == stats_a["splits"][split]["documents"] > 0
        for record in records:
            assert isinstance(record["text"], str) and record["text"]
            assert record["meta"]["pile_set_name"] in (demo_corpus.CODE_SET, demo_corpus.DOCS_SET)
            parts = set(record["meta"]["source"].split("/"))
            assert not parts & {"test", "tests", "idlelib", "site-packages"}
            total_bytes += len(record["text"].encode("utf-8"))
        sources[split] = {r["meta"]["source"] for r in records}
        assert {r["meta"]["pile_set_name"] for r in records} == {demo_corpus.CODE_SET, demo_corpus.DOCS_SET}
    assert not sources["train"] & sources["val"], "a module must not be in both splits"
    assert total_bytes <= 300_000
    assert total_bytes > 200_000, "the budget should be mostly used"

    # Another seed selects other modules.
    demo_corpus.build_demo_corpus(tmp_path / "c", max_bytes=300_000, valid_fraction=0.25, seed=8)
    assert (tmp_path / "c" / "train.jsonl.zst").read_bytes() != (tmp_path / "a" / "train.jsonl.zst").read_bytes()


def test_demo_corpus_docstrings_are_extracted(monkeypatch):
    source = '"""Module doc."""\n\nclass A:\n    """Class doc is long enough."""\n\n    def f(self):\n        """Method doc."""\n'
    assert demo_corpus.extract_docstrings(source, "pkg.mod") is None  # too short to be prose
    monkeypatch.setattr(demo_corpus, "MIN_DOCS_CHARS", 0)
    text = demo_corpus.extract_docstrings(source, "pkg.mod")
    assert text == "pkg.mod\n\nModule doc.\n\n\npkg.mod.A\n\nClass doc is long enough.\n\n\npkg.mod.A.f\n\nMethod doc."
    assert demo_corpus.extract_docstrings("def broken(:\n", "x") is None


def test_demo_corpus_adds_documentation_sources_as_whole_held_out_documents(tmp_path):
    """--docs-dir: one PythonDocsRst document per source file, each wholly in train or in val."""
    docs = tmp_path / "_sources"
    for i in range(40):
        page = docs / ("library" if i % 2 else "howto") / f"page{i}.rst.txt"
        page.parent.mkdir(parents=True, exist_ok=True)
        page.write_text(f"Page {i}\n" + "=" * 8 + f"\n\nThe text of page {i}. " * 20)
    (docs / "empty.rst.txt").write_text("  \n")
    (docs / "image.png").write_bytes(b"not text")
    stats = demo_corpus.build_demo_corpus(tmp_path / "out", max_bytes=100_000, valid_fraction=0.25, seed=7,
                                          docs_dir=str(docs))
    assert stats["docs_documents"] == 40  # the empty page and the PNG are not documents
    pages = {}
    for split, name in (("train", demo_corpus.TRAIN_FILE), ("val", demo_corpus.VAL_FILE)):
        records = [r for r in _read_lines(tmp_path / "out" / name)
                   if r["meta"]["pile_set_name"] == demo_corpus.REFERENCE_SET]
        assert records and stats["splits"][split]["documents_per_set"][demo_corpus.REFERENCE_SET] == len(records)
        pages[split] = {r["meta"]["source"] for r in records}
        for record in records:
            path = docs / record["meta"]["source"].removeprefix("python-docs/")
            assert record["text"] == path.read_text()
    assert not pages["train"] & pages["val"] and len(pages["train"] | pages["val"]) == 40
    assert 4 <= len(pages["val"]) <= 18  # about a quarter held out
    with pytest.raises(DataError, match="apt-get install python"):
        demo_corpus.build_demo_corpus(tmp_path / "x", max_bytes=100_000, docs_dir=str(tmp_path / "missing"))


def test_demo_corpus_rejects_bad_options(tmp_path):
    with pytest.raises(DataError, match="valid_fraction"):
        demo_corpus.build_demo_corpus(tmp_path, valid_fraction=1.5)
    with pytest.raises(DataError, match="max_bytes"):
        demo_corpus.build_demo_corpus(tmp_path, max_bytes=0)


# --------------------------------------------------------------------------
# Tokenizer training and the tokenizer interface
# --------------------------------------------------------------------------


def test_sentencepiece_training_outputs_and_special_ids(corpus_and_tokenizer):
    docs, _, prefix, sidecar = corpus_and_tokenizer
    assert tokenizer_is_complete(prefix)
    assert sidecar["vocab_size"] == 400
    tok = load_tokenizer(prefix + ".model")
    assert isinstance(tok, SentencePieceTokenizer)
    assert (tok.vocab_size, tok.eod, tok.pad) == (400, EOS_ID, PAD_ID)
    assert tok.sha256 == sidecar["sha256"]
    assert list(tok.unique_identifiers) == ["class", "sha256", "vocab_size", "eod", "pad"]
    json.dumps(tok.unique_identifiers)  # megatron-core JSON-dumps it into its cache key
    with open(prefix + ".vocab", encoding="utf-8") as f:
        assert len(f.readlines()) == 400
    # Lossless on everything, including whitespace and characters never seen.
    for doc in docs:
        assert tok.decode(tok.encode(doc)) == doc
    assert tok.encode_batch(docs[:3]) == [tok.encode(d) for d in docs[:3]]


def test_sentencepiece_training_is_deterministic_and_path_independent(corpus_and_tokenizer, tmp_path):
    _, corpus, _, first = corpus_and_tokenizer
    again = train_sentencepiece([corpus], tmp_path / "elsewhere" / "tok", vocab_size=400)
    assert again["sha256"] == first["sha256"]


def test_sentencepiece_training_rejects_bad_input(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        train_sentencepiece([tmp_path / "missing.jsonl"], tmp_path / "tok")
    with pytest.raises(DataError, match="too small"):
        train_sentencepiece([tmp_path / "missing.jsonl"], tmp_path / "tok", vocab_size=100)
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"text": ""}\n')
    with pytest.raises(DataError, match="no usable documents"):
        train_sentencepiece([empty], tmp_path / "tok")


def test_chunks_respect_sentencepiece_length_limit():
    text = "short line\n" * 50 + "x" * 10_000 + "\n" + "é" * 3000
    pieces = list(_chunks(text, limit=512))
    assert "".join(pieces) == text
    assert max(len(p.encode("utf-8")) for p in pieces) <= 512


def test_load_tokenizer_errors(tmp_path, corpus_and_tokenizer):
    with pytest.raises(DataError, match="does not exist"):
        load_tokenizer(tmp_path / "missing.model")
    with pytest.raises(DataError, match="does not exist"):
        load_tokenizer(tmp_path / "missing.json")
    (tmp_path / "vocab.txt").write_text("a\n")
    with pytest.raises(DataError, match="unknown tokenizer file type"):
        load_tokenizer(tmp_path / "vocab.txt")
    (tmp_path / "junk.model").write_bytes(b"not a model")
    with pytest.raises(DataError, match="cannot load sentencepiece model"):
        load_tokenizer(tmp_path / "junk.model")
    # The sentencepiece sidecar is <prefix>.meta.json: the error points at the .model.
    _, _, prefix, _ = corpus_and_tokenizer
    with pytest.raises(DataError, match="sidecar of sentencepiece model"):
        load_tokenizer(prefix + ".meta.json")


@pytest.fixture(scope="module")
def hf_tokenizer_json():
    return common_hf_tokenizer_json()


def test_hf_tokenizer_interface(hf_tokenizer_json):
    tok = load_tokenizer(hf_tokenizer_json)
    assert isinstance(tok, HFTokenizer)
    assert tok.eod == 0 and tok.pad == tok.eod  # no pad token named: pad falls back to EOD
    assert tok.vocab_size == 400
    assert tok.name.startswith("hf:")
    for doc in TRICKY_DOCS:
        assert tok.decode(tok.encode(doc)) == doc
    assert tok.encode_batch(TRICKY_DOCS) == [tok.encode(d) for d in TRICKY_DOCS]
    with_pad = HFTokenizer(hf_tokenizer_json, pad_token="<|pad|>")
    assert with_pad.pad == 1
    with pytest.raises(DataError, match="not in the vocabulary"):
        HFTokenizer(hf_tokenizer_json, eod_token="</s>")


# --------------------------------------------------------------------------
# megatron-core GPTDataset on our shards and tokenizer
# --------------------------------------------------------------------------


def build_gpt_datasets(train_prefix, val_prefix, tokenizer, cache_dir, sequence_length=64, sizes=(16, 8)):
    """The configuration the training loop reuses (world size 1, no process group).

    ``blend_per_split`` with one prefix per split and no weights builds plain
    GPTDatasets (no BlendedDataset), so an explicit ``path_to_cache`` works
    without a process group.
    """
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    config = GPTDatasetConfig(
        random_seed=1234,
        sequence_length=sequence_length,
        blend_per_split=[([str(train_prefix)], None), ([str(val_prefix)], None), None],
        path_to_cache=str(cache_dir),
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        mmap_bin_files=True,
    )
    builder = BlendedMegatronDatasetBuilder(GPTDataset, [sizes[0], sizes[1], None], lambda: True, config)
    return builder.build()


def test_gpt_dataset_builds_from_our_shards(corpus_and_tokenizer, tmp_path):
    docs, corpus, prefix, _ = corpus_and_tokenizer
    tok = load_tokenizer(prefix + ".model")
    single = TokenizeOptions(shard_bytes=None)
    tokenize_corpus([corpus], tok, tmp_path / "train_text_document", single, progress=False)
    val_corpus = _write_zst(tmp_path / "val.jsonl.zst", TRICKY_DOCS)
    tokenize_corpus([val_corpus], tok, tmp_path / "val_text_document", single, progress=False)

    import megatron.core.datasets.gpt_dataset  # noqa: F401  (its import warnings are not what we test)

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. megatron's pad-collides-with-EOD warning
        train, val, test = build_gpt_datasets(
            tmp_path / "train_text_document", tmp_path / "val_text_document", tok, tmp_path / "cache"
        )
    assert test is None
    assert len(train) >= 16 and len(val) >= 8
    saw_eod = False
    for dataset in (train, val):
        for i in range(8):
            sample = dataset[i]
            tokens, labels = sample["tokens"], sample["labels"]
            assert tokens.shape == labels.shape == (64,)
            assert int(tokens.min()) >= 0 and int(tokens.max()) < tok.vocab_size
            assert int(labels.min()) >= 0 and int(labels.max()) < tok.vocab_size
            assert bool((tokens[1:] == labels[:-1]).all()), "labels are tokens shifted by one"
            assert float(sample["loss_mask"].sum()) == 64.0  # no padding in full samples
            saw_eod = saw_eod or bool((tokens == tok.eod).any())
    assert saw_eod, "documents are packed with EOD separators"
    assert any(name.endswith("description.txt") for name in os.listdir(tmp_path / "cache"))


# --------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------


def test_cli_prepare_demo_is_idempotent(tmp_path, capsys):
    out = tmp_path / "demo"
    argv = ["data", "prepare-demo", "--out", str(out), "--max-bytes", "150000",
            "--vocab-size", "600", "--no-progress"]
    assert data_main(argv) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["vocab_size"] == 600 and manifest["eod"] == EOS_ID
    assert manifest["train_tokens"] > 0 and manifest["val_tokens"] > 0
    for name in ("tokenizer.model", "train_text_document.bin", "train_text_document.idx",
                 "train_text_document.manifest.json", "val_text_document.bin", "val_text_document.idx",
                 "corpus/train.jsonl.zst"):
        assert (out / name).is_file(), name
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.name != "manifest.json"}
    capsys.readouterr()

    assert data_main(argv) == 0
    printed = capsys.readouterr().out
    assert printed.count("skipping") == 4, printed
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes, "nothing rewritten"

    # A removed shard index is detected and only that split is redone.
    (out / "val_text_document.idx").unlink()
    assert data_main(argv) == 0
    assert (out / "val_text_document.idx").is_file()
    assert (out / "train_text_document.bin").stat().st_mtime_ns == mtimes[out / "train_text_document.bin"]


def test_cli_commands_and_user_errors(tmp_path, capsys):
    corpus = _write_zst(tmp_path / "docs.jsonl.zst", TRICKY_DOCS + _filler_docs())
    assert data_main(["data", "train-tokenizer", "--input", corpus, "--out", str(tmp_path / "tok"),
                      "--vocab-size", "400"]) == 0
    assert data_main(["data", "tokenize", "--input", corpus, "--tokenizer", str(tmp_path / "tok.model"),
                      "--out", str(tmp_path / "x_text_document"), "--no-progress"]) == 0
    assert "documents" in capsys.readouterr().out
    # The same command again: already complete, nothing to do.
    assert data_main(["data", "tokenize", "--input", corpus, "--tokenizer", str(tmp_path / "tok.model"),
                      "--out", str(tmp_path / "x_text_document"), "--no-progress"]) == 0
    assert "already complete" in capsys.readouterr().err
    # Other options on an existing output without --overwrite: a one-line user error, exit code 2.
    assert data_main(["data", "tokenize", "--input", corpus, "--tokenizer", str(tmp_path / "tok.model"),
                      "--out", str(tmp_path / "x_text_document"), "--no-progress", "--shard-size", "1MiB"]) == 2
    err = capsys.readouterr().err
    assert "already exists" in err and "--overwrite" in err and err.count("\n") == 1
    assert data_main(["data", "tokenize", "--input", str(tmp_path / "nope.jsonl"), "--tokenizer",
                      str(tmp_path / "tok.model"), "--out", str(tmp_path / "y")]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and err.count("\n") == 1
    assert not list(tmp_path.glob("y*")), "nothing written before the error"
    assert data_main(["data"]) == 2  # no subcommand: help, error status
