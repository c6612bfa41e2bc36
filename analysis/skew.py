"""Computation skew of a block f (paper Sec. 2): how much f changes its input.

    skew(h) = 2 ||f(h) - h||_F / (||f(h)||_F + ||h||_F)

per sample (h: that sequence's seq x dim state). 0 for the identity, 2/3 for a block that doubles
its input, 2 when f(h) = -h; a block that does nearly nothing next to its neighbours is a sign of
loops that stop contributing.
"""

from __future__ import annotations

import torch


def skew(inputs: torch.Tensor, outputs: torch.Tensor) -> torch.Tensor:
    """Per-sample skew of [s, b, h] activations (megatron's layout): a [b] tensor (float64)."""
    h, fh = inputs.double(), outputs.double()
    change = torch.linalg.vector_norm(fh - h, dim=(0, 2))
    scale = torch.linalg.vector_norm(fh, dim=(0, 2)) + torch.linalg.vector_norm(h, dim=(0, 2))
    return 2.0 * change / scale.clamp_min(torch.finfo(torch.float64).tiny)


def mean_std(values: list[float] | torch.Tensor) -> dict:
    """{"mean", "std"} over samples (population std: the spread of these samples)."""
    v = torch.as_tensor(values, dtype=torch.float64).flatten()
    return {"mean": float(v.mean()), "std": float(v.std(unbiased=False)) if v.numel() > 1 else 0.0}
