"""Centered kernel alignment (Kornblith et al. 2019) between two states of one sample.

For states X, Y (n tokens x d features each) and kernel Gram matrices K = k(X), L = k(Y):

    HSIC(K, L) = tr(K H L H),  H = I - 11^T / n   (the centering)
    CKA(K, L)  = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L))

linear: k(x, x') = <x, x'>.  RBF: k(x, x') = exp(-||x - x'||^2 / (2 sigma^2)) with sigma the
median of the pairwise distances of that state's tokens (the paper's choice, as in Kornblith et
al.), so both kernels are invariant to orthogonal transforms and isotropic scaling of a state.
CKA near 1 between consecutive loop states is the paper's "loop stagnation".
"""

from __future__ import annotations

import torch


def _center(gram: torch.Tensor) -> torch.Tensor:
    """H K H for [..., n, n] Gram matrices."""
    gram = gram - gram.mean(dim=-1, keepdim=True)
    return gram - gram.mean(dim=-2, keepdim=True)


def linear_gram(x: torch.Tensor) -> torch.Tensor:
    """[..., n, d] -> [..., n, n]."""
    x = x.double()
    return x @ x.transpose(-1, -2)


def rbf_gram(x: torch.Tensor) -> torch.Tensor:
    """exp(-d^2 / (2 sigma^2)), sigma = median pairwise distance of each [n, d] matrix (off the diagonal)."""
    return rbf_from_linear(linear_gram(x))


def rbf_from_linear(gram: torch.Tensor) -> torch.Tensor:
    """The RBF Gram matrix from the linear one (d^2 = <x,x> + <x',x'> - 2 <x,x'>): one matmul for both kernels."""
    norms = gram.diagonal(dim1=-2, dim2=-1)
    squared = (norms.unsqueeze(-1) + norms.unsqueeze(-2) - 2 * gram).clamp_min(0)
    n = gram.shape[-1]
    off_diagonal = ~torch.eye(n, dtype=torch.bool, device=gram.device)
    median = squared[..., off_diagonal].median(dim=-1).values  # of d^2, i.e. the median distance squared
    median = median.clamp_min(torch.finfo(torch.float64).tiny)
    return torch.exp(-squared / (2 * median[..., None, None]))


def cka_matrix(grams: list[torch.Tensor]) -> torch.Tensor:
    """Pairwise CKA [S, S] between S Gram matrices of one sample ([n, n] each), or [b, S, S] for
    [b, n, n] Grams (one matrix per sample)."""
    centered = torch.stack([_center(g) for g in grams], dim=-3)  # [..., S, n, n]
    # tr(K_c H L_c H) = sum(K_c * L_c) for centered, symmetric Gram matrices.
    hsic = torch.einsum("...inm,...jnm->...ij", centered, centered)
    diag = hsic.diagonal(dim1=-2, dim2=-1).clamp_min(torch.finfo(torch.float64).tiny)
    return hsic / torch.sqrt(diag.unsqueeze(-1) * diag.unsqueeze(-2))


def cka(x: torch.Tensor, y: torch.Tensor, kernel: str = "linear") -> float:
    """CKA of two [n, d] states (d may differ) with the "linear" or "rbf" kernel."""
    gram = {"linear": linear_gram, "rbf": rbf_gram}[kernel]
    return float(cka_matrix([gram(x), gram(y)])[0, 1])
