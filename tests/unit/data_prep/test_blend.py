"""Training-side use of tokenized output: manifest prefixes, weighted blends through megatron-core.

Two subsets with disjoint token sets (words vs runs of digits, one token each) are tokenized with
--split-by-set into several shards each; sampled training sequences must
follow the configured weights.
"""

from __future__ import annotations

import random

import pytest

from data_prep.errors import DataError
from data_prep.tokenization.run import TokenizeOptions, tokenize_corpus
from data_prep.tokenizer import load_tokenizer
from tests.support.data import sentencepiece_model, write_zst, write_jsonl

WORDS = ["apple", "banana", "cherry", "model", "data"]
DIGITS = ["0", "1", "2", "3", "4"]


@pytest.fixture(scope="module")
def two_subsets(tmp_path_factory):
    root = tmp_path_factory.mktemp("blend")
    rng = random.Random(0)
    docs = []
    for i in range(300):
        if i % 3:
            docs.append((" ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 60))), "Words"))
        else:
            docs.append(("".join(rng.choice(DIGITS) for _ in range(rng.randint(40, 120))), "Digits"))
    corpus = write_zst(root / "in.jsonl.zst", docs)
    tok = load_tokenizer(sentencepiece_model())
    manifest = tokenize_corpus([corpus], tok, root / "mix",
                               TokenizeOptions(split_by_set=True, shard_bytes=6000, chunk_bytes=1024), progress=False)
    shards = {g["set"]: len(g["shards"]) for g in manifest["groups"]}
    assert shards["Words"] > 2 and shards["Digits"] > 2
    digit_ids = set(tok.encode("".join(DIGITS * 3))) - {tok.eod}
    word_ids = set(tok.encode(" ".join(WORDS * 3))) - {tok.eod}
    assert not digit_ids & word_ids
    return root, tok, manifest, digit_ids


def test_parse_blend_expands_manifests_and_splits_weights_by_tokens(two_subsets):
    from pretrain.data import check_prefixes, parse_blend

    root, _, manifest, _ = two_subsets
    groups = {g["set"]: g for g in manifest["groups"]}
    words, digits = str(root / "mix_Words"), str(root / "mix_Digits")
    prefixes, weights = parse_blend(["0.8", words, "0.2", digits])
    assert prefixes == [str(root / s["prefix"]) for s in groups["Words"]["shards"] + groups["Digits"]["shards"]]
    check_prefixes(prefixes, "data.train")
    n_words = len(groups["Words"]["shards"])
    assert sum(weights[:n_words]) == pytest.approx(0.8) and sum(weights[n_words:]) == pytest.approx(0.2)
    for shard, weight in zip(groups["Words"]["shards"], weights):
        assert weight == pytest.approx(0.8 * shard["tokens"] / groups["Words"]["tokens"])
    # Without weights: every shard by its size; the run manifest (one split) is all shards.
    prefixes, weights = parse_blend([str(root / "mix")])
    assert len(prefixes) == manifest["totals"]["shards"]
    assert weights == [s["tokens"] for g in manifest["groups"] for s in g["shards"]]
    # A plain single prefix stays as it was: no weights, so no BlendedDataset.
    assert parse_blend([prefixes[0]]) == ([prefixes[0]], None)
    # The .manifest.json path works as well as the prefix; a zero weight drops an entry.
    words_shards = [str(root / s["prefix"]) for s in groups["Words"]["shards"]]
    assert parse_blend(["1", words + ".manifest.json", "0", digits])[0] == words_shards
    with pytest.raises(DataError, match="alternate weight and prefix"):
        parse_blend(["0.5", words, digits])


def test_a_manifest_with_several_splits_is_refused_as_one_prefix(tmp_path):
    from pretrain.data import parse_blend

    corpus = write_jsonl(tmp_path / "in.jsonl", [f"document {i} text" for i in range(60)])
    tokenize_corpus([corpus], load_tokenizer(sentencepiece_model()), tmp_path / "p",
                    TokenizeOptions(val_fraction=0.3, shard_bytes=None), progress=False)
    with pytest.raises(DataError, match="name one split's prefix instead"):
        parse_blend([str(tmp_path / "p")])
    assert parse_blend([str(tmp_path / "p_val")]) == ([str(tmp_path / "p_val")], None)


def test_sampled_batches_follow_blend_weights(two_subsets, tmp_path):
    from mesh_model.params import single_process_model_parallel
    from pretrain.config import DataConfig
    from pretrain.data import build_datasets, micro_batches

    root, tok, _, digit_ids = two_subsets
    seq_length, samples = 32, 1000
    data = DataConfig(tokenizer=sentencepiece_model(),
                      train=["0.8", str(root / "mix_Words"), "0.2", str(root / "mix_Digits")],
                      valid=[str(root / "mix_Digits")])
    with single_process_model_parallel():  # megatron's BlendedDataset synchronises through torch.distributed
        datasets = build_datasets(data, tok, seq_length=seq_length, seed=1, train_samples=samples,
                                  valid_samples=16, cache_dir=str(tmp_path / "cache"))
        assert type(datasets.train).__name__ == "BlendedDataset" and len(datasets.train) >= samples
        digit_samples = 0
        seen = 0
        for batch in micro_batches(datasets.train, micro_batch_size=8, dp_rank=0, dp_size=1):
            for tokens in batch["tokens"]:
                ids = set(tokens.tolist()) - {tok.eod}
                digit_samples += bool(ids & digit_ids)
                assert not (ids & digit_ids and ids - digit_ids), "a sample comes from one subset"
                seen += 1
            if seen >= samples:
                break
    assert seen == samples
    assert digit_samples / samples == pytest.approx(0.2, abs=0.03)
    # The valid split (one manifest prefix, several shards) is blended by size.
    valid_ids = set(datasets.valid[0]["tokens"].tolist()) - {tok.eod}
    assert valid_ids <= digit_ids


def test_unweighted_multi_shard_prefix_gives_enough_samples(two_subsets, tmp_path):
    """Several shards without weights must not cap training at one epoch."""
    from mesh_model.params import single_process_model_parallel
    from pretrain.config import DataConfig
    from pretrain.data import build_datasets

    root, tok, manifest, _ = two_subsets
    epoch = manifest["totals"]["tokens"] // 32
    data = DataConfig(tokenizer=sentencepiece_model(), train=[str(root / "mix")])
    with single_process_model_parallel():
        datasets = build_datasets(data, tok, seq_length=32, seed=1, train_samples=3 * epoch, valid_samples=0,
                                  cache_dir=str(tmp_path / "cache"))
    assert len(datasets.train) >= 3 * epoch
