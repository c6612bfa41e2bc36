"""Bad input never crashes a run and is never dropped silently: every case counted, first locations kept."""

from __future__ import annotations

import gzip
import json
import random
import string

import pytest
import zstandard

from data_prep.errors import DataError
from data_prep.inputs.skips import MAX_EXAMPLES, SkipReason
from data_prep.tokenization.run import TokenizeOptions, tokenize_corpus
from data_prep.tokenizer import load_tokenizer
from tests.support.data import filler_docs, read_documents, sentencepiece_model, write_zst


def _texts(prefix, tok):
    return [tok.decode(ids[:-1].tolist()) for ids in read_documents(prefix)]


def _tokenize(inputs, out, **options):
    tok = load_tokenizer(sentencepiece_model())
    options.setdefault("shard_bytes", None)
    return tok, tokenize_corpus(inputs, tok, out, TokenizeOptions(**options), progress=False)


def _line(text, **extra) -> bytes:
    return json.dumps({"text": text, "meta": {"pile_set_name": "T"}, **extra}).encode()


def test_every_bad_record_is_counted_with_its_location(tmp_path, capfd):
    big = "x" * 5000
    lines = [
        _line("good one"),                        # 1
        b"{not json",                             # 2
        json.dumps({"meta": {}}).encode(),        # 3 no text key
        _line(""),                                # 4 empty
        _line("  \n\t "),                         # 5 whitespace only
        b'{"text": "bad \xff byte"}',             # 6 invalid UTF-8
        b'{"text": "lone \\ud800 surrogate"}',    # 7 invalid UTF-8 once decoded
        json.dumps(["a", "list"]).encode(),       # 8
        json.dumps({"text": 42}).encode(),        # 9
        b"",                                      # 10 blank line
        _line(big),                               # 11 over --max-document-size
        _line("good two"),                        # 12
        b"{also not json",                        # 13
    ]
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    tok, manifest = _tokenize([path], tmp_path / "out", max_document_bytes=4096, chunk_bytes=64)
    assert _texts(tmp_path / "out", tok) == ["good one", "good two"]
    skipped = manifest["skipped"]
    assert skipped["by_reason"] == {
        SkipReason.MALFORMED_JSON: 2,
        SkipReason.MISSING_TEXT: 1,
        SkipReason.EMPTY_TEXT: 2,
        SkipReason.INVALID_UTF8: 2,
        SkipReason.NOT_AN_OBJECT: 1,
        SkipReason.TEXT_NOT_STRING: 1,
        SkipReason.BLANK_LINE: 1,
        SkipReason.DOCUMENT_TOO_LARGE: 1,
    }
    assert skipped["total"] == 11 == manifest["inputs"][0]["skipped"]
    assert manifest["inputs"][0]["records"] == 13
    at = {reason: [e["at"] for e in examples] for reason, examples in skipped["examples"].items()}
    assert at[SkipReason.MALFORMED_JSON] == ["line 2", "line 13"]
    assert at[SkipReason.INVALID_UTF8] == ["line 6", "line 7"]
    assert at[SkipReason.DOCUMENT_TOO_LARGE] == ["line 11"]
    assert skipped["examples"][SkipReason.MISSING_TEXT][0]["file"] == str(path)
    # The first locations are logged as they are found.
    err = capfd.readouterr().err
    assert f"skipped {path} line 2: malformed_json" in err


def test_first_locations_are_capped_but_counts_are_not(tmp_path):
    path = tmp_path / "many.jsonl"
    path.write_text("".join("{broken\n" if i % 2 else json.dumps({"text": f"doc {i}"}) + "\n" for i in range(40)))
    _, manifest = _tokenize([path], tmp_path / "out", chunk_bytes=50)
    assert manifest["skipped"]["by_reason"] == {SkipReason.MALFORMED_JSON: 20}
    examples = manifest["skipped"]["examples"][SkipReason.MALFORMED_JSON]
    assert [e["at"] for e in examples] == [f"line {n}" for n in (2, 4, 6, 8, 10)][:MAX_EXAMPLES]


def test_oversize_line_is_skipped_while_streaming(tmp_path):
    """A line far over the limit is never held whole; line numbers after it stay right."""
    docs = filler_docs(6)
    rng = random.Random(0)
    noise = "".join(rng.choice(string.ascii_letters) for _ in range(3_000_000))  # compresses only ~1.5:1
    lines = [_line(docs[0]), _line(docs[1]), _line(noise), _line(docs[2]), b"{broken", _line(docs[3]),
             _line("z" * 20_000), _line(docs[4])]
    path = tmp_path / "big.jsonl.zst"
    path.write_bytes(zstandard.ZstdCompressor().compress(b"\n".join(lines) + b"\n"))
    tok, manifest = _tokenize([path], tmp_path / "out", max_document_bytes=10_000, chunk_bytes=1024)
    assert _texts(tmp_path / "out", tok) == docs[:5]
    examples = manifest["skipped"]["examples"]
    assert [e["at"] for e in examples[SkipReason.DOCUMENT_TOO_LARGE]] == ["line 3", "line 7"]
    # The 3 MB line was dropped by the reader without being held; the 20 kB one by the worker.
    assert "not read" in examples[SkipReason.DOCUMENT_TOO_LARGE][0]["detail"]
    assert [e["at"] for e in examples[SkipReason.MALFORMED_JSON]] == ["line 5"]
    assert manifest["inputs"][0]["records"] == 8


@pytest.mark.parametrize("compression", ["zst", "gz"])
def test_truncated_compressed_file_keeps_what_is_readable(tmp_path, compression):
    # Large enough for many zstd blocks (128 KiB each): a truncated block cannot be decoded at all.
    docs = filler_docs(3000, seed=3)
    data = b"".join(_line(d) + b"\n" for d in docs)
    packed = zstandard.ZstdCompressor().compress(data) if compression == "zst" else gzip.compress(data)
    truncated = tmp_path / f"a_truncated.jsonl.{compression}"
    truncated.write_bytes(packed[: len(packed) * 6 // 10])
    after = write_zst(tmp_path / "b_after.jsonl.zst", ["the next file is still read"])
    tok, manifest = _tokenize([truncated, after], tmp_path / "out", chunk_bytes=64 * 1024)

    texts = _texts(tmp_path / "out", tok)
    kept = texts[:-1]
    assert texts[-1] == "the next file is still read"
    assert 20 < len(kept) < len(docs) and kept == docs[: len(kept)], "a prefix of the file, in order"
    (damaged,) = manifest["damaged_inputs"]
    assert damaged["path"] == str(truncated) and ("truncated" in damaged["error"] or "EOFError" in damaged["error"])
    first = manifest["inputs"][0]
    assert first["documents"] == len(kept) and first["sha256"]
    # The cut-off last line, if any, is counted, never silently dropped.
    assert first["records"] - first["documents"] == manifest["skipped"]["by_reason"].get(SkipReason.TRUNCATED_RECORD, 0) <= 1


def test_corrupt_and_empty_files(tmp_path):
    corrupt = tmp_path / "a.jsonl.zst"
    corrupt.write_bytes(b"this is not zstd data at all" * 10)
    empty = tmp_path / "b.jsonl"
    empty.write_bytes(b"")
    good = write_zst(tmp_path / "c.jsonl.zst", ["kept"])
    tok, manifest = _tokenize([corrupt, empty, good], tmp_path / "out")
    assert _texts(tmp_path / "out", tok) == ["kept"]
    assert [d["path"] for d in manifest["damaged_inputs"]] == [str(corrupt)]
    assert [i["records"] for i in manifest["inputs"]] == [0, 0, 1]


def test_bad_parquet_rows_and_files(tmp_path):
    import pyarrow
    import pyarrow.parquet

    pyarrow.parquet.write_table(pyarrow.table({"text": ["ok", None, "", "fine"]}), tmp_path / "a.parquet")
    pyarrow.parquet.write_table(pyarrow.table({"body": ["no text column"] * 3}), tmp_path / "b.parquet")
    (tmp_path / "c.parquet").write_bytes(b"PAR1 not really")
    tok, manifest = _tokenize([tmp_path / "a.parquet", tmp_path / "b.parquet", tmp_path / "c.parquet"],
                              tmp_path / "out")
    assert _texts(tmp_path / "out", tok) == ["ok", "fine"]
    assert manifest["skipped"]["by_reason"] == {SkipReason.MISSING_TEXT: 4, SkipReason.EMPTY_TEXT: 1}
    assert manifest["skipped"]["examples"][SkipReason.MISSING_TEXT][0]["at"] == "row 1"
    assert [d["path"] for d in manifest["damaged_inputs"]] == [str(tmp_path / "c.parquet")]


def test_no_usable_document_is_an_error_and_leaves_nothing(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text("{oops\n\n" + json.dumps({"body": "x"}) + "\n")
    with pytest.raises(DataError, match="no usable documents.*malformed_json 1"):
        _tokenize([path], tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl"]
