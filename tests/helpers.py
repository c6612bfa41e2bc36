"""Small builders shared by the tests: the tiny debug model flavour and its inputs."""

from __future__ import annotations

import torch


def tiny_model_config(**overrides):
    """The debug flavour every model test uses: seconds on CPU."""
    from mesh_model.config import ModelConfig

    values = dict(
        hidden_size=32,
        num_attention_heads=4,
        vocab_size=96,
        seq_length=16,
        layer_split="1+2R2+1",
        variant="mesh",
        make_vocab_size_divisible_by=32,
    )
    values.update(overrides)
    return ModelConfig(**values)


def causal_inputs(batch: int, seq: int, vocab: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (batch, seq), generator=generator)
    positions = torch.arange(seq).unsqueeze(0).expand(batch, -1)
    mask = torch.triu(torch.ones(seq, seq, dtype=torch.bool), diagonal=1)[None, None]
    return tokens, positions, mask
