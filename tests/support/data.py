"""Shared builders for the data_prep tests (this module holds no tests).

Tokenizers are trained once per test session (``functools.cache``) into a
temporary folder: a 400-piece sentencepiece BPE and a byte-level BPE
tokenizer.json trained with the ``tokenizers`` library (the GPT-NeoX-20B
tokenizer is that kind of file).
"""

from __future__ import annotations

import atexit
import functools
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy

from data_prep.outputs.jsonl_zst import JsonlZstWriter, pile_record

REPO = Path(__file__).resolve().parents[2]

# Documents with the things a lossy tokenizer would break: indentation, tabs,
# trailing spaces, blank lines, non-ASCII, an emoji (byte fallback), digits,
# and the literal text of special tokens (which must stay plain text).
TRICKY_DOCS = [
    "def add(a, b):\n    return a + b\n",
    "Héllo wörld!  Two  spaces,\ttab, trailing space \n\n\nblank lines above.",
    "Emoji outside the vocabulary: 🦜 and CJK 漢字 go through byte fallback.",
    "Numbers 1234567890 and 3.14159 are split into digits.",
    "class Point:\n    \"\"\"A point.\"\"\"\n\n    def __init__(self, x, y):\n        self.x = x\n",
    "A document quoting the markers <|endoftext|> and </s> keeps them as text.",
]

WORDS = ("the data model reads tokens from shards and writes the index for training while every "
         "document ends with a special token so the loader knows where one stops").split()


def filler_docs(n: int = 120, seed: int = 0) -> list[str]:
    """Varied English-and-code text, documents of very different sizes."""
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        sentences = rng.randint(1, 12) if i % 17 else rng.randint(40, 80)
        words = " ".join(rng.choice(WORDS) for _ in range(sentences * 9))
        docs.append(f"{words.capitalize()}.\n\ndef f_{i}(x):\n    return x * {i} + {i % 10}\n")
    return docs


def pile_docs(n: int = 200, seed: int = 0) -> list[tuple[str, str]]:
    """(text, pile_set_name) pairs over three subsets, interleaved like the Pile."""
    sets = ["Pile-CC", "Github", "Wikipedia (en)"]
    rng = random.Random(seed)
    texts = TRICKY_DOCS + filler_docs(n - len(TRICKY_DOCS), seed)
    return [(text, sets[rng.randrange(3)]) for text in texts]


def write_zst(path, docs) -> str:
    """docs: texts, or (text, set name) pairs."""
    with JsonlZstWriter(path) as out:
        for doc in docs:
            text, set_name = doc if isinstance(doc, tuple) else (doc, "Test")
            out.write(pile_record(text, set_name))
    return str(path)


def write_jsonl(path, docs) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for doc in docs:
            text, set_name = doc if isinstance(doc, tuple) else (doc, "Test")
            f.write(json.dumps(pile_record(text, set_name), ensure_ascii=False) + "\n")
    return str(path)


@functools.cache
def _workdir() -> Path:
    path = Path(tempfile.mkdtemp(prefix="data_prep_tests_"))
    atexit.register(shutil.rmtree, path, True)
    return path


@functools.cache
def sentencepiece_model() -> str:
    """Path of a 400-piece sentencepiece BPE model trained on TRICKY_DOCS + filler."""
    from data_prep.train_tokenizer import train_sentencepiece

    root = _workdir() / "sp"
    root.mkdir()
    corpus = write_zst(root / "docs.jsonl.zst", TRICKY_DOCS + filler_docs())
    train_sentencepiece([corpus], root / "tok", vocab_size=400)
    return str(root / "tok.model")


@functools.cache
def hf_tokenizer_json() -> str:
    """A byte-level BPE tokenizer.json (GPT-NeoX style), trained here with `tokenizers`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|pad|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(TRICKY_DOCS + filler_docs(), trainer=trainer)
    path = _workdir() / "hf" / "tokenizer.json"
    path.parent.mkdir()
    tok.save(str(path))
    return str(path)


def read_documents(prefix) -> list[numpy.ndarray]:
    """Every document of a shard, read back with megatron-core's IndexedDataset."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(str(prefix))
    assert list(dataset.document_indices) == list(range(len(dataset) + 1)), "one sequence per document"
    # Copies: the arrays are views into a memory map that closes with the dataset.
    return [numpy.array(dataset[i]) for i in range(len(dataset))]


def shard_files(folder) -> dict[str, str]:
    """sha256 of every .bin and .idx in a folder, by name."""
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(Path(folder).iterdir())
        if p.suffix in (".bin", ".idx")
    }


def stable_manifest(manifest: dict) -> dict:
    """A manifest without what legitimately differs between runs (times, sessions, workers, fsync)."""
    manifest = json.loads(json.dumps(manifest))
    for key in ("created", "wall_seconds", "sessions", "command"):
        manifest.pop(key, None)
    manifest["options"].pop("workers", None)
    manifest["options"].pop("checkpoint_seconds", None)
    manifest["options"].pop("durable", None)
    return manifest


def run_cli(*args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """``mesh data ...`` in a fresh process (the data commands alone, no torch import)."""
    full_env = dict(os.environ, PYTHONPATH=str(REPO), **(env or {}))
    return subprocess.run([sys.executable, "-m", "data_prep.cli", "data", *args], capture_output=True,
                          text=True, timeout=timeout, env=full_env, cwd=str(REPO))
