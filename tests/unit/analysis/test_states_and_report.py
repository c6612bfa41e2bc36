"""State capture (analysis/states.py) and the whole analysis (analysis/report.py) on tiny models in
this process: the captured states are the model's own, every result field is there."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from analysis.checkpoint import LoadedCheckpoint
from analysis.report import FIELDS, analyze
from analysis.skew import skew
from analysis.states import capture
from mesh_model.model import build_model
from tests.support.models import causal_inputs, tiny_model_config


def loaded(config) -> LoadedCheckpoint:
    torch.manual_seed(0)
    return LoadedCheckpoint(path="memory", meta=SimpleNamespace(step=0, layout={"tensor": 1}), config=config,
                            model=build_model(config).eval())


@pytest.mark.parametrize("variant", ["mesh", "anchor", "dynamic_combination"])
def test_captured_states_are_the_models_own(model_parallel, variant):
    config = tiny_model_config(variant=variant)
    model = loaded(config).model
    tokens, positions, mask = causal_inputs(2, config.seq_length, config.vocab_size)
    layers, coda_input = [], []

    def on_layer(label, h, fh):
        layers.append((label, skew(h, fh)))
        if label == "coda.0":
            coda_input.append(h)

    captured = capture(model, tokens, on_layer=on_layer)
    assert list(captured.states) == ["h_emb", "h0", "loop1", "loop2", "output"]
    assert list(captured.blocks) == ["prelude", "loop1", "loop2", "coda"]
    assert [label for label, _ in layers] == ["prelude.0", "core.0@loop1", "core.1@loop1", "core.0@loop2",
                                             "core.1@loop2", "coda.0"]
    with torch.no_grad():
        # The output state is what the head reads: it gives the model's logits.
        logits, _ = model.output_layer(model.final_layernorm(captured.states["output"]))
        expected = model(tokens, positions, mask)
        assert torch.allclose(logits.transpose(0, 1), expected, atol=1e-6)
        assert torch.allclose(captured.states["h_emb"], model.embed(tokens, positions))
        trace: list = []
        model(tokens, positions, mask, trace=trace)
    loop_states = [e["hidden"] for e in trace if e["step"] >= 1]
    assert torch.equal(captured.states["loop1"], loop_states[0])
    assert torch.equal(captured.states["loop2"], loop_states[1])
    assert torch.equal(captured.blocks["prelude"][1], captured.states["h0"])
    coda_in, coda_out = captured.blocks["coda"]
    assert torch.equal(coda_in, captured.states["loop2"]) and torch.equal(coda_in, coda_input[0])
    assert torch.equal(coda_out, captured.states["output"])
    assert torch.equal(captured.blocks["loop2"][0], captured.states["loop1"])  # loop 2's core reads h(1)
    assert torch.equal(dict(layers)["coda.0"], skew(coda_in, coda_out))  # one coda layer: the block is the layer


def test_an_unshared_core_runs_its_own_copy_per_loop(model_parallel):
    config = tiny_model_config(layer_split="1+2x2+1")
    labels = []
    captured = capture(loaded(config).model, causal_inputs(2, config.seq_length, config.vocab_size)[0],
                       on_layer=lambda label, h, fh: labels.append(label))
    assert labels == ["prelude.0", "core.0@loop1", "core.1@loop1", "core.2@loop2", "core.3@loop2", "coda.0"]
    assert list(captured.blocks) == ["prelude", "loop1", "loop2", "coda"]


def test_a_vanilla_model_has_embeddings_output_and_one_block(model_parallel):
    config = tiny_model_config(variant="vanilla", layer_split="3")
    captured = capture(loaded(config).model, causal_inputs(2, config.seq_length, config.vocab_size)[0])
    assert list(captured.states) == ["h_emb", "output"] and list(captured.blocks) == ["layers"]


def test_analyze_gives_every_field(model_parallel):
    config = tiny_model_config()
    tokens = causal_inputs(5, config.seq_length, config.vocab_size)[0]
    result = analyze(loaded(config), tokens, batch_size=2)
    assert set(result) == set(FIELDS)
    assert result["sequences"] == 5 and result["routers"]["tokens"] == [5 * config.seq_length] * 3
    assert len(result["spectrum"]["h0"]["mean"]) == min(50, config.seq_length, config.hidden_size)
    # Batching does not change the per-sample numbers.
    again = analyze(loaded(config), tokens, batch_size=5)
    assert again["skew"]["blocks"]["loop1"]["mean"] == pytest.approx(result["skew"]["blocks"]["loop1"]["mean"],
                                                                      rel=1e-9)
    assert torch.allclose(torch.tensor(again["cka"]["rbf"]), torch.tensor(result["cka"]["rbf"]), atol=1e-9)


def test_token_ids_beyond_the_vocabulary_are_one_line(model_parallel):
    from mesh_model.config import ConfigError

    config = tiny_model_config()
    tokens = torch.full((1, config.seq_length), config.padded_vocab_size)
    with pytest.raises(ConfigError, match="token id 96 but the checkpoint's model has 96 embeddings"):
        analyze(loaded(config), tokens)
