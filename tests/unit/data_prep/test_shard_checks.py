"""Damaged shards are found at start-up, with one line naming the file, what is wrong and the fix.

``megatron_shards.check_shard`` on its own, through training's ``check_data_prefixes`` (with and
without ``data.verify_checksums``), and through ``preflight`` before any process group exists.
"""

from __future__ import annotations

import os
import random
import shutil
import struct

import pytest
import torch

from data_prep.errors import DataError
from data_prep.outputs.data_prefixes import resolve_data_prefix
from data_prep.outputs.megatron_shards import INDEX_HEADER_BYTES, check_shard
from data_prep.tokenization.run import TokenizeOptions, tokenize_corpus
from data_prep.tokenizer import load_tokenizer
from pretrain.config import DataConfig
from pretrain.data import check_data_prefixes
from tests.support.data import filler_docs, sentencepiece_model, write_zst

FIX = "re-copy it or rerun `mesh data tokenize`"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    corpus = write_zst(root / "in.jsonl.zst", filler_docs(80))
    tokenize_corpus([corpus], load_tokenizer(sentencepiece_model()), root / "out" / "corpus",
                    TokenizeOptions(shard_bytes=8000, chunk_bytes=1024), progress=False)
    return root / "out"


@pytest.fixture
def out(built, tmp_path):
    """A fresh copy of the tokenized output (prefix OUT/corpus, several shards) to damage."""
    folder = tmp_path / "out"
    shutil.copytree(built, folder)
    shards = resolve_data_prefix(str(folder / "corpus"))
    assert len(shards) >= 3 and all(s.record is not None for s in shards)
    return shards


def message(prefix: str, record=None, manifest=None, verify_checksums=False) -> str:
    with pytest.raises(DataError) as err:
        check_shard(prefix, record, manifest, verify_checksums=verify_checksums)
    text = str(err.value)
    assert "\n" not in text, text
    return text


def startup_message(prefix: str, verify_checksums: bool = False) -> str:
    with pytest.raises(DataError) as err:
        check_data_prefixes(DataConfig(tokenizer="t", train=[prefix], verify_checksums=verify_checksums))
    text = str(err.value)
    assert "\n" not in text, text
    return text


def test_a_good_prefix_passes(out):
    for shard in out:
        check_shard(shard.prefix)
        check_shard(shard.prefix, shard.record, shard.manifest, verify_checksums=True)
    corpus = os.path.join(os.path.dirname(out[0].prefix), "corpus")
    check_data_prefixes(DataConfig(tokenizer="t", train=[corpus], valid=[out[0].prefix], verify_checksums=True))
    check_data_prefixes(DataConfig(tokenizer="t", train=["0.5", corpus, "0.5", out[1].prefix]))


def test_a_bin_cut_short(out):
    shard = out[1]
    bin_ = shard.prefix + ".bin"
    size = os.path.getsize(bin_)
    os.truncate(bin_, size - 2)
    expected = (f"{bin_} is damaged: it has {size - 2} bytes, but {os.path.basename(shard.prefix)}.idx says "
                f"{shard.tokens} tokens of 2 bytes = {size} bytes (cut short); {FIX}")
    assert message(shard.prefix) == expected
    assert message(shard.prefix, shard.record, shard.manifest) == expected
    corpus = os.path.join(os.path.dirname(shard.prefix), "corpus")
    assert startup_message(corpus) == f"data.train: {expected}"


def test_a_bin_with_extra_bytes(out):
    bin_ = out[0].prefix + ".bin"
    with open(bin_, "ab") as f:
        f.write(b"\x00\x00")
    assert message(out[0].prefix).endswith(f"bytes (longer than its index); {FIX}")


def test_an_idx_of_random_bytes(out):
    idx = out[0].prefix + ".idx"
    with open(idx, "r+b") as f:
        f.write(random.Random(0).randbytes(os.path.getsize(idx)))
    assert message(out[0].prefix) == f"{idx} is damaged: it does not start with megatron's index magic " \
                                      f"b'MMIDIDX\\x00\\x00'; {FIX}"
    os.truncate(idx, 10)
    assert message(out[0].prefix) == f"{idx} is damaged: it has 10 bytes, fewer than a megatron index header " \
                                      f"({INDEX_HEADER_BYTES}); {FIX}"


def test_an_idx_whose_header_has_a_wrong_count(out):
    shard = out[0]
    idx = shard.prefix + ".idx"
    size = os.path.getsize(idx)
    count = shard.documents
    with open(idx, "r+b") as f:
        f.seek(INDEX_HEADER_BYTES - 16)  # the sequence count, then the document-index count
        f.write(struct.pack("<Q", count + 1))
    need = INDEX_HEADER_BYTES + 12 * (count + 1) + 8 * (count + 1)
    assert message(shard.prefix) == (f"{idx} is damaged: it has {size} bytes, but its header's {count + 1} "
                                     f"sequences and {count + 1} document indices need {need}; {FIX}")


def test_an_idx_whose_pointers_disagree_with_its_lengths(out):
    shard = out[0]
    idx = shard.prefix + ".idx"
    with open(idx, "r+b") as f:  # make sequence 0 one token longer: sequence 1 now starts too early
        f.seek(INDEX_HEADER_BYTES)
        (first,) = struct.unpack("<i", f.read(4))
        f.seek(INDEX_HEADER_BYTES)
        f.write(struct.pack("<i", first + 1))
    assert message(shard.prefix) == (f"{idx} is damaged: sequence 1 starts at byte {2 * first}, but the lengths "
                                     f"before it end at byte {2 * (first + 1)}; {FIX}")
    with open(idx, "r+b") as f:
        f.seek(INDEX_HEADER_BYTES)
        f.write(struct.pack("<i", -1))
    assert message(shard.prefix) == f"{idx} is damaged: sequence 0 has a negative length; {FIX}"


def test_a_bin_whose_size_differs_from_its_manifest_record(out):
    # Shard 1's files copied over shard 0's: a consistent shard, but not the one the manifest lists.
    first, second = out[0], out[1]
    for ext in (".bin", ".idx"):
        shutil.copyfile(second.prefix + ext, first.prefix + ext)
    check_shard(first.prefix)
    bin_ = first.prefix + ".bin"
    expected = (f"{bin_} is damaged: it holds {second.record.bin_bytes} bytes but manifest {first.manifest} "
                f"records {first.record.bin_bytes} (another shard's file?); {FIX}")
    assert first.record.bin_bytes != second.record.bin_bytes
    assert message(first.prefix, first.record, first.manifest) == expected
    assert startup_message(first.manifest) == f"data.train: {expected}"


def test_a_flipped_byte_is_found_only_with_verify_checksums(out):
    shard = out[2]
    bin_ = shard.prefix + ".bin"
    with open(bin_, "r+b") as f:
        f.seek(os.path.getsize(bin_) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x01]))
    check_shard(shard.prefix, shard.record, shard.manifest)  # sizes and index are intact
    check_data_prefixes(DataConfig(tokenizer="t", train=[shard.manifest]))
    expected = f"{bin_} is damaged: its sha256 has changed since manifest {shard.manifest} was written; {FIX}"
    assert message(shard.prefix, shard.record, shard.manifest, verify_checksums=True) == expected
    assert startup_message(shard.manifest, verify_checksums=True) == f"data.train: {expected}"


def test_preflight_refuses_a_truncated_bin_before_any_process_group(demo_data, tmp_path):
    from tests.support.harness import tiny_config
    from pretrain.preflight import preflight

    prefix = tmp_path / "train_text_document"
    for ext in (".bin", ".idx"):
        shutil.copyfile(demo_data / f"train_text_document{ext}", f"{prefix}{ext}")
    size = os.path.getsize(f"{prefix}.bin")
    os.truncate(f"{prefix}.bin", size // 2)
    config = tiny_config(demo_data, f"data.train=[{prefix}]", f"logging.run_dir={tmp_path / 'run'}")
    assert not torch.distributed.is_initialized()
    with pytest.raises(DataError) as err:
        preflight(config, 1)
    text = str(err.value)
    assert text.startswith(f"data.train: {prefix}.bin is damaged: it has {size // 2} bytes, but ") and "\n" not in text
    assert text.endswith(f"(cut short); {FIX}")
    assert not torch.distributed.is_initialized()
    assert not (tmp_path / "run").exists()
