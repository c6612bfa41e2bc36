"""Representational collapse (paper Sec. 2): the normalised singular values sigma_i / sigma_0 of a
state's seq x dim matrix. A curve that falls off fast means the tokens' representations span few
directions; the paper plots the top 50 on a log axis, averaged over samples."""

from __future__ import annotations

import torch

TOP = 50


def normalised_singular_values(states: torch.Tensor, top: int = TOP) -> torch.Tensor:
    """[s, b, h] activations -> [b, min(top, s, h)]: sigma_i / sigma_0 per sample (float64)."""
    matrices = states.double().permute(1, 0, 2)  # [b, s, h]: one seq x dim matrix per sample
    sigma = torch.linalg.svdvals(matrices)
    sigma = sigma[:, :top]
    return sigma / sigma[:, :1].clamp_min(torch.finfo(torch.float64).tiny)
