"""The paper's formulas (analysis/skew.py, cka.py, spectrum.py) on hand-made matrices."""

from __future__ import annotations

import pytest
import torch

from analysis.cka import cka, cka_matrix, linear_gram, rbf_gram
from analysis.skew import mean_std, skew
from analysis.spectrum import normalised_singular_values

KERNELS = ("linear", "rbf")


def random_state(n: int = 40, d: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def random_orthogonal(d: int, seed: int = 1) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q


@pytest.mark.parametrize("kernel", KERNELS)
def test_cka_of_a_state_with_itself_is_one(kernel):
    x = random_state()
    assert cka(x, x, kernel) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("kernel", KERNELS)
def test_cka_is_invariant_to_orthogonal_transforms_and_isotropic_scaling(kernel):
    x, y = random_state(seed=0), torch.tanh(random_state(seed=0) @ random_state(12, 12, seed=5))
    reference = cka(x, y, kernel)
    assert 0.05 < reference < 0.99  # related, not identical: the invariances are tested on a real value
    q = random_orthogonal(12)
    assert cka(x @ q, y, kernel) == pytest.approx(reference, rel=1e-10)
    assert cka(x, 3.7 * y, kernel) == pytest.approx(reference, rel=1e-10)
    assert cka(0.01 * x @ q, 50.0 * y @ random_orthogonal(12, seed=9), kernel) == pytest.approx(reference, rel=1e-10)
    assert cka(x @ q, x, kernel) == pytest.approx(1.0, abs=1e-10)


@pytest.mark.parametrize("kernel", KERNELS)
def test_cka_of_independent_states_is_far_below_one(kernel):
    assert cka(random_state(200, 8, seed=0), random_state(200, 8, seed=1), kernel) < 0.2


def test_linear_cka_matches_the_feature_space_formula():
    """||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F) on column-centred X, Y (Kornblith et al., eq. 5)."""
    x, y = random_state(30, 6, seed=2), random_state(30, 9, seed=3) + random_state(30, 9, seed=2)[:, :1]
    xc, yc = x - x.mean(0), y - y.mean(0)
    expected = (yc.T @ xc).norm() ** 2 / ((xc.T @ xc).norm() * (yc.T @ yc).norm())
    assert cka(x, y, "linear") == pytest.approx(float(expected), rel=1e-10)


def test_rbf_gram_uses_the_median_distance_as_bandwidth():
    x = torch.tensor([[0.0], [1.0], [3.0]], dtype=torch.float64)  # distances 1, 2, 3: median 2
    gram = rbf_gram(x)
    assert float(gram[0, 1]) == pytest.approx(torch.exp(torch.tensor(-1.0 / 8)).item())
    assert float(gram[0, 2]) == pytest.approx(torch.exp(torch.tensor(-9.0 / 8)).item())
    assert torch.allclose(gram.diagonal(), torch.ones(3, dtype=torch.float64))


def test_cka_matrix_is_symmetric_with_a_unit_diagonal():
    states = [random_state(seed=s) for s in range(3)]
    matrix = cka_matrix([linear_gram(x) for x in states])
    assert torch.allclose(matrix, matrix.T)
    assert torch.allclose(matrix.diagonal(), torch.ones(3, dtype=torch.float64))


def test_skew_of_the_identity_is_zero_and_of_a_doubling_block_two_thirds():
    h = torch.randn(16, 3, 8, generator=torch.Generator().manual_seed(0))  # [s, b, h]: 3 samples
    assert torch.equal(skew(h, h), torch.zeros(3, dtype=torch.float64))
    assert torch.allclose(skew(h, 2 * h), torch.full((3,), 2 / 3, dtype=torch.float64))
    assert torch.allclose(skew(h, -h), torch.full((3,), 2.0, dtype=torch.float64))


def test_skew_is_per_sample():
    h = torch.ones(4, 2, 3)
    out = h.clone()
    out[:, 1] *= 2  # only sample 1 changes
    assert skew(h, out).tolist() == pytest.approx([0.0, 2 / 3])
    assert mean_std([0.0, 2 / 3]) == pytest.approx({"mean": 1 / 3, "std": 1 / 3})


def test_singular_values_of_a_rank_k_matrix_drop_to_zero_after_k():
    generator = torch.Generator().manual_seed(0)
    k, s, h = 3, 20, 10
    samples = [torch.randn(s, k, generator=generator) @ torch.randn(k, h, generator=generator) for _ in range(2)]
    states = torch.stack(samples, dim=1)  # [s, b, h]
    curves = normalised_singular_values(states)
    assert curves.shape == (2, 10)
    assert torch.allclose(curves[:, 0], torch.ones(2, dtype=torch.float64))
    assert (curves[:, 1:k] > 1e-3).all()
    assert (curves[:, k:] < 1e-6).all()


def test_singular_values_keep_the_top_fifty():
    states = torch.randn(80, 1, 64, generator=torch.Generator().manual_seed(0))
    curve = normalised_singular_values(states)[0]
    assert curve.shape == (50,)
    assert (curve[1:] <= curve[:-1]).all() and curve[0] == 1.0
