"""The paper's Table 4 state-passing schemes: fixed sums of supplements and learned combinations."""

from __future__ import annotations

import pytest
import torch

from mesh_model.config import ConfigError
from mesh_model.recurrence import FixedRecurrence, RecurrentState
from tests.support.models import causal_inputs, tiny_model_config

TABLE_4_FIXED = ["residual+anchor", "residual+anchor+anchor_emb", "anchor+anchor_emb"]


@pytest.mark.parametrize("variant", ["base", "residual", "anchor", "anchor_emb", *TABLE_4_FIXED])
def test_a_fixed_combination_is_the_sum_written_out(variant):
    generator = torch.Generator().manual_seed(0)
    core_out, h_t, h0, h_emb = (torch.randn(5, 2, 8, generator=generator) for _ in range(4))
    recurrence = FixedRecurrence(variant, num_loops=2)
    state = RecurrentState(hidden=h0, embeddings=h_emb)
    recurrence.begin(state)  # h0 = the prelude output
    state.hidden = h_t
    recurrence.loop_start(0, state)  # h(t)
    state.hidden = core_out  # f_core(h(t))
    recurrence.loop_end(0, state)
    expected = core_out.clone()
    for name, value in (("residual", h_t), ("anchor", h0), ("anchor_emb", h_emb)):
        if name in variant.split("+"):
            expected = expected + value
    assert torch.equal(state.hidden, expected)


def _model(variant, **kwargs):
    from mesh_model.model import build_model

    return build_model(tiny_model_config(variant=variant, **kwargs))


def _same_weights(source, target):
    """Copies every parameter target has from source, by name (the recurrence's own ones excepted)."""
    params = dict(source.named_parameters())
    with torch.no_grad():
        for name, param in target.named_parameters():
            if name in params:
                param.copy_(params[name])


def test_anchor_plus_anchor_emb_with_one_supplement_removed_is_the_single_variant(model_parallel):
    inputs = causal_inputs(2, 16, 96)
    both = _model("anchor+anchor_emb")
    for kept in ("anchor", "anchor_emb"):
        single = _model(kept)
        _same_weights(both, single)
        both.recurrence.supplements = (kept,)
        assert torch.equal(both(*inputs), single(*inputs)), kept
    both.recurrence.supplements = ("anchor", "anchor_emb")


@pytest.mark.parametrize("coefficients, fixed", [((1.0, 1.0, 0.0), "anchor"), ((1.0, 0.0, 1.0), "anchor_emb")])
def test_the_static_combination_reduces_to_a_fixed_scheme_and_learns(model_parallel, coefficients, fixed):
    inputs = causal_inputs(2, 16, 96)
    static, reference = _model("static_combination"), _model(fixed)
    _same_weights(reference, static)
    with torch.no_grad():
        for value in static.recurrence.coefficients.values():
            value.copy_(torch.tensor(coefficients))
    assert torch.equal(static(*inputs), reference(*inputs))
    static(*inputs, labels=inputs[0]).mean().backward()
    for t, value in static.recurrence.coefficients.items():
        assert value.grad is not None and value.grad.abs().sum() > 0 and value.grad.isfinite().all(), t


def test_the_dynamic_combination_starts_as_the_static_one_and_its_maps_learn(model_parallel):
    inputs = causal_inputs(2, 16, 96)
    dynamic, static, anchor = _model("dynamic_combination"), _model("static_combination"), _model("anchor")
    _same_weights(anchor, dynamic)
    _same_weights(anchor, static)
    # Both start at a = (1, 1, 0): the +anchor model.
    assert torch.equal(dynamic(*inputs), static(*inputs)) and torch.equal(static(*inputs), anchor(*inputs))
    dynamic(*inputs, labels=inputs[0]).mean().backward()
    for t, linear in dynamic.recurrence.coefficient_maps.items():
        assert linear.weight.grad.abs().sum() > 0 and linear.bias.grad.abs().sum() > 0, t
    trace = []
    dynamic(*inputs, trace=trace)
    assert [entry["coefficients"].shape for entry in trace if "coefficients" in entry] == [(16, 2, 3)] * 2


@pytest.mark.parametrize("variant", [*TABLE_4_FIXED, "static_combination", "dynamic_combination"])
def test_parameter_counts_match_the_closed_form(variant):
    from mesh_model.params import analytic_non_embedding, report_for

    config = tiny_model_config(variant=variant, hidden_size=64, num_attention_heads=4)
    report = report_for(config)
    assert report.non_embedding == analytic_non_embedding(config)
    h, loops = 64, config.split.loops
    assert report.coefficients == {"static_combination": 3 * loops, "dynamic_combination": 3 * (h + 1) * loops}.get(
        variant, 0)


@pytest.mark.parametrize("overrides, field", [
    (dict(variant="residual+foo"), "model.variant='residual+foo': unknown supplement 'foo'"),
    (dict(variant="anchor_emb+anchor"), "model.variant='anchor_emb+anchor': write each supplement once, in the order"),
    (dict(variant="static_combination", layer_split="6"), "model.variant='static_combination' needs a recursive"),
    (dict(variant="dynamic_combination", buffer_slots=4), "model.buffer_slots=4 is set but model.variant"),
])
def test_bad_combinations_are_one_line_errors_naming_the_field(overrides, field):
    with pytest.raises(ConfigError) as err:
        tiny_model_config(**overrides)
    assert field in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("variant", ["anchor+anchor_emb", "static_combination", "dynamic_combination"])
def test_the_flops_formula_counts_the_combinations_matmuls(model_parallel, variant):
    """The dynamic maps are matmuls (3 d per loop and token); the static scalars and the sums are
    elementwise: torch's FLOP counter agrees exactly (as for the other variants, test_flops.py)."""
    from mesh_model.flops import flops_per_token
    from tests.unit.mesh_model.test_flops import counted_flops

    config = tiny_model_config(variant=variant)
    flops = flops_per_token(config)
    assert counted_flops(config, 2) == (flops.total - 6 * flops.vector_params) * 2 * config.seq_length


def test_the_shipped_configs_cover_tables_4_and_6():
    from pathlib import Path

    from mesh_model.params import load_model_config, report_for

    configs = Path(__file__).resolve().parents[3] / "configs"
    for variant in TABLE_4_FIXED + ["static_combination", "dynamic_combination"]:
        config = load_model_config(configs / "pythia-410m" / f"{variant}.yaml")
        assert (config.variant, str(config.split)) == (variant, "4+8R2+4")
    for size in ("160m", "410m", "1b", "1.4b"):
        unshared = load_model_config(configs / f"pythia-{size}" / "vanilla_mesh.yaml")
        vanilla = load_model_config(configs / f"pythia-{size}" / "vanilla.yaml")
        assert not unshared.split.shared and unshared.variant == "mesh"
        report = report_for(unshared)
        assert report.non_embedding == report_for(vanilla).non_embedding + report.routers  # 100% of vanilla
