"""Builders for the Hugging Face conversion tests: a world-size-1 training model with
non-trivial weights, its checkpoint, and its logits."""

from __future__ import annotations

from pathlib import Path

import torch

from tests.support.models import tiny_model_config

# Every variant the conversion must carry, as (variant, layer split) of the tiny flavour.
VARIANTS = [
    ("vanilla", "4"), ("base", "1+2R2+1"), ("residual", "1+2R2+1"), ("anchor", "1+2R2+1"),
    ("anchor_emb", "1+2R2+1"), ("mesh", "1+2R2+1"), ("residual+anchor+anchor_emb", "1+1R3+1"),
    ("static_combination", "1+1R2+1"), ("dynamic_combination", "1+1R2+1"), ("mesh", "1+1x3+1"),
]


def tiny_config(variant: str, split: str, **overrides):
    return tiny_model_config(variant=variant, layer_split=split, **overrides)


def perturbed_model(config, seed: int = 0):
    """The world-size-1 training model with every parameter moved off its init (biases and norms
    are not trivially zero / one, routers not uniform). Needs megatron's parallel state."""
    from mesh_model.model import build_model

    model = build_model(config).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=generator))
    return model


def state_of(model) -> dict[str, torch.Tensor]:
    return {name: param.detach().clone() for name, param in model.named_parameters()}


def write_model_checkpoint(model, config, out: Path, tensor_parallel: int = 1) -> Path:
    """A step-0 checkpoint of `model`'s weights (pretrain/checkpoint format, TP-sharded)."""
    from mesh_hf.import_hf import write_checkpoint

    return write_checkpoint(state_of(model), config, out, tensor_parallel, 1, None, Path("test"))


def training_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """[b, s, V] logits of the training model on [b, s] ids."""
    seq = ids.shape[1]
    positions = torch.arange(seq).unsqueeze(0).expand_as(ids)
    mask = torch.triu(torch.ones(seq, seq, dtype=torch.bool), diagonal=1)[None, None]
    with torch.no_grad():
        return model(ids, positions, mask)


def load_hf(folder: Path, dtype=torch.float32):
    from mesh_hf.loading import load

    return load(folder, dtype)
