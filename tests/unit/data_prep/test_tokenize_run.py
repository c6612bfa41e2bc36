"""mesh data tokenize: round trips, worker invariance, shards, splits, subsets, formats, manifests, inspect."""

from __future__ import annotations

import gzip
import json
import os
import pickle
from pathlib import Path

import numpy
import pytest

from data_prep.cli import main as data_main
from data_prep.errors import DataError
from data_prep.inputs.discovery import HFDatasetInput
from data_prep.outputs.data_prefixes import resolve_data_prefix
from data_prep.outputs.manifest import load_manifest
from data_prep.outputs.megatron_shards import index_bytes, token_dtype
from data_prep.tokenization.run import TokenizeOptions, tokenize_corpus
from data_prep.tokenizer import load_tokenizer
from tests.support.data import (
    TRICKY_DOCS,
    filler_docs,
    hf_tokenizer_json,
    pile_docs,
    read_documents,
    sentencepiece_model,
    shard_files,
    stable_manifest,
    write_jsonl,
    write_zst,
)

#: Small chunks and shards so a few hundred small documents exercise many of both.
SMALL = dict(chunk_bytes=1024, shard_bytes=8 * 1024)


def _decode_all(manifest_file, tok):
    """Texts of every document of every shard a manifest lists, in order."""
    texts = []
    for shard in resolve_data_prefix(str(manifest_file)):
        for ids in read_documents(shard.prefix):
            assert ids[-1] == tok.eod, "every document ends with EOD"
            assert tok.eod not in ids[:-1], "and EOD appears nowhere else"
            texts.append(tok.decode(ids[:-1].tolist()))
    return texts


# --------------------------------------------------------------------------
# Round trips
# --------------------------------------------------------------------------


def test_round_trip_sentencepiece_sharded(tmp_path):
    docs = [text for text, _ in pile_docs(150)]
    corpus = write_zst(tmp_path / "in.jsonl.zst", docs)
    tok = load_tokenizer(sentencepiece_model())
    out = tmp_path / "out" / "pile"
    manifest = tokenize_corpus([corpus], tok, out, TokenizeOptions(**SMALL), progress=False)

    assert _decode_all(out, tok) == docs
    (group,) = manifest["groups"]
    assert group["prefix"] == "pile" and len(group["shards"]) > 3
    assert [s["prefix"] for s in group["shards"]] == [f"pile_{i:05d}" for i in range(len(group["shards"]))]
    assert manifest["totals"]["documents"] == len(docs) == sum(s["documents"] for s in group["shards"])
    assert manifest["dtype"] == "uint16" and numpy.dtype(token_dtype(tok.vocab_size)) == numpy.uint16
    for shard in group["shards"]:
        sequences = read_documents(out.parent / shard["prefix"])
        assert len(sequences) == shard["documents"]
        assert sum(len(s) for s in sequences) == shard["tokens"]
        assert shard["bin_bytes"] == (out.parent / f"{shard['prefix']}.bin").stat().st_size
    # Bounded: a shard closes before the chunk that would take it over the bound.
    assert all(s["bin_bytes"] <= SMALL["shard_bytes"] for s in group["shards"])
    # Nothing temporary left; the manifest records inputs and tokenizer identity.
    leftovers = [p.name for p in out.parent.iterdir() if not p.name.endswith((".bin", ".idx", ".manifest.json"))]
    assert leftovers == []
    assert manifest["inputs"][0]["size"] == os.path.getsize(corpus)
    import hashlib

    assert manifest["inputs"][0]["sha256"] == hashlib.sha256(Path(corpus).read_bytes()).hexdigest()
    assert manifest["tokenizer"]["sha256"] == tok.sha256
    assert manifest["skipped"]["total"] == 0 and manifest["damaged_inputs"] == []
    assert {row["set"] for row in manifest["subsets"]} == {"Test"}


def test_round_trip_hf_tokenizer_json(tmp_path):
    tok = load_tokenizer(hf_tokenizer_json())
    docs = TRICKY_DOCS + filler_docs(30)
    corpus = write_jsonl(tmp_path / "in.jsonl", docs)
    manifest = tokenize_corpus([corpus], tok, tmp_path / "hf", TokenizeOptions(shard_bytes=None), progress=False)
    assert manifest["tokenizer"]["class"] == "HFTokenizer"
    assert manifest["tokenizer"]["eod_token"] == "<|endoftext|>" and tok.eod == 0
    # The document quoting "<|endoftext|>" is not cut in two by a false EOD (checked in _decode_all).
    assert _decode_all(tmp_path / "hf", tok) == docs


def test_tokenizer_pickles_by_path_and_checks_its_hash(tmp_path):
    """Workers receive the tokenizer as path + sha256 and refuse a file that changed meanwhile."""
    path = tmp_path / "tokenizer.json"
    path.write_text(Path(hf_tokenizer_json()).read_text())
    tok = load_tokenizer(path)
    data = pickle.dumps(tok)
    clone = pickle.loads(data)
    assert clone.encode("hello world") == tok.encode("hello world") and clone.sha256 == tok.sha256
    path.write_text(json.dumps(json.loads(path.read_text()), indent=1))  # same tokenizer, other bytes
    with pytest.raises(DataError, match="changed while in use"):
        pickle.loads(data)


# --------------------------------------------------------------------------
# Workers, splits, subsets
# --------------------------------------------------------------------------


@pytest.mark.slow
def test_worker_count_invariance(tmp_path):
    """1 and 4 workers write the same bytes (shards, subsets, fraction splits)."""
    corpus = write_zst(tmp_path / "in.jsonl.zst", pile_docs(240))
    tok = load_tokenizer(sentencepiece_model())
    results = {}
    for workers in (1, 4):
        options = TokenizeOptions(workers=workers, split_by_set=True, val_fraction=0.1, test_fraction=0.05, **SMALL)
        results[workers] = tokenize_corpus([corpus], tok, tmp_path / f"w{workers}" / "pile", options, progress=False)
    files = shard_files(tmp_path / "w1")
    assert len(files) > 10
    assert files == shard_files(tmp_path / "w4")
    assert stable_manifest(results[1]) == stable_manifest(results[4])


def test_split_by_set_and_fraction_splits(tmp_path):
    docs = pile_docs(300)
    docs += [docs[0], docs[1]]  # exact duplicates
    corpus = write_zst(tmp_path / "in.jsonl.zst", docs)
    tok = load_tokenizer(sentencepiece_model())
    out = tmp_path / "pile"
    manifest = tokenize_corpus([corpus], tok, out, TokenizeOptions(split_by_set=True, val_fraction=0.2, **SMALL),
                               progress=False)
    names = {g["name"] for g in manifest["groups"]}
    assert names == {f"{split}/{s}" for split in ("train", "val") for s in ("Pile-CC", "Github", "Wikipedia_en")}
    assert manifest["split_prefixes"] == {"train": "pile_train", "val": "pile_val"}
    # Each group, each split and the subsets are addressable prefixes.
    per_split = {split: _decode_all(f"{out}_{split}", tok) for split in ("train", "val")}
    assert sorted(per_split["train"] + per_split["val"]) == sorted(text for text, _ in docs)
    assert 0.1 < len(per_split["val"]) / len(docs) < 0.3
    for text, _ in docs[:2]:  # duplicates land in the same split
        assert per_split["train"].count(text) == 2 or per_split["val"].count(text) == 2
    github_val = _decode_all(f"{out}_val_Github", tok)
    assert github_val and set(github_val) <= {t for t, s in docs if s == "Github"}
    wiki = [row for row in manifest["subsets"] if row["set"] == "Wikipedia (en)"]
    assert {row["split"] for row in wiki} == {"train", "val"}
    assert sum(row["documents"] for row in manifest["subsets"]) == len(docs)
    # The whole run mixes splits: naming it as training data is refused.
    with pytest.raises(DataError, match="name one split's prefix"):
        resolve_data_prefix(str(out))


def test_val_and_test_inputs(tmp_path):
    tok = load_tokenizer(sentencepiece_model())
    train = write_zst(tmp_path / "train.jsonl.zst", filler_docs(40, seed=1))
    val = write_zst(tmp_path / "val.jsonl.zst", filler_docs(5, seed=2))
    test = write_jsonl(tmp_path / "test.jsonl", filler_docs(4, seed=3))
    out = tmp_path / "pile"
    manifest = tokenize_corpus([train], tok, out, TokenizeOptions(**SMALL), val_inputs=[val], test_inputs=[test],
                               progress=False)
    assert [g["name"] for g in manifest["groups"]] == ["train", "val", "test"]
    assert _decode_all(f"{out}_val", tok) == filler_docs(5, seed=2)
    assert _decode_all(f"{out}_test", tok) == filler_docs(4, seed=3)
    assert [i["split"] for i in manifest["inputs"]] == [None, "val", "test"]
    with pytest.raises(DataError, match="both train and val"):
        tokenize_corpus([tmp_path], tok, tmp_path / "x", val_inputs=[val], progress=False)
    with pytest.raises(DataError, match="either"):
        tokenize_corpus([train], tok, tmp_path / "y", TokenizeOptions(val_fraction=0.1), val_inputs=[val],
                        progress=False)


def test_subsets_beyond_max_sets_share_one_prefix(tmp_path):
    docs = [(f"document number {i} about things", f"set{i}") for i in range(6)]
    corpus = write_jsonl(tmp_path / "in.jsonl", docs)
    tok = load_tokenizer(sentencepiece_model())
    manifest = tokenize_corpus([corpus], tok, tmp_path / "o", TokenizeOptions(split_by_set=True, max_sets=3,
                                                                               shard_bytes=None), progress=False)
    assert [g["prefix"] for g in manifest["groups"]] == ["o_other-sets", "o_set0", "o_set1", "o_set2"]
    assert manifest["sets_merged_into_other"] == ["set3", "set4", "set5"]
    assert _decode_all(tmp_path / "o_other-sets", tok) == [t for t, _ in docs[3:]]


# --------------------------------------------------------------------------
# Input formats and input errors
# --------------------------------------------------------------------------


def test_directories_globs_and_every_file_format(tmp_path):
    import pyarrow
    import pyarrow.parquet

    folder = tmp_path / "data"
    (folder / "sub").mkdir(parents=True)
    a = filler_docs(6, seed=1)
    b = filler_docs(5, seed=2)
    c = filler_docs(4, seed=3)
    d = filler_docs(3, seed=4)
    write_zst(folder / "a.jsonl.zst", a)
    with gzip.open(folder / "b.jsonl.gz", "wt", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": t, "meta": {"pile_set_name": "Gz"}}) + "\n" for t in b)
    table = pyarrow.table({"text": c, "meta": [{"pile_set_name": "Parquet"}] * len(c)})
    pyarrow.parquet.write_table(table, folder / "sub" / "c.parquet", row_group_size=2)
    write_jsonl(folder / "sub" / "d.jsonl", d)
    (folder / "README.txt").write_text("not an input; directories skip it")
    tok = load_tokenizer(sentencepiece_model())

    manifest = tokenize_corpus([folder], tok, tmp_path / "dir", TokenizeOptions(shard_bytes=None), progress=False)
    assert [Path(i["path"]).name for i in manifest["inputs"]] == ["a.jsonl.zst", "b.jsonl.gz", "c.parquet", "d.jsonl"]
    assert [i["format"] for i in manifest["inputs"]] == ["jsonl.zst", "jsonl.gz", "parquet", "jsonl"]
    assert _decode_all(tmp_path / "dir", tok) == a + b + c + d
    assert {row["set"] for row in manifest["subsets"]} == {"Test", "Gz", "Parquet"}
    assert all(i["sha256"] and len(i["sha256"]) == 64 for i in manifest["inputs"])

    manifest = tokenize_corpus([str(folder / "**" / "*.json*")], tok, tmp_path / "glob",
                               TokenizeOptions(shard_bytes=None), progress=False)
    assert [Path(i["path"]).name for i in manifest["inputs"]] == ["a.jsonl.zst", "b.jsonl.gz", "d.jsonl"]


def test_custom_text_key(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps({"content": {"body": t}, "source": "S"}) + "\n" for t in TRICKY_DOCS))
    tok = load_tokenizer(sentencepiece_model())
    manifest = tokenize_corpus([path], tok, tmp_path / "o",
                               TokenizeOptions(text_key="content.body", set_key="source", shard_bytes=None),
                               progress=False)
    assert _decode_all(tmp_path / "o", tok) == TRICKY_DOCS
    assert [row["set"] for row in manifest["subsets"]] == ["S"]


def test_hugging_face_datasets(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    docs = filler_docs(12, seed=5)
    tok = load_tokenizer(sentencepiece_model())
    # A save_to_disk folder.
    saved = tmp_path / "saved"
    datasets.Dataset.from_dict({"text": docs, "meta": [{"pile_set_name": "HF"}] * len(docs)}).save_to_disk(str(saved))
    manifest = tokenize_corpus([HFDatasetInput(str(saved))], tok, tmp_path / "a", TokenizeOptions(shard_bytes=None),
                               progress=False)
    assert _decode_all(tmp_path / "a", tok) == docs
    assert manifest["inputs"][0]["format"] == "hf-dataset" and manifest["inputs"][0]["sha256"]
    assert [row["set"] for row in manifest["subsets"]] == ["HF"]
    # Local files through a `datasets` builder, via the CLI.
    jsonl = write_jsonl(tmp_path / "x.jsonl", docs[:5])
    assert data_main(["data", "tokenize", "--hf-dataset", "json", "--hf-data-files", jsonl, "--tokenizer",
                      sentencepiece_model(), "--out", str(tmp_path / "b"), "--no-progress", "--workers", "1"]) == 0
    assert _decode_all(tmp_path / "b_00000", tok) == docs[:5]
    # A hub name while offline: a one-line error before any work.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match="hub is disabled"):
        tokenize_corpus([HFDatasetInput("someone/some-dataset")], tok, tmp_path / "c", progress=False)


def test_unreadable_input_is_one_error_before_any_work(tmp_path, capsys):
    tok = load_tokenizer(sentencepiece_model())
    good = write_jsonl(tmp_path / "good.jsonl", ["fine"])
    (tmp_path / "empty").mkdir()
    cases = [
        ([good, str(tmp_path / "missing.jsonl.zst")], "does not exist"),
        ([str(tmp_path / "empty")], "holds no"),
        ([str(tmp_path / "nothing*.jsonl")], "matches no"),
        ([good, good], "given twice"),
    ]
    for inputs, message in cases:
        with pytest.raises(DataError, match=message):
            tokenize_corpus(inputs, tok, tmp_path / "out", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "good.jsonl"], "nothing written"
    # Through the CLI: one line on stderr, exit code 2, before the tokenizer is even loaded.
    code = data_main(["data", "tokenize", "--input", str(tmp_path / "empty"), "--tokenizer", "no-such.model",
                      "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "holds no" in err


def test_node_selection_partitions_inputs(tmp_path):
    tok = load_tokenizer(sentencepiece_model())
    files = [write_jsonl(tmp_path / f"{i}.jsonl", [f"document {i}"]) for i in range(5)]
    seen = []
    for rank in range(2):
        m = tokenize_corpus(files, tok, tmp_path / f"node{rank}", TokenizeOptions(shard_bytes=None),
                            node_rank=rank, num_nodes=2, progress=False)
        seen += _decode_all(tmp_path / f"node{rank}", tok)
        assert len(m["inputs"]) == (3 if rank == 0 else 2)
    assert sorted(seen) == [f"document {i}" for i in range(5)]
    with pytest.raises(DataError, match="node-rank"):
        tokenize_corpus(files, tok, tmp_path / "x", node_rank=2, num_nodes=2, progress=False)


# --------------------------------------------------------------------------
# Existing output
# --------------------------------------------------------------------------


def test_existing_output_is_never_overwritten_silently(tmp_path):
    tok = load_tokenizer(sentencepiece_model())
    corpus = write_zst(tmp_path / "in.jsonl.zst", filler_docs(30))
    out = tmp_path / "o"
    first = tokenize_corpus([corpus], tok, out, TokenizeOptions(**SMALL), progress=False)
    before = shard_files(tmp_path)
    # The same command: already complete, the same manifest back, nothing rewritten.
    assert tokenize_corpus([corpus], tok, out, TokenizeOptions(**SMALL), progress=False) == first
    assert shard_files(tmp_path) == before
    # Other options: refused.
    with pytest.raises(DataError, match="already exists.*--overwrite"):
        tokenize_corpus([corpus], tok, out, TokenizeOptions(chunk_bytes=4096), progress=False)
    assert shard_files(tmp_path) == before
    # --overwrite replaces everything of the old run (here: fewer, larger shards).
    again = tokenize_corpus([corpus], tok, out, TokenizeOptions(shard_bytes=None), overwrite=True, progress=False)
    assert [s["prefix"] for g in again["groups"] for s in g["shards"]] == ["o"]
    assert sorted(shard_files(tmp_path)) == ["o.bin", "o.idx"]
    # Output of the first tool version (a plain prefix) is protected too.
    legacy = tmp_path / "legacy"
    legacy.with_suffix(".bin").write_bytes(b"")
    with pytest.raises(DataError, match="already exists"):
        tokenize_corpus([corpus], tok, legacy, progress=False)


# --------------------------------------------------------------------------
# Format details, inspect
# --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [numpy.uint16, numpy.int32])
def test_index_is_byte_identical_to_megatron_builder(tmp_path, dtype):
    import torch
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    rng = numpy.random.default_rng(0)
    lengths = rng.integers(1, 50, size=37).astype(numpy.int32)
    builder = IndexedDatasetBuilder(str(tmp_path / "m.bin"), dtype=dtype)
    for n in lengths:
        builder.add_item(torch.from_numpy(rng.integers(0, 1000, size=int(n)).astype(numpy.int64)))
        builder.end_document()
    builder.finalize(str(tmp_path / "m.idx"))
    assert index_bytes(lengths, dtype) == (tmp_path / "m.idx").read_bytes()
    for vocab in (4096, 65499, 65500, 128_256):
        assert token_dtype(vocab) == DType.optimal_dtype(vocab)


def test_inspect_summarises_and_decodes(tmp_path, capsys):
    docs = [text for text, _ in pile_docs(60)]
    corpus = write_zst(tmp_path / "in.jsonl.zst", docs)
    out = str(tmp_path / "pile")
    assert data_main(["data", "tokenize", "--input", corpus, "--tokenizer", sentencepiece_model(), "--out", out,
                      "--shard-size", "16KiB", "--chunk-size", "2KiB", "--workers", "1", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "data prefix for training" in printed
    assert data_main(["data", "inspect", out, "--samples", "2", "--chars", "100000", "--verify"]) == 0
    printed = capsys.readouterr().out
    assert "run manifest for pile" in printed and "verified" in printed
    decoded = [block.split("\n", 1)[1].rstrip("\n") for block in printed.split("\n--- document ")[1:]]
    assert len(decoded) == 2 and all(text in {d.rstrip("\n") for d in docs} for text in decoded)
    assert data_main(["data", "inspect", out, "--prefixes"]) == 0
    prefixes = capsys.readouterr().out.split()
    assert prefixes == [s.prefix for s in resolve_data_prefix(out)] and len(prefixes) > 1
    assert data_main(["data", "inspect", out, "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == load_manifest(out + ".manifest.json")
    # A changed shard fails verification with a one-line error.
    with open(prefixes[0] + ".bin", "r+b") as f:
        f.write(b"\xff\xff")
    assert data_main(["data", "inspect", out, "--verify", "--samples", "0"]) == 2
    assert "changed" in capsys.readouterr().err
