"""The tokenizer files of a Hugging Face model folder, from the tokenizer the run trained with.

A Hugging Face `tokenizer.json` is written as it is. A sentencepiece BPE model (what
`mesh data train-tokenizer` makes) becomes a `tokenizers` BPE with the same pieces and merges:
spaces become U+2581 as sentencepiece does, words and single digits are split the way its
`split_by_whitespace` / `split_digits` options split them, unknown characters fall back to
UTF-8 bytes. tests/unit/mesh_hf/test_formats.py checks that both encode the demo corpus (and
whitespace, digits, accents, CJK, emoji) to the same ids. One difference is transformers' own
convention and cannot be recorded in tokenizer.json: a special token written literally in the text
("</s>") becomes that token, where training's tokenizer reads it as plain characters.
"""

from __future__ import annotations

from pathlib import Path

from data_prep.errors import DataError
from data_prep.tokenizer import HFTokenizer, SentencePieceTokenizer, Tokenizer, load_tokenizer

SPACE = "\u2581"


def sentencepiece_to_tokenizers(model_path: str):
    """A `tokenizers.Tokenizer` that encodes like the sentencepiece BPE model at `model_path`."""
    import sentencepiece
    from tokenizers import Regex, Tokenizer as FastTokenizer, decoders, models, normalizers, pre_tokenizers

    if _model_type(model_path) != "bpe":
        raise DataError(f"{model_path}: only sentencepiece BPE models convert to a Hugging Face tokenizer; "
                        f"this one is a {_model_type(model_path)} model")
    sp = sentencepiece.SentencePieceProcessor(model_file=model_path)
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    # BPE merges in sentencepiece's order: a merged piece's id is its rank.
    merges = []
    for piece, piece_id in vocab.items():
        if sp.is_control(piece_id) or sp.is_unknown(piece_id) or sp.is_byte(piece_id):
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                merges.append((piece_id, vocab[left], vocab[right], left, right))
    merges.sort()
    tokenizer = FastTokenizer(models.BPE(vocab=vocab, merges=[(a, b) for *_, a, b in merges],
                                         unk_token=sp.id_to_piece(sp.unk_id()), byte_fallback=True, fuse_unk=True))
    tokenizer.normalizer = normalizers.Replace(" ", SPACE)
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(f"{SPACE}*[^{SPACE}]+|{SPACE}+"), "isolated"),
        pre_tokenizers.Digits(individual_digits=True),
    ])
    tokenizer.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()])
    return tokenizer, sp


def _model_type(model_path: str) -> str:
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(Path(model_path).read_bytes())
    return {1: "unigram", 2: "bpe", 3: "word", 4: "char"}.get(proto.trainer_spec.model_type, "unknown")


def hf_tokenizer(tokenizer: Tokenizer, model_max_length: int):
    """A transformers `PreTrainedTokenizerFast` equivalent to the training tokenizer."""
    from transformers import PreTrainedTokenizerFast

    if isinstance(tokenizer, SentencePieceTokenizer):
        fast, sp = sentencepiece_to_tokenizers(tokenizer.path)
        special = {"eos_token": sp.id_to_piece(tokenizer.eod), "unk_token": sp.id_to_piece(sp.unk_id())}
        if sp.bos_id() >= 0:
            special["bos_token"] = sp.id_to_piece(sp.bos_id())
        if sp.pad_id() >= 0:
            special["pad_token"] = sp.id_to_piece(sp.pad_id())
        return PreTrainedTokenizerFast(tokenizer_object=fast, model_max_length=model_max_length, **special)
    assert isinstance(tokenizer, HFTokenizer)
    eos = tokenizer.eod_token
    return PreTrainedTokenizerFast(tokenizer_file=tokenizer.path, model_max_length=model_max_length,
                                   eos_token=eos, bos_token=eos, unk_token=eos,
                                   pad_token=tokenizer.pad_token or None)


def write_tokenizer(path: str, out_dir: Path, model_max_length: int, eod_token: str | None = None) -> dict:
    """Writes tokenizer.json + tokenizer_config.json into `out_dir`; returns the special-token ids
    for generation_config.json."""
    tokenizer = load_tokenizer(path, **({"eod_token": eod_token} if eod_token else {}))
    fast = hf_tokenizer(tokenizer, model_max_length)
    fast.save_pretrained(str(out_dir))
    return {"eos_token_id": tokenizer.eod, "bos_token_id": fast.bos_token_id,
            "pad_token_id": tokenizer.pad if tokenizer.pad != tokenizer.eod else None}
