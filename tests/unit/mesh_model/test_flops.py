"""The MFU numerator (mesh_model/flops.py) against torch's FLOP counter.

One forward + backward of a real model, counted by `torch.utils.flop_counter`
(matmuls and attention), must equal F_token x tokens minus the formula's one
approximation, its bias/norm term, exactly. Attention runs on SDPA's math
backend here, whose matmuls the counter sees; it computes the whole s x s square,
which is what the formula counts.
"""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from mesh_model.flops import flops_per_token, layer_params
from tests.support.models import causal_inputs, tiny_model_config
from tests.support.harness import REPO


def counted_flops(config, batch: int) -> int:
    from mesh_model.model import build_model

    model = build_model(config, use_transformer_engine=False)
    tokens, positions, mask = causal_inputs(batch, config.seq_length, config.vocab_size)
    labels = torch.roll(tokens, -1, dims=1)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        loss = model(tokens, positions, mask, labels=labels).float().mean()
        loss.backward()
    return counter.get_total_flops()


@pytest.mark.parametrize(
    "overrides",
    [
        dict(variant="mesh", layer_split="1+2R2+1"),
        dict(variant="mesh", layer_split="2+1R3+1", hidden_size=64, seq_length=32),
        dict(variant="anchor_emb", layer_split="1+2R2+1"),
        dict(variant="residual", layer_split="1+2R2+1", untie_embeddings=False),
        dict(variant="vanilla", layer_split="4", num_layers=4),
        dict(variant="mesh", layer_split="1+2x2+1"),
    ],
    ids=["mesh-1+2R2+1", "mesh-2+1R3+1-d64", "anchor_emb", "residual-tied", "vanilla", "vanilla+mesh-1+2x2+1"],
)
def test_matmul_flops_match_torch_flop_counter(model_parallel, overrides):
    """Every matmul of forward + backward is accounted for, exactly: F_token minus the
    bias/norm term (elementwise work the counter does not count) times the tokens."""
    config = tiny_model_config(**overrides)
    batch = 2
    flops = flops_per_token(config)
    counted = counted_flops(config, batch)
    expected = (flops.total - 6 * flops.vector_params) * batch * config.seq_length
    print(f"\n{overrides}: counted {counted:,} FLOPs, formula without bias/norm terms {expected:,}")
    assert counted == expected


def test_core_layers_count_once_per_loop(model_parallel):
    """Looping the core N times costs N core layers of FLOPs; the weights are shared."""
    once = tiny_model_config(layer_split="1+2R1+1", variant="base")
    thrice = tiny_model_config(layer_split="1+2R3+1", variant="base")
    extra = flops_per_token(thrice).total - flops_per_token(once).total
    matrices, vectors = layer_params(once)
    per_layer = 6 * (matrices + vectors) + 12 * once.seq_length * once.hidden_size
    assert extra == 2 * 2 * per_layer  # 2 core layers x 2 more loops
    counted_extra = (counted_flops(thrice, 1) - counted_flops(once, 1)) / once.seq_length
    assert counted_extra == extra - 2 * 2 * 6 * vectors


@pytest.mark.parametrize("size", ["160m", "410m", "1.4b"])
def test_bias_and_norm_terms_are_small_at_pythia_sizes(size):
    """The formula's one approximation (bias/norm parameters at 6 FLOPs per token) is
    negligible on the configs MFU is reported for."""
    from pretrain.config import load_config

    config = load_config(REPO / "configs" / f"pythia-{size}" / "mesh.yaml", []).model
    flops = flops_per_token(config)
    assert 6 * flops.vector_params < 0.005 * flops.total, (flops.vector_params, flops.total)
    assert flops.attention < flops.dense  # sanity: 12 L s d vs 6 N at these shapes
