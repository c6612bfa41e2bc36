"""Models leaving the stack: training checkpoints -> Hugging Face folders and back, generation
with the KV cache, perplexity, and bad input. Numbers are compared with the training model
(megatron-core layers at world size 1, or at TP=2 in real processes) and with transformers' own
GPTNeoXForCausalLM."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from tests.support.harness import REPO, launch_env, tail
from tests.support.hf import VARIANTS, load_hf, perturbed_model, tiny_config, training_logits, write_model_checkpoint

ATOL = 1e-5


@pytest.fixture
def tokenizer(demo_data):
    return str(demo_data / "tokenizer.model")


def _ids(vocab: int, batch: int = 2, seq: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _export(checkpoint, out, tokenizer, **kwargs):
    from mesh_hf.export import export

    return export(checkpoint, out, tokenizer=tokenizer, progress=False, **kwargs)


@pytest.mark.parametrize("variant, split", VARIANTS, ids=[f"{v}-{s}" for v, s in VARIANTS])
def test_every_variant_converts_with_the_training_models_logits(variant, split, model_parallel, tokenizer, tmp_path):
    config = tiny_config(variant, split)
    model = perturbed_model(config)
    checkpoint = write_model_checkpoint(model, config, tmp_path / "ckpt")
    report = _export(checkpoint, tmp_path / "hf", tokenizer)
    hf, _ = load_hf(tmp_path / "hf")
    ids = _ids(config.padded_vocab_size)
    with torch.no_grad():
        out = hf(ids, output_hidden_states=True, use_cache=False)
    assert (out.logits - training_logits(model, ids)).abs().max().item() < ATOL
    if variant == "vanilla":
        # transformers' own implementation, no custom code shipped
        import transformers

        assert report.native and type(hf) is transformers.GPTNeoXForCausalLM
        assert not (tmp_path / "hf" / "modeling_mesh.py").exists()
    else:
        assert not report.native and type(hf).__name__ == "MeshForCausalLM"
        # h_emb, h(0) .. h(N_loop), coda output
        assert len(out.hidden_states) == 1 + config.split.loops + 1 + 1
        trace = []
        seq = ids.shape[1]
        with torch.no_grad():
            model(ids, torch.arange(seq)[None].expand_as(ids),
                  torch.triu(torch.ones(seq, seq, dtype=torch.bool), 1)[None, None], trace=trace)
        loop_states = [t["hidden"] for t in trace]  # h(0) (MeSH only: the transitional read) .. h(N)
        for mine, theirs in zip(reversed(out.hidden_states[1:-1]), reversed(loop_states)):
            assert (mine - theirs.transpose(0, 1)).abs().max().item() < ATOL
    card = (tmp_path / "hf" / "README.md").read_text()
    assert variant in card and str(config.split) in card
    assert ("trust_remote_code" in card) == (variant != "vanilla")


@pytest.mark.parametrize("variant, split", [("mesh", "1+2R2+1"), ("vanilla", "4")])
def test_tied_embeddings_convert_to_a_tied_head(variant, split, model_parallel, tokenizer, tmp_path):
    """A tied head (model.untie_embeddings=false) stays tied; a vanilla model with a tied head and the
    sqrt(d) scale cannot fold the scale into GPT-NeoX's weights, so it becomes MeshForCausalLM."""
    config = tiny_config(variant, split, untie_embeddings=False)
    model = perturbed_model(config)
    report = _export(write_model_checkpoint(model, config, tmp_path / "ckpt"), tmp_path / "hf", tokenizer)
    hf, _ = load_hf(tmp_path / "hf")
    assert not report.native and hf.config.tie_word_embeddings
    assert hf.lm_head.weight.data_ptr() == hf.model.embed_in.weight.data_ptr()
    ids = _ids(config.padded_vocab_size)
    with torch.no_grad():
        assert (hf(ids, use_cache=False).logits - training_logits(model, ids)).abs().max().item() < ATOL


def test_a_transformers_gptneox_imports_with_its_logits(model_parallel, tmp_path):
    """A randomly initialised GPTNeoXForCausalLM made by transformers, converted with from-hf, gives the same
    logits in this stack's model at world size 1 and at TP=2 (two real processes)."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from mesh_hf.import_hf import import_hf
    from mesh_model.model import build_model
    from pretrain.checkpoint import format as ckpt

    torch.manual_seed(0)
    hf = GPTNeoXForCausalLM(GPTNeoXConfig(
        vocab_size=128, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=32, rotary_pct=0.25, use_parallel_residual=True, tie_word_embeddings=False)).eval()
    with torch.no_grad():
        for param in hf.parameters():
            param.add_(0.05 * torch.randn_like(param))
    hf.save_pretrained(tmp_path / "pythia")
    checkpoint, config, _ = import_hf(tmp_path / "pythia", tmp_path / "ckpt", tensor_parallel=2)
    assert config.variant == "vanilla" and not config.scale_embeddings
    ids = _ids(128)
    with torch.no_grad():
        reference = hf(ids).logits
    model = build_model(config).eval()
    model.load_state_dict(ckpt.consolidate(checkpoint))
    assert (training_logits(model, ids) - reference).abs().max().item() < ATOL

    torch.save(ids, tmp_path / "ids.pt")
    log = tmp_path / "tp2.log"
    with open(log, "w") as out:
        result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                                 str(REPO / "tests/support/tp_logits_worker.py"), str(checkpoint),
                                 str(tmp_path / "ids.pt"), str(tmp_path / "tp2.pt")],
                                stdout=out, stderr=subprocess.STDOUT, env=launch_env(), cwd=REPO, timeout=300)
    assert result.returncode == 0, tail(log)
    assert (torch.load(tmp_path / "tp2.pt") - reference).abs().max().item() < ATOL


@pytest.mark.parametrize("variant, split", [("mesh", "1+2R2+1"), ("residual", "1+2R2+1"), ("vanilla", "4")])
def test_generation_with_and_without_the_cache_and_left_padding(variant, split, model_parallel, tokenizer,
                                                               tmp_path):
    config = tiny_config(variant, split, seq_length=32)
    model = perturbed_model(config, seed=1)
    _export(write_model_checkpoint(model, config, tmp_path / "ckpt"), tmp_path / "hf", tokenizer)
    hf, _ = load_hf(tmp_path / "hf")
    prompt = _ids(config.padded_vocab_size, batch=1, seq=5, seed=3)
    with torch.no_grad():
        cached = hf.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=True, pad_token_id=0)
        uncached = hf.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=False, pad_token_id=0)
    ids = prompt
    for _ in range(8):  # greedy decoding with the training model, recomputing everything
        ids = torch.cat([ids, training_logits(model, ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert cached.tolist() == uncached.tolist() == ids.tolist()

    # A left-padded batch gives each row the logits it has alone.
    rows = [_ids(config.padded_vocab_size, 1, n, seed=n)[0] for n in (7, 4, 6)]
    width = max(len(r) for r in rows)
    batch = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros_like(batch)
    for i, row in enumerate(rows):
        batch[i, width - len(row):], mask[i, width - len(row):] = row, 1
    with torch.no_grad():
        padded = hf(batch, attention_mask=mask, use_cache=False).logits
        for i, row in enumerate(rows):
            alone = hf(row[None], use_cache=False).logits[0]
            assert (padded[i, width - len(row):] - alone).abs().max().item() < ATOL
        # and a batched greedy generation with the cache equals each row's own
        together = hf.generate(batch, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
        for i, row in enumerate(rows):
            own = hf.generate(row[None], max_new_tokens=5, do_sample=False, pad_token_id=0)
            assert together[i, width:].tolist() == own[0, len(row):].tolist()


@pytest.mark.parametrize("variant, split", [("mesh", "1+2R2+1"), ("vanilla", "4")])
def test_round_trip_checkpoint_hf_checkpoint_hf_is_identical(variant, split, model_parallel, tokenizer, tmp_path):
    from safetensors.torch import load_file

    from mesh_hf.import_hf import import_hf
    from pretrain.checkpoint import format as ckpt

    config = tiny_config(variant, split)
    model = perturbed_model(config)
    first = write_model_checkpoint(model, config, tmp_path / "ckpt1")
    _export(first, tmp_path / "hf1", tokenizer)
    second, _, _ = import_hf(tmp_path / "hf1", tmp_path / "ckpt2")
    _export(second, tmp_path / "hf2", tokenizer)
    a = load_file(tmp_path / "hf1" / "model.safetensors")
    b = load_file(tmp_path / "hf2" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    if variant != "vanilla":  # a native folder keeps GPT-NeoX's unscaled embedding: the weights differ by sqrt(h)
        c1, c2 = ckpt.consolidate(first), ckpt.consolidate(second)
        assert c1.keys() == c2.keys() and all(torch.equal(c1[k], c2[k]) for k in c1)
    assert json.loads((tmp_path / "hf1" / "config.json").read_text()) == \
        json.loads((tmp_path / "hf2" / "config.json").read_text())


def test_sharded_weights_and_bf16(model_parallel, tokenizer, tmp_path):
    from safetensors.torch import load_file

    config = tiny_config("mesh", "1+2R2+1")
    model = perturbed_model(config)
    checkpoint = write_model_checkpoint(model, config, tmp_path / "ckpt", tensor_parallel=2)
    report = _export(checkpoint, tmp_path / "hf", tokenizer, max_shard_bytes=20_000, dtype=torch.bfloat16)
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert len(report.files) > 2 and sorted(set(index["weight_map"].values())) == report.files
    weights = {}
    for name in report.files:
        weights.update(load_file(tmp_path / "hf" / name))
    assert set(weights) == set(index["weight_map"]) and all(w.dtype == torch.bfloat16 for w in weights.values())
    hf, _ = load_hf(tmp_path / "hf", torch.bfloat16)
    ids = _ids(config.padded_vocab_size)
    with torch.no_grad():
        logits = hf(ids, use_cache=False).logits.float()
    reference = training_logits(model, ids)
    # bf16 weights and activations: close to fp32, not equal
    assert (logits - reference).abs().max().item() < 0.1 * reference.abs().max().item()


def test_perplexity_equals_the_training_models_loss_on_the_same_windows(model_parallel, tokenizer, tmp_path):
    import torch.nn.functional as F

    from mesh_hf import perplexity

    config = tiny_config("mesh", "1+2R2+1", seq_length=16)
    model = perturbed_model(config)
    _export(write_model_checkpoint(model, config, tmp_path / "ckpt"), tmp_path / "hf", tokenizer)
    hf, _ = load_hf(tmp_path / "hf")
    generator = torch.Generator().manual_seed(5)
    documents = [torch.randint(0, 96, (n,), generator=generator).tolist() for n in (30, 11, 45)]
    result = perplexity.evaluate(hf, documents, lambda ids: "x" * len(ids), context=17, stride=16, batch_size=2,
                                 progress=False)
    stream = torch.tensor([t for d in documents for t in d])
    total, count = 0.0, 0
    for start in range(0, len(stream) - 1, 16):  # disjoint 16-token targets, each window 17 tokens
        window = stream[start:start + 17][None]
        logits = training_logits(model, window)
        total += F.cross_entropy(logits[0, :-1], window[0, 1:], reduction="sum").item()
        count += window.shape[1] - 1
    assert result.tokens == count == len(stream) - 1
    assert result.nll_nats == pytest.approx(total / count, rel=1e-5)
    assert result.bytes == len(stream) and result.bits_per_byte == pytest.approx(total / 0.6931471805599453 / len(stream), rel=1e-5)


# ---------------------------------------------------------------------------------------- the CLI, bad input
def _mesh(capsys, *argv: str) -> tuple[int, str, str]:
    from mesh_cli.main import main

    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_generate_and_ppl_on_a_checkpoint(model_parallel, demo_data, tmp_path, capsys):
    config = tiny_config("mesh", "1+2R2+1", vocab_size=4096, seq_length=32)
    checkpoint = write_model_checkpoint(perturbed_model(config), config, tmp_path / "ckpt")
    tok = str(demo_data / "tokenizer.model")
    code, out, err = _mesh(capsys, "generate", str(checkpoint), "def main():", "--max-new-tokens", "6",
                           "--tokenizer", tok)
    assert code == 0, err
    assert out.splitlines()[0].startswith("def main():") and "tokens/s, greedy, KV cache on" in out
    code, out, err = _mesh(capsys, "eval", "ppl", str(checkpoint), "--tokenizer", tok, "--data",
                           str(demo_data / "val_text_document"), "--max-documents", "2", "--context", "33",
                           "--stride", "32", "--json", str(tmp_path / "ppl.json"))
    assert code == 0, err
    numbers = json.loads((tmp_path / "ppl.json").read_text())
    assert "(context 33, stride 32)" in out and numbers["documents"] == 2 and numbers["bits_per_byte"] > 0
    assert numbers["perplexity"] == pytest.approx(2.718281828 ** numbers["nll_nats"])


def test_a_run_folder_means_its_newest_complete_checkpoint(model_parallel, tokenizer, tmp_path, capsys):
    """`mesh convert hf RUN_DIR` as `mesh analyze RUN_DIR`: the newest complete step, not an error."""
    config = tiny_config("mesh", "1+2R2+1")
    checkpoints = tmp_path / "run" / "checkpoints"
    older = write_model_checkpoint(perturbed_model(config, seed=1), config, checkpoints / "step0000004")
    newest = write_model_checkpoint(perturbed_model(config, seed=2), config, checkpoints / "step0000008")
    for step, path in ((4, older), (8, newest)):  # the helper writes step-0 checkpoints; give them their steps
        from pretrain.checkpoint.format import _canonical_sha256

        meta = {**json.loads((path / "meta.json").read_text()), "step": step}
        (path / "meta.json").write_text(json.dumps({**meta, "meta_sha256": _canonical_sha256(meta)}))
    (checkpoints / "step0000012").mkdir()  # an interrupted save: no meta.json, passed over
    code, out, err = _mesh(capsys, "convert", "hf", str(tmp_path / "run"), str(tmp_path / "hf"), "--tokenizer", tokenizer)
    assert code == 0, err
    _export(newest, tmp_path / "hf-newest", tokenizer)
    _export(older, tmp_path / "hf-older", tokenizer)
    converted, want, other = ((tmp_path / d / "model.safetensors").read_bytes() for d in ("hf", "hf-newest", "hf-older"))
    assert converted == want and converted != other
    code, _, err = _mesh(capsys, "convert", "hf", str(tmp_path / "nothing"), str(tmp_path / "hf2"), "--tokenizer", tokenizer)
    assert code == 2 and "no such checkpoint, checkpoints folder or run folder" in err


def test_bad_input_is_one_line_and_writes_nothing(model_parallel, tokenizer, tmp_path, capsys):
    config = tiny_config("mesh", "1+2R2+1")
    checkpoint = write_model_checkpoint(perturbed_model(config), config, tmp_path / "ckpt")

    def refused(*argv: str, says: str) -> None:
        code, _, err = _mesh(capsys, *argv)
        assert code == 2 and len(err.strip().splitlines()) == 1 and says in err, err

    # a non-empty output folder without --overwrite: refused, its file kept
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    refused("convert", "hf", str(checkpoint), str(tmp_path / "busy"), "--tokenizer", tokenizer, says="not empty")
    assert (tmp_path / "busy" / "keep.txt").read_text() == "mine"
    # a damaged checkpoint (a truncated state file) and an incomplete one (no meta.json)
    state = next((checkpoint / "state").iterdir())
    state.write_bytes(state.read_bytes()[:100])
    refused("convert", "hf", str(checkpoint), str(tmp_path / "out1"), "--tokenizer", tokenizer, says="mesh ckpt verify")
    (checkpoint / "meta.json").unlink()
    refused("convert", "hf", str(checkpoint), str(tmp_path / "out2"), "--tokenizer", tokenizer, says="incomplete")
    # an HF folder of an unsupported architecture
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    refused("convert", "from-hf", str(tmp_path / "llama"), str(tmp_path / "out3"), says="LlamaForCausalLM")
    # a --layer-map naming layers the source does not have
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=128, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                                     intermediate_size=64)).save_pretrained(tmp_path / "neox")
    capsys.readouterr()  # transformers' own progress output
    refused("convert", "from-hf", str(tmp_path / "neox"), str(tmp_path / "out4"), "--split", "1+2R2+1",
            "--layer-map", "prelude=0,core=1-2,coda=7", says="source layer 7")
    assert not any((tmp_path / name).exists() for name in ("out1", "out2", "out3", "out4"))
    assert not list(tmp_path.glob(".out*"))  # no partial folders left behind


def test_layer_map_initialises_a_recursive_model_from_gptneox_layers(model_parallel, tmp_path):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from mesh_hf.import_hf import import_hf
    from pretrain.checkpoint import format as ckpt

    torch.manual_seed(0)
    GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=128, hidden_size=32, num_hidden_layers=6, num_attention_heads=4,
                                     intermediate_size=64)).save_pretrained(tmp_path / "neox")
    checkpoint, config, notes = import_hf(tmp_path / "neox", tmp_path / "ckpt", split="1+2R2+1", variant="mesh",
                                          layer_map="prelude=0,core=2-3,coda=5")
    source = GPTNeoXForCausalLM.from_pretrained(tmp_path / "neox").state_dict()
    tensors = ckpt.consolidate(checkpoint)
    qkv = "self_attention.linear_qkv.weight"
    assert torch.equal(tensors[f"prelude.layers.0.{qkv}"], source["gpt_neox.layers.0.attention.query_key_value.weight"])
    assert torch.equal(tensors[f"core.layers.1.{qkv}"], source["gpt_neox.layers.3.attention.query_key_value.weight"])
    assert torch.equal(tensors[f"coda.layers.0.{qkv}"], source["gpt_neox.layers.5.attention.query_key_value.weight"])
    assert any(name.startswith("recurrence.routers.") for name in tensors) and "source layers" in notes[0]
    assert config.split.is_recursive and config.variant == "mesh"
