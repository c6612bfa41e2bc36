"""One tokenizer interface for data preparation and training.

Data prep turns text into token ids; training needs the same ids back plus the
special-token bookkeeping megatron-core's ``GPTDataset`` reads from
``config.tokenizer``: ``eod``, ``pad``, ``vocab_size`` and
``unique_identifiers`` (which goes into the hash naming its cached sample
indices). Keeping both behind one class means a shard can never be read with a
tokenizer whose EOD id differs from the one used to write it: ``sha256`` of the
model file identifies the tokenizer, and the shard sidecar records it.

Two back ends:

* ``SentencePieceTokenizer`` for ``.model`` files (what ``train_tokenizer.py``
  produces); EOD is the model's ``eos_id``.
* ``HFTokenizer`` for Hugging Face ``tokenizer.json`` files; EOD is a named
  special token, ``<|endoftext|>`` by default (GPT-2 / GPT-NeoX / Pile style).

``load_tokenizer(path)`` picks the back end from the file name.

Tokenizers pickle as their file path plus sha256 (not the loaded model), so a
multiprocessing worker receives one cheaply and reloads it once; the reload
refuses a file whose bytes changed since the parent loaded it.

``encode_batch`` runs on one thread by default: data prep gets its
parallelism from worker processes, and a per-call thread pool inside each of N
workers would only oversubscribe the cores.
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from typing import Sequence

from data_prep.errors import DataError

DEFAULT_EOD_TOKEN = "<|endoftext|>"


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, read in blocks so large files are fine."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _require_file(path: str | os.PathLike, what: str) -> str:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataError(f"{what} {path!r} does not exist; check the path or train one first")
    return path


class Tokenizer:
    """The interface every back end implements.

    Attributes (all plain values, so the object pickles and hashes cleanly):

    * ``path``: the model file it was loaded from;
    * ``sha256``: hex digest of that file, the tokenizer's identity;
    * ``name``: a short human-readable identity, e.g. ``sentencepiece:ab12cd34ef56``;
    * ``vocab_size``: the true number of ids (no padding to a multiple of 128:
      that is the model's business);
    * ``eod``: id appended after every document;
    * ``pad``: id used for padding; equals ``eod`` only when the model has no
      pad token (megatron-core then warns and stops masking pad positions);
    * ``unique_identifiers``: OrderedDict that megatron-core JSON-dumps into
      its dataset cache key.
    """

    path: str
    sha256: str
    vocab_size: int
    eod: int
    pad: int

    def __init__(self, path: str, backend: str) -> None:
        self.path = path
        self.sha256 = file_sha256(path)
        self.name = f"{backend}:{self.sha256[:12]}"

    # Pickling: path + identity; the back end is reloaded by the receiver.
    def _init_args(self) -> dict:
        return {}

    def __getstate__(self) -> dict:
        return {"path": self.path, "sha256": self.sha256, "args": self._init_args()}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"], **state["args"])
        if self.sha256 != state["sha256"]:
            raise DataError(
                f"tokenizer file {self.path!r} changed while in use (sha256 {state['sha256'][:12]} -> "
                f"{self.sha256[:12]}); restore it or restart with the new file"
            )

    def _make_unique_identifiers(self) -> None:
        # The content hash, not the path: the file's bytes determine every id,
        # so retraining a tokenizer in place must change megatron-core's cache
        # key, which a path would not. (megatron adds the data path itself.)
        self.unique_identifiers = OrderedDict(
            [
                ("class", type(self).__name__),
                ("sha256", self.sha256),
                ("vocab_size", self.vocab_size),
                ("eod", self.eod),
                ("pad", self.pad),
            ]
        )

    # Text <-> ids --------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Token ids for ``text``, without BOS/EOD: callers add EOD themselves."""
        raise NotImplementedError

    def encode_batch(self, texts: Sequence[str], num_threads: int = 1) -> list[list[int]]:
        """``encode`` for many texts in one call (``num_threads`` > 1: the back end's threads)."""
        return [self.encode(t) for t in texts]

    def decode(self, ids: Sequence[int]) -> str:
        """Text for ``ids``; special tokens such as EOD are dropped."""
        raise NotImplementedError

    # Aliases for megatron-core's legacy tokenizer interface, so code written
    # against it (tokenize/detokenize, eos) works with ours unchanged.
    def tokenize(self, text: str) -> list[int]:
        return self.encode(text)

    def detokenize(self, ids: Sequence[int]) -> str:
        return self.decode(ids)

    @property
    def eos(self) -> int:
        return self.eod

    def describe(self) -> dict:
        """A JSON-serialisable summary, recorded in shard sidecars and logs."""
        return {
            "name": self.name,
            "class": type(self).__name__,
            "path": self.path,
            "sha256": self.sha256,
            "vocab_size": self.vocab_size,
            "eod": self.eod,
            "pad": self.pad,
            **self._init_args(),
        }

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.path!r}, vocab_size={self.vocab_size}, eod={self.eod})"


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece ``.model``. EOD is ``eos_id``; pad is ``pad_id`` if defined, else EOD.

    Control symbols such as ``</s>`` are never matched inside text, so a
    document that contains the string "</s>" does not grow a false EOD.
    """

    def __init__(self, model_path: str | os.PathLike) -> None:
        import sentencepiece

        path = _require_file(model_path, "tokenizer model")
        super().__init__(path, "sentencepiece")
        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_file=path)
        except (RuntimeError, OSError) as err:
            raise DataError(f"cannot load sentencepiece model {path!r} ({err}); is it a .model file?") from err
        self.vocab_size = self._sp.get_piece_size()
        eos = self._sp.eos_id()
        if eos < 0:
            raise DataError(
                f"sentencepiece model {path!r} has no eos token, needed as end-of-document; "
                "retrain it with eos_id set (mesh data train-tokenizer does this)"
            )
        self.eod = eos
        pad = self._sp.pad_id()
        self.pad = pad if pad >= 0 else eos
        self._make_unique_identifiers()

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def encode_batch(self, texts: Sequence[str], num_threads: int = 1) -> list[list[int]]:
        return self._sp.encode(list(texts), num_threads=num_threads)

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode([int(i) for i in ids])


class HFTokenizer(Tokenizer):
    """A Hugging Face ``tokenizer.json`` loaded with the ``tokenizers`` library.

    ``eod_token`` must be in the vocabulary (it usually is a special token);
    ``pad_token`` is optional and defaults to EOD when not given.
    No special tokens are added on encode: the post-processor of some
    tokenizers (e.g. BERT-style) would otherwise insert [CLS]/[SEP]. Special
    tokens *inside the text* are encoded as plain text
    (``encode_special_tokens``): a document quoting "<|endoftext|>" (the Pile
    has some) must not be cut in two by a false EOD.
    """

    def __init__(
        self,
        tokenizer_json_path: str | os.PathLike,
        eod_token: str = DEFAULT_EOD_TOKEN,
        pad_token: str | None = None,
    ) -> None:
        from tokenizers import Tokenizer as _HFTokenizer

        path = _require_file(tokenizer_json_path, "tokenizer file")
        super().__init__(path, "hf")
        try:
            self._tok = _HFTokenizer.from_file(path)
        except Exception as err:  # tokenizers raises a bare Exception on bad JSON
            model = _sentencepiece_sidecar_model(path)
            if model is not None:
                # "<prefix>.meta.json" of a sentencepiece model ends in .json like an
                # HF tokenizer.json: an easy mix-up to make.
                raise DataError(
                    f"{path!r} is the metadata sidecar of sentencepiece model {model!r}, "
                    "not a Hugging Face tokenizer; pass the .model file instead"
                ) from err
            raise DataError(f"cannot load Hugging Face tokenizer {path!r} ({err}); is it a tokenizer.json?") from err
        self._tok.encode_special_tokens = True
        # encode_batch_fast (tokenizers >= 0.20) skips the character offsets
        # we never use; it is markedly faster.
        self._batch = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.eod_token = eod_token
        self.eod = self._token_id(eod_token, "end-of-document")
        self.pad_token = pad_token
        self.pad = self._token_id(pad_token, "pad") if pad_token is not None else self.eod
        self._make_unique_identifiers()
        self.unique_identifiers["eod_token"] = eod_token

    def _token_id(self, token: str, role: str) -> int:
        token_id = self._tok.token_to_id(token)
        if token_id is None:
            raise DataError(
                f"{role} token {token!r} is not in the vocabulary of {self.path!r}; "
                f"pass the tokenizer's own {role} token (e.g. --eod-token)"
            )
        return token_id

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def _init_args(self) -> dict:
        return {"eod_token": self.eod_token, "pad_token": self.pad_token}

    def encode_batch(self, texts: Sequence[str], num_threads: int = 1) -> list[list[int]]:
        # The tokenizers library sizes its thread pool from the environment,
        # read when the batch call runs.
        previous = os.environ.get("TOKENIZERS_PARALLELISM")
        os.environ["TOKENIZERS_PARALLELISM"] = "true" if num_threads > 1 else "false"
        try:
            return [e.ids for e in self._batch(list(texts), add_special_tokens=False)]
        finally:
            if previous is None:
                del os.environ["TOKENIZERS_PARALLELISM"]
            else:
                os.environ["TOKENIZERS_PARALLELISM"] = previous

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)


def _sentencepiece_sidecar_model(json_path: str) -> str | None:
    """If ``json_path`` is the sidecar written by ``train_sentencepiece``, its model's path."""
    import json

    try:
        with open(json_path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    if isinstance(data, dict) and "sha256" in data and str(data.get("model", "")).endswith(".model"):
        return os.path.join(os.path.dirname(json_path), data["model"])
    return None


def load_tokenizer(path: str | os.PathLike, eod_token: str = DEFAULT_EOD_TOKEN) -> Tokenizer:
    """Load a tokenizer, choosing the back end by file type.

    ``.model`` -> SentencePieceTokenizer, ``.json`` -> HFTokenizer (with
    ``eod_token``). Raises DataError for a missing file or another extension.
    """
    path = os.fspath(path)
    if path.endswith(".model"):
        return SentencePieceTokenizer(path)
    if path.endswith(".json"):
        return HFTokenizer(path, eod_token=eod_token)
    _require_file(path, "tokenizer file")  # a missing file is the likelier mistake
    raise DataError(
        f"unknown tokenizer file type {path!r}: expected a sentencepiece .model or a Hugging Face tokenizer.json"
    )
