"""The CD math against its definition (autograd), and its stated properties."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hf_cd.cd.colinearity import (
    alignment,
    colinearity_directions,
    colinearity_step,
    converged_power_iteration,
    power_iteration,
)


def _autograd_directions(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradient of ½‖BA‖_F² per factor, divided by the other factor's squared spectral norm."""
    a = a.clone().requires_grad_(True)
    b = b.clone().requires_grad_(True)
    (0.5 * (b @ a).square().sum()).backward()
    return (
        a.grad / torch.linalg.matrix_norm(b.detach(), ord=2) ** 2,
        b.grad / torch.linalg.matrix_norm(a.detach(), ord=2) ** 2,
    )


@pytest.mark.parametrize("shape", [(12, 7, 9), (3, 20, 16), (40, 8, 8)])  # (r, n, m): both product routes
def test_update_equals_scaled_autograd_gradient(shape):
    r, n, m = shape
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(r, n, dtype=torch.float64, generator=generator)
    b = torch.randn(m, r, dtype=torch.float64, generator=generator)
    lr, strength = 1e-3, 5.0
    new_a, new_b = colinearity_step(a, b, lr * strength)
    grad_a, grad_b = _autograd_directions(a, b)
    torch.testing.assert_close(new_a, a - lr * strength * grad_a, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(new_b, b - lr * strength * grad_b, rtol=1e-12, atol=1e-14)


def test_gram_and_product_routes_agree():
    """The two association orders are the same math; the cheaper one is picked by shape."""
    generator = torch.Generator().manual_seed(1)
    a = torch.randn(4, 6, 30, dtype=torch.float64, generator=generator)
    b = torch.randn(4, 25, 6, dtype=torch.float64, generator=generator)
    sigma_a = torch.linalg.matrix_norm(a, ord=2)
    sigma_b = torch.linalg.matrix_norm(b, ord=2)
    direction_a, direction_b, sq_norm = colinearity_directions(a, b, sigma_a, sigma_b)  # gram route (r=6)
    product = b @ a
    torch.testing.assert_close(direction_a, b.transpose(1, 2) @ product / sigma_b.view(-1, 1, 1) ** 2)
    torch.testing.assert_close(direction_b, product @ a.transpose(1, 2) / sigma_a.view(-1, 1, 1) ** 2)
    torch.testing.assert_close(sq_norm, product.square().sum(dim=(1, 2)))


@settings(max_examples=25, deadline=None)
@given(
    scale=st.floats(min_value=0.05, max_value=20.0),
    seed=st.integers(min_value=0, max_value=10_000),
)
def test_rescaling_a_and_b_leaves_the_effect_invariant(scale, seed):
    """A→cA, B→B/c: the step gives cA', B'/c, so the product B·A after the step is unchanged."""
    generator = torch.Generator().manual_seed(seed)
    a = torch.randn(10, 6, dtype=torch.float64, generator=generator)
    b = torch.randn(5, 10, dtype=torch.float64, generator=generator)
    new_a, new_b = colinearity_step(a, b, 0.01)
    scaled_a, scaled_b = colinearity_step(scale * a, b / scale, 0.01)
    torch.testing.assert_close(scaled_a, scale * new_a, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(scaled_b, new_b / scale, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(scaled_b @ scaled_a, new_b @ new_a, rtol=1e-9, atol=1e-12)


def test_most_aligned_direction_decays_at_exactly_the_rate():
    """A row of B along A's top left singular vector shrinks by η·λ, the i-th by η·λ·(s_i/s_1)²,
    and a row outside A's range is untouched."""
    generator = torch.Generator().manual_seed(2)
    u, _, vh = torch.linalg.svd(torch.randn(6, 6, dtype=torch.float64, generator=generator))
    singular = torch.tensor([4.0, 2.0, 1.0, 0.5, 0.25, 0.0], dtype=torch.float64)
    a = u @ torch.diag(singular) @ vh  # rank 5: u[:, 5] lies outside its range
    b = torch.stack([3.0 * u[:, 0], 2.0 * u[:, 1], 5.0 * u[:, 5]])
    rate = 0.01
    _, new_b = colinearity_step(a, b, rate)
    torch.testing.assert_close(new_b[0], (1 - rate) * b[0])
    torch.testing.assert_close(new_b[1], (1 - rate * (singular[1] / singular[0]) ** 2) * b[1])
    torch.testing.assert_close(new_b[2], b[2])


def test_power_iteration_converges_to_the_spectral_norm():
    generator = torch.Generator().manual_seed(3)
    matrices = torch.randn(5, 30, 20, generator=generator)
    sigma, vectors = converged_power_iteration(matrices)
    torch.testing.assert_close(sigma, torch.linalg.matrix_norm(matrices, ord=2), rtol=1e-4, atol=0)
    warm_sigma, change, _ = power_iteration(matrices, vectors, 2)
    torch.testing.assert_close(warm_sigma, sigma, rtol=1e-4, atol=0)
    assert change.max() < 1e-4


def test_alignment_is_one_for_rank_one_and_small_for_orthogonal():
    generator = torch.Generator().manual_seed(4)
    u = torch.nn.functional.normalize(torch.randn(8, generator=generator), dim=0)
    v = torch.randn(5, generator=generator)
    a = torch.outer(u, v).unsqueeze(0)  # rank one, left vector u
    b = torch.outer(torch.randn(3, generator=generator), u).unsqueeze(0)  # rows along u
    assert alignment(a, b).item() == pytest.approx(1.0, rel=1e-5)
    null = torch.linalg.svd(u.unsqueeze(0)).Vh[1:]  # vectors orthogonal to u
    assert alignment(a, null[:3].unsqueeze(0)).item() == pytest.approx(0.0, abs=1e-10)


def _weighted_autograd(a, b, row_weights):
    """Gradient of ½ Σ_k w_k ‖(BA)_k‖² with w held fixed."""
    a = a.clone().requires_grad_(True)
    b = b.clone().requires_grad_(True)
    (0.5 * (row_weights.unsqueeze(1) * (b @ a).square()).sum()).backward()
    return a.grad, b.grad


@pytest.mark.parametrize("shape", [(12, 7, 9), (3, 20, 16)])  # product route, then Gram route
def test_outlier_rows_mode_is_the_gradient_of_the_weighted_product_and_spares_typical_rows(shape):
    r, n, m = shape
    generator = torch.Generator().manual_seed(5)
    a = torch.randn(r, n, dtype=torch.float64, generator=generator)
    b = torch.randn(m, r, dtype=torch.float64, generator=generator) * 0.1
    b[2] *= 40.0  # one output channel with an outlier gain
    b[5] *= 25.0
    sigma_a, sigma_b = torch.linalg.matrix_norm(a, ord=2), torch.linalg.matrix_norm(b, ord=2)
    direction_a, direction_b, sq_norm = colinearity_directions(
        a[None], b[None], sigma_a.reshape(1), sigma_b.reshape(1), mode="outlier_rows", threshold=2.0
    )
    gains = (b @ a).norm(dim=1)
    weights = (gains / (2.0 * gains.median()) - 1).clamp(0, 1)
    assert weights[2] == 1.0 and weights[5] > 0 and (weights > 0).sum() <= 3
    grad_a, grad_b = _weighted_autograd(a, b, weights)
    torch.testing.assert_close(direction_a[0], grad_a / sigma_b**2)
    torch.testing.assert_close(direction_b[0], grad_b / sigma_a**2)
    assert torch.all(direction_b[0][weights == 0] == 0)  # typical rows of B are not touched
    torch.testing.assert_close(sq_norm[0], (b @ a).square().sum())


@pytest.mark.parametrize("shape", [(12, 7, 9), (3, 20, 16)])
def test_balanced_mode_adds_decay_on_overloaded_hidden_units_only(shape):
    r, n, m = shape
    generator = torch.Generator().manual_seed(6)
    a = torch.randn(r, n, dtype=torch.float64, generator=generator)
    b = torch.randn(m, r, dtype=torch.float64, generator=generator)
    a[1] *= 10.0  # hidden unit 1 carries far more than the others
    sigmas = torch.linalg.matrix_norm(a, ord=2).reshape(1), torch.linalg.matrix_norm(b, ord=2).reshape(1)
    plain_a, plain_b, _ = colinearity_directions(a[None], b[None], *sigmas)
    balanced_a, balanced_b, _ = colinearity_directions(
        a[None], b[None], *sigmas, mode="balanced", threshold=2.0
    )
    extra_a, extra_b = balanced_a[0] - plain_a[0], balanced_b[0] - plain_b[0]
    torch.testing.assert_close(extra_a[1], a[1])  # full decay of the overloaded unit's row of A
    torch.testing.assert_close(extra_b[:, 1], b[:, 1])  # and its column of B
    others = [j for j in range(r) if j != 1]
    assert torch.count_nonzero(extra_a[others]) == 0 and torch.count_nonzero(extra_b[:, others]) == 0


def test_unknown_mode_is_rejected():
    a, b = torch.randn(1, 3, 4), torch.randn(1, 5, 3)
    with pytest.raises(ValueError, match="outlier_rows"):
        colinearity_directions(a, b, torch.ones(1), torch.ones(1), mode="gentle")
