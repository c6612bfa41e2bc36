"""The pieces of the Hugging Face conversion on their own: parameter names both ways, the TP split
rule and the parameter list the importer expects (checked against the built model), the tokenizer
conversion (against sentencepiece), the streaming safetensors writer (against the safetensors
library) and the layer map."""

from __future__ import annotations

import json

import pytest
import torch

from mesh_model.config import ConfigError
from tests.support.hf import VARIANTS, tiny_config


@pytest.mark.parametrize("variant, split", VARIANTS, ids=[f"{v}-{s}" for v, s in VARIANTS])
def test_names_split_rule_and_expected_shapes_match_the_built_model(variant, split, model_parallel):
    from mesh_hf import names
    from mesh_hf.export import is_native
    from mesh_hf.import_hf import expected_names, fresh_recurrence_tensors, tp_partition_dim
    from mesh_model.model import build_model

    config = tiny_config(variant, split)
    model = build_model(config)
    params = dict(model.named_parameters())
    recurrence = {k for k in params if k.startswith("recurrence.")}
    assert {k: tuple(p.shape) for k, p in params.items() if k not in recurrence} == expected_names(config)
    assert recurrence == set(fresh_recurrence_tensors(config))
    for name, param in params.items():
        sharded = getattr(param, "tensor_model_parallel", False)
        assert tp_partition_dim(name) == (param.partition_dim if sharded else None), name
        hf_name = names.to_hf(name, is_native(config))
        assert names.from_hf(hf_name) == name


def test_fresh_recurrence_init_is_the_models_own(model_parallel):
    from mesh_hf.import_hf import fresh_recurrence_tensors
    from mesh_model.model import build_model

    config = tiny_config("mesh", "1+2R2+1")
    built = dict(build_model(config).named_parameters())
    for name, value in fresh_recurrence_tensors(config).items():
        assert torch.equal(value, built[name].detach()), name


def test_the_converted_tokenizer_encodes_like_sentencepiece(demo_data, tmp_path):
    import zstandard

    from data_prep.tokenizer import load_tokenizer
    from mesh_hf.tokenizer_files import write_tokenizer
    from transformers import AutoTokenizer

    path = str(demo_data / "tokenizer.model")
    special = write_tokenizer(path, tmp_path, model_max_length=128)
    fast = AutoTokenizer.from_pretrained(str(tmp_path))
    sp = load_tokenizer(path)
    assert special["eos_token_id"] == sp.eod == fast.eos_token_id
    raw = zstandard.ZstdDecompressor().stream_reader(open(demo_data / "corpus" / "val.jsonl.zst", "rb")).read()
    texts = [json.loads(line)["text"] for line in raw.decode().splitlines()[:60]]
    texts += ["  two  spaces\tand a tab\n\nnew lines", "digits 1234567890 and 3.14159", "émigré naïve café",
              "日本語のテキスト 🙂 emoji", "", " ", "trailing space "]
    for text in texts:
        ids = sp.encode(text)
        assert fast(text, add_special_tokens=False).input_ids == ids, text[:80]
        assert fast.decode(ids, skip_special_tokens=True) == sp.decode(ids)
    # The one documented difference: transformers matches a special token written in the text
    # (training's tokenizer treats it as plain characters; tokenizer.json cannot record that choice).
    assert sp.eod not in sp.encode("x </s> y") and sp.eod in fast("x </s> y", add_special_tokens=False).input_ids


def test_a_tokenizer_json_is_written_with_its_end_of_text_token(tmp_path):
    from data_prep.tokenizer import load_tokenizer
    from mesh_hf.tokenizer_files import write_tokenizer
    from tests.support.data import hf_tokenizer_json
    from transformers import AutoTokenizer

    path = hf_tokenizer_json()
    special = write_tokenizer(path, tmp_path, model_max_length=64)
    fast, ours = AutoTokenizer.from_pretrained(str(tmp_path)), load_tokenizer(path)
    assert fast.eos_token == "<|endoftext|>" and special["eos_token_id"] == ours.eod == fast.eos_token_id
    for text in ("def add(a, b):\n    return a + b\n", "plain words, and 12345"):
        assert fast(text, add_special_tokens=False).input_ids == ours.encode(text)


def test_streaming_safetensors_files_read_back_with_the_library(tmp_path):
    from safetensors import safe_open

    from mesh_hf.weights_file import INDEX_FILE, TensorPlan, write_weights

    generator = torch.Generator().manual_seed(0)
    tensors = {"a.weight": torch.randn(7, 5, generator=generator), "b": torch.randn(3, generator=generator),
               "c.bias": torch.randn(11, 2, generator=generator).to(torch.bfloat16), "d": torch.randn(40, generator=generator)}
    plans = [TensorPlan(k, tuple(v.shape), v.dtype) for k, v in tensors.items()]
    files = write_weights(tmp_path, plans, lambda p: tensors[p.name], max_shard_bytes=150, metadata={"format": "pt"})
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    assert len(files) == 3 and index["metadata"]["total_size"] == sum(p.nbytes for p in plans)
    for name, file in index["weight_map"].items():
        with safe_open(str(tmp_path / file), framework="pt") as f:
            assert f.metadata() == {"format": "pt"} and torch.equal(f.get_tensor(name), tensors[name])
    one = tmp_path / "one"
    one.mkdir()
    assert write_weights(one, plans, lambda p: tensors[p.name], 10**9, {"format": "pt"}) == ["model.safetensors"]
    assert not (one / INDEX_FILE).exists()


def test_layer_map_parsing():
    from mesh_hf.import_hf import parse_layer_map

    config = tiny_config("mesh", "2+2R2+1")
    assert parse_layer_map("prelude=0-1,core=3+5,coda=7", config, 8) == {"prelude": [0, 1], "core": [3, 5], "coda": [7]}
    unshared = tiny_config("mesh", "1+1x3+1")
    assert parse_layer_map("prelude=0,core=1-3,coda=4", unshared, 5)["core"] == [1, 2, 3]
    for text, says in [("prelude=0-1,core=3-4,coda=9", "source layer 9"), ("prelude=0,core=3-4,coda=7", "needs 2"),
                       ("middle=0", "prelude, core and coda"), ("prelude=1-0,core=3-4,coda=5", "empty"),
                       ("prelude=a,core=3-4,coda=5", "A-B")]:
        with pytest.raises(ConfigError, match=says):
            parse_layer_map(text, config, 8)


def test_the_model_card_takes_the_last_validation_loss_at_or_before_the_checkpoint(tmp_path):
    from mesh_hf.export import final_validation

    run = tmp_path / "run"
    (run / "checkpoints" / "step0000020").mkdir(parents=True)
    rows = [{"step": 10, "valid/loss": 3.0, "valid/ppl": 20.1}, {"step": 15, "train/loss": 2.9},
            {"step": 20, "valid/loss": 2.5, "valid/ppl": 12.2}, {"step": 30, "valid/loss": 2.0, "valid/ppl": 7.4}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 31, "va')
    assert final_validation(run / "checkpoints" / "step0000020", 20) == {"step": 20, "loss": 2.5, "ppl": 12.2}
    assert final_validation(tmp_path / "elsewhere" / "step0000020", 20) is None  # not inside a run folder
