"""MeSH on a non-recursive backbone (the paper's vanilla+mesh): `L_pre+L_corexN_loop+L_coda`.

Each loop runs its own, unshared copy of the core block, with the MeSH buffer and routers at
the same block boundaries as in recursive MeSH. With the copies set to identical weights it is
recursive MeSH exactly; its parameters are the vanilla model's of the same compute depth plus
the routers; its FLOPs are the recursive model's. (Chained pipeline stages against the whole
model, for `1+2x2+1` at PP=2 and PP=3, are in test_unrolled.py's parametrized test.)
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch

from mesh_model.config import ConfigError, ModelConfig, parse_layer_split, read_yaml_mapping
from mesh_model.flops import flops_per_token
from mesh_model.params import _run, load_model_config, report_for
from mesh_model.unrolled import PipelineCut, unrolled_ops
from tests.support.models import causal_inputs, tiny_model_config

CONFIGS = Path(__file__).resolve().parents[3] / "configs"


def test_program_of_an_unshared_split():
    split = parse_layer_split("1+2x2+1")
    assert (split.prelude, split.core, split.loops, split.coda, split.shared) == (1, 2, 2, 1, False)
    assert str(split) == "1+2x2+1" and parse_layer_split("1+2R2+1").shared
    assert (split.compute_depth, split.unique_layers, split.unique_core_layers) == (6, 6, 4)
    assert [str(op) for op in unrolled_ops(split)] == [
        "prelude.0", "begin",
        "loop_start 0", "core.0@0", "core.1@0", "loop_end 0",
        "loop_start 1", "core.2@1", "core.3@1", "loop_end 1",
        "coda.0",
    ]


@pytest.mark.parametrize("stages,holders", [
    (2, {0: (0,), 1: (0,), 2: (1,), 3: (1,)}),
    (3, {0: (0,), 1: (1,), 2: (1,), 3: (2,)}),
])
def test_cut_of_an_unshared_core_has_no_replicas(stages, holders):
    cut = PipelineCut.of(tiny_model_config(layer_split="1+2x2+1"), stages)
    assert cut.core_holders() == holders
    assert cut.replicated_stage_sets() == []
    # The MeSH buffer still crosses the cuts, as in recursive MeSH.
    assert all("buffer" in cut.send_fields(s) for s in range(stages - 1))


def test_stages_build_their_own_core_copies(model_parallel):
    from mesh_model.model import ModelParallelism, build_model

    config = tiny_model_config(layer_split="1+2x2+1")
    whole = build_model(config)
    assert sorted(whole.core.layers) == ["0", "1", "2", "3"]
    # Layer numbers unique per distinct layer: prelude 1, core 2..5 (loop 1's copy 4, 5), coda 6.
    numbers = [whole.prelude.layers["0"].layer_number] + [whole.core.layers[str(k)].layer_number for k in range(4)]
    assert numbers + [whole.coda.layers["0"].layer_number] == [1, 2, 3, 4, 5, 6]
    # Distinct initial weights per loop (their own init seeds).
    assert not torch.equal(whole.core.layers["0"].mlp.linear_fc1.weight, whole.core.layers["2"].mlp.linear_fc1.weight)
    stages = [build_model(config, ModelParallelism.stage(config, 3, r)) for r in range(3)]
    assert [sorted(s.core.layers) for s in stages] == [["0"], ["1", "2"], ["3"]]
    names = [n for s in stages for n, _ in s.named_parameters()]
    assert len(names) == len(set(names)) and set(names) == {n for n, _ in whole.named_parameters()}


def _shared_weights_copied_into_unshared():
    """Recursive MeSH 1+2R2+1 and vanilla+mesh 1+2x2+1 with every core copy set to the shared core."""
    from mesh_model.model import build_model

    recursive = build_model(tiny_model_config(layer_split="1+2R2+1"))
    unshared = build_model(tiny_model_config(layer_split="1+2x2+1"))
    core = recursive.model_config.split.core
    source = recursive.state_dict()

    def shared_name(name: str) -> str:
        if name.startswith("core.layers."):
            index, rest = name[len("core.layers."):].split(".", 1)
            return f"core.layers.{int(index) % core}.{rest}"
        return name

    unshared.load_state_dict({name: source[shared_name(name)] for name in unshared.state_dict()})
    return recursive, unshared, shared_name


def test_identical_copies_equal_recursive_mesh(model_parallel):
    recursive, unshared, shared_name = _shared_weights_copied_into_unshared()
    inputs = causal_inputs(2, 16, 96)
    tokens = inputs[0]
    with torch.no_grad():
        torch.testing.assert_close(unshared(*inputs), recursive(*inputs), rtol=0, atol=0)
    loss_r = recursive(*inputs, labels=tokens).mean()
    loss_u = unshared(*inputs, labels=tokens).mean()
    assert torch.equal(loss_u, loss_r)
    loss_r.backward()
    loss_u.backward()
    summed: dict[str, torch.Tensor] = {}
    for name, param in unshared.named_parameters():
        summed[shared_name(name)] = summed.get(shared_name(name), 0) + param.grad
    recursive_grads = dict(recursive.named_parameters())
    assert set(summed) == set(recursive_grads)
    for name, param in recursive_grads.items():
        # The recursive model accumulates its shared core's two loop gradients in autograd; the
        # sum here adds them in another order: float32 round-off of the tensor's scale.
        scale = param.grad.abs().max().item()
        torch.testing.assert_close(summed[name], param.grad, rtol=1e-6, atol=1e-9 + 1e-6 * scale, msg=name)


def test_recompute_of_an_unshared_loop_is_exact(model_parallel):
    from mesh_model.model import build_model

    inputs = causal_inputs(2, 16, 96)
    losses = []
    for recompute in ([], ["core@1"]):
        model = build_model(tiny_model_config(layer_split="1+2x2+1", recompute=recompute))
        model.train()
        losses.append(model(*inputs, labels=inputs[0]).mean())
        losses[-1].backward()
        assert all(p.grad is not None for p in model.parameters())
    assert torch.equal(losses[0], losses[1])


def test_other_variants_accept_an_unshared_split(model_parallel):
    from mesh_model.model import build_model

    for variant in ("base", "residual", "anchor", "anchor_emb"):
        config = tiny_model_config(variant=variant, layer_split="1+2x2+1", num_layers=6)
        assert report_for(config).non_embedding == report_for(tiny_model_config(variant="vanilla", layer_split="6")).non_embedding
    inputs = causal_inputs(2, 16, 96)
    assert build_model(tiny_model_config(variant="base", layer_split="1+2x2+1"))(*inputs).shape == (2, 16, 96)


def test_tiny_parameter_count_is_vanilla_plus_routers():
    unshared = report_for(tiny_model_config(layer_split="1+2x2+1"))
    recursive = report_for(tiny_model_config(layer_split="1+2R2+1"))
    vanilla = report_for(tiny_model_config(variant="vanilla", layer_split="6"))
    assert unshared.routers == recursive.routers > 0
    assert unshared.non_embedding == vanilla.non_embedding + unshared.routers
    assert unshared.embedding == vanilla.embedding


def unshared_config(size: str) -> ModelConfig:
    """configs/pythia-<size>/mesh.yaml's model section with its split's R replaced by x."""
    section = dict(read_yaml_mapping(CONFIGS / f"pythia-{size}" / "mesh.yaml")["model"])
    section["layer_split"] = str(section["layer_split"]).replace("R", "x")
    return ModelConfig.from_dict(section)


@pytest.mark.parametrize("size,split", [("160m", "2+4x2+2"), ("410m", "4+8x2+4"), ("1b", "3+5x2+3"),
                                        ("1.4b", "4+8x2+4")])
def test_table1_sizes_are_vanilla_plus_routers(size, split):
    config = unshared_config(size)
    assert str(config.split) == split
    unshared = report_for(config)
    vanilla = report_for(load_model_config(CONFIGS / f"pythia-{size}" / "vanilla.yaml"))
    mesh = report_for(load_model_config(CONFIGS / f"pythia-{size}" / "mesh.yaml"))
    assert unshared.routers == mesh.routers > 0
    assert unshared.non_embedding == vanilla.non_embedding + unshared.routers
    assert unshared.embedding == vanilla.embedding
    if size == "1.4b":  # the paper's Table 5 vanilla (1,208,602,624) + the 61,470 router parameters
        assert unshared.non_embedding == 1_208_602_624 + 61_470


def test_mesh_params_prints_the_split_as_written(tmp_path, capsys):
    path = tmp_path / "vanilla_mesh.yaml"
    path.write_text("model:\n  layer_split: 4+8x2+4\n  num_layers: 24\n  variant: mesh\n"
                    "  hidden_size: 2048\n  num_attention_heads: 16\n")
    _run(argparse.Namespace(configs=[str(path)]))
    out = capsys.readouterr().out
    assert "4+8x2+4 (24 compute layers, 24 unique)" in out
    assert "1,208,664,094" in out and "61,470" in out  # non-embedding and routers


def test_flops_equal_the_recursive_model():
    unshared = flops_per_token(tiny_model_config(layer_split="1+2x2+1"))
    assert unshared == flops_per_token(tiny_model_config(layer_split="1+2R2+1"))
    assert flops_per_token(unshared_config("1.4b")) == flops_per_token(load_model_config(CONFIGS / "pythia-1.4b" / "mesh.yaml"))


@pytest.mark.parametrize("split", ["1+2y2+1", "1+2X2+1", "1+2x2", "1+2x0+1", "1+2x-1+1"])
def test_malformed_split_is_one_line_naming_the_field(split):
    with pytest.raises(ConfigError, match="model.layer_split") as err:
        tiny_model_config(layer_split=split)
    message = str(err.value)
    assert "\n" not in message
    if "N_loop" not in message:
        assert "4+8R2+4" in message and "4+8x2+4" in message


def test_vanilla_refuses_an_unshared_split():
    with pytest.raises(ConfigError, match="model.layer_split='1\\+2x2\\+1' is recursive"):
        tiny_model_config(variant="vanilla", layer_split="1+2x2+1")
