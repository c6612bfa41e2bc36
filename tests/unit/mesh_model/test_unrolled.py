"""The unrolled program and its pipeline cuts, checked in one process.

Chaining the stage models by hand (stage k's packed output is stage k+1's input)
must give the whole model's loss, and the sum of each replicated core layer's
gradients over the stages must give the whole model's gradient.
"""

from __future__ import annotations

from collections import defaultdict

import pytest
import torch

from mesh_model.config import ConfigError, parse_layer_split
from mesh_model.unrolled import live_fields, partition, stage_layer_counts, unrolled_ops
from tests.support.models import causal_inputs, tiny_model_config


def test_program_of_a_recursive_split():
    ops = [str(op) for op in unrolled_ops(parse_layer_split("1+2R2+1"))]
    assert ops == [
        "prelude.0", "begin",
        "loop_start 0", "core.0@0", "core.1@0", "loop_end 0",
        "loop_start 1", "core.0@1", "core.1@1", "loop_end 1",
        "coda.0",
    ]
    assert [str(op) for op in unrolled_ops(parse_layer_split("3"))] == ["prelude.0", "prelude.1", "prelude.2"]


def test_partition_is_even_and_events_follow_their_layer():
    ops = unrolled_ops(parse_layer_split("1+2R2+1"))  # 6 layers
    stages = partition(ops, 3)
    names = [[str(ops[i]) for i in r] for r in stages]
    assert names == [
        ["prelude.0", "begin", "loop_start 0", "core.0@0"],
        ["core.1@0", "loop_end 0", "loop_start 1", "core.0@1"],
        ["core.1@1", "loop_end 1", "coda.0"],
    ]
    assert [len(r) for r in partition(ops, 2, [5, 1])] == [10, 1]
    assert stage_layer_counts(7, 3) == [3, 2, 2]
    with pytest.raises(ConfigError, match="pipeline_layout"):
        partition(ops, 2, [3, 2])
    with pytest.raises(ConfigError, match="only 6 layers"):
        partition(ops, 7)


def test_only_needed_state_crosses_a_cut():
    from mesh_model.recurrence import FixedRecurrence, MeshRecurrence

    ops = unrolled_ops(parse_layer_split("1+2R2+1"))
    mesh = MeshRecurrence(tiny_model_config()).fields()
    # Inside the prelude: MeSH still needs h_emb for its buffer.
    assert live_fields(ops, 0, mesh) == ["embeddings"]
    # Inside loop 0: the buffer and the loop's input h(0) (its routers' query).
    assert live_fields(ops, 3, mesh) == ["loop_input", "buffer"]
    # Between loops: only the buffer (h(1) is the hidden state itself).
    assert live_fields(ops, 6, mesh) == ["buffer"]
    # Before the coda: nothing but the hidden state.
    assert live_fields(ops, 10, mesh) == []
    assert live_fields(ops, 3, FixedRecurrence("anchor_emb", 2).fields()) == ["embeddings"]
    assert live_fields(ops, 6, FixedRecurrence("anchor", 2).fields()) == ["anchor"]
    assert live_fields(ops, 4, FixedRecurrence("residual", 2).fields()) == ["loop_input"]
    assert live_fields(ops, 4, FixedRecurrence("base", 2).fields()) == []


def run_stages(stages, inputs):
    tokens, positions, mask = inputs
    packed = None
    for stage in stages:
        if packed is not None:
            received = packed.detach().requires_grad_(True)
            stage.set_input_tensor(received)
        out = stage(tokens, positions, mask, labels=tokens)
        if stage.post_process:
            return out
        assert out.shape[-1] == stage.packed_width("send")
        packed = out
    raise AssertionError("no last stage")


@pytest.mark.parametrize(
    "variant,split,pipeline,layout",
    [
        ("mesh", "1+2R2+1", 2, None),
        ("mesh", "1+2R2+1", 3, None),  # core.0 and core.1 each on two stages
        ("mesh", "1+2R2+1", 4, [1, 2, 2, 1]),
        ("mesh", "0+2R2+0", 3, None),  # no prelude: the transitional cycle opens stage 0
        ("anchor", "1+2R2+1", 3, None),
        ("anchor_emb", "1+2R2+1", 3, None),
        ("residual", "1+2R2+1", 4, None),
        ("base", "1+2R3+1", 4, None),
        ("vanilla", "5", 3, None),
        ("mesh", "1+2x2+1", 2, None),  # vanilla+mesh: unshared core copies, one per loop
        ("mesh", "1+2x2+1", 3, None),  # loop 0's core.1 and loop 1's core.2 on stage 1
    ],
)
def test_chained_stages_equal_the_whole_model(model_parallel, variant, split, pipeline, layout):
    from mesh_model.model import ModelParallelism, build_model

    config = tiny_model_config(variant=variant, layer_split=split)
    whole = build_model(config)
    stages = [build_model(config, ModelParallelism.stage(config, pipeline, r, layout)) for r in range(pipeline)]
    inputs = causal_inputs(2, 16, 96)

    # Same weights by construction (per-layer init seeds), whatever the layout.
    whole_params = dict(whole.named_parameters())
    for stage in stages:
        for name, param in stage.named_parameters():
            assert torch.equal(param, whole_params[name]), name

    expected = whole(*inputs, labels=inputs[0])
    got = run_stages(stages, inputs)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)

    # Gradients: chain the backward by hand, then sum replicas across stages.
    expected.mean().backward()
    # Re-run stage by stage keeping the graph connected, so one backward reaches stage 0.
    for stage in stages:
        stage.zero_grad(set_to_none=True)
    tokens, positions, mask = inputs
    packed = None
    for stage in stages:
        if packed is not None:
            stage.set_input_tensor(packed)
        packed = stage(tokens, positions, mask, labels=tokens)
    packed.mean().backward()
    summed = defaultdict(lambda: 0)
    copies = defaultdict(int)
    for stage in stages:
        for name, param in stage.named_parameters():
            if param.grad is not None:
                summed[name] = summed[name] + param.grad
            copies[name] += 1
    for name, param in whole.named_parameters():
        assert name in summed, f"{name} got no gradient on any stage"
        torch.testing.assert_close(summed[name], param.grad, rtol=1e-5, atol=1e-7, msg=name)
    if pipeline >= 3 and variant != "vanilla" and parse_layer_split(split).shared:
        assert max(copies.values()) >= 2, "expected a core layer replicated on several stages"
    if not parse_layer_split(split).shared:
        assert max(copies.values()) == 1, "an unshared core layer is on one stage only"


@pytest.mark.parametrize("recompute", [["core"], ["core@1"], ["prelude", "core", "coda"]])
def test_activation_recompute_is_exact_and_saves_memory(model_parallel, recompute):
    """Recomputing layers in backward gives the same loss and gradients, with fewer saved activations."""
    from mesh_model.model import build_model

    inputs = causal_inputs(2, 16, 96)
    results = {}
    for name, selection in (("keep", []), ("recompute", recompute)):
        model = build_model(tiny_model_config(recompute=selection))
        model.train()
        saved = 0

        def pack(tensor):
            nonlocal saved
            saved += tensor.numel()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(*inputs, labels=inputs[0]).mean()
        loss.backward()
        results[name] = (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, saved)
    (loss_a, grads_a, saved_a), (loss_b, grads_b, saved_b) = results["keep"], results["recompute"]
    assert torch.equal(loss_a, loss_b)
    for name in grads_a:
        # The recomputed backward sums the same gradient terms in another order, so an element
        # that is a cancelling sum can move by float32 round-off of the tensor's largest terms:
        # measured 9.5e-8 x max|grad| (prelude biases under core@1, AMD EPYC host), 2.8e-9 absolute
        # on a value of 9.5e-4, which a bare rtol=1e-6 rejects. Allow 1e-6 of the tensor's scale.
        scale = grads_a[name].abs().max().item()
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-6, atol=1e-9 + 1e-6 * scale, msg=name)
    assert saved_b < saved_a


def test_bad_recompute_entry_names_the_field():
    with pytest.raises(ConfigError, match="model.recompute"):
        tiny_model_config(recompute=["core@2"])  # loops are 0 and 1
