"""The Colinearity Decay math, as pure functions on batches of matrices.

For a pair ``A`` (r×n, in→hidden) and ``B`` (m×r, hidden→out) with ``M = B·A``, one decoupled
step with rate ``η·λ`` is (the method: ``docs/method.md``)::

    A ← A − η·λ · (Bᵀ·M) / ‖B‖₂²
    B ← B − η·λ · (M·Aᵀ) / ‖A‖₂²

``Bᵀ·M`` and ``M·Aᵀ`` are the gradients of ``½‖B·A‖_F²``; dividing by the *other* factor's
squared spectral norm makes the most aligned direction decay at exactly ``η·λ`` and the step
invariant to ``A→cA, B→B/c``. Everything here takes a leading batch dimension so that all pairs
of one shape go through one batched matrix product.
"""

from __future__ import annotations

import torch

_EPS = 1e-30


POWER_BLOCK_SIZE = 4
"""Columns in the power-iteration block: tracking the top few right singular vectors, not only the
first, keeps the estimate right when two top singular values cross between steps."""


def initial_singular_vectors(
    batch: int,
    size: int,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    block_size: int = POWER_BLOCK_SIZE,
) -> torch.Tensor:
    """Deterministic orthonormal start blocks (P, size, k), the same on every rank (DDP stays bitwise equal)."""
    generator = torch.Generator().manual_seed(0x5EED)
    vectors = torch.randn(batch, size, min(block_size, size), generator=generator, dtype=torch.float64)
    return torch.linalg.qr(vectors).Q.to(device=device, dtype=dtype).contiguous()


def _ritz_sigma(image: torch.Tensor) -> torch.Tensor:
    """Largest singular value of A on the block V, from ``image = A·V`` (P, r, k)."""
    return torch.linalg.eigvalsh(torch.bmm(image.transpose(1, 2), image))[:, -1].clamp_min(0).sqrt()


def power_iteration(
    matrices: torch.Tensor, right_vectors: torch.Tensor, iterations: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Spectral norms of a batch (P, r, n) by block power iteration from orthonormal blocks (P, n, k).

    Each iteration maps the block through ``AᵀA`` and re-orthonormalizes it (QR). The estimate
    for a block is its largest Ritz value ``sqrt(λ_max((AV)ᵀ(AV)))``, a lower bound that converges
    to ``‖A‖₂``; it comes free from the ``A·V`` the iteration computes anyway. Warm-started from
    last step's block, one or two iterations suffice because weights move slowly; a block
    (rather than one vector) absorbs crossings among the top singular values.

    Returns ``(sigma, change, new_block)``: the estimate from the last block fed through, its
    relative change over the last iteration (``inf`` after a single iteration), and the block
    to start from next time.
    """
    if iterations < 1:
        raise ValueError(f"power iteration needs at least one iteration, got {iterations}.")
    block, sigma, previous = right_vectors, None, None
    for _ in range(iterations):
        image = torch.bmm(matrices, block)
        previous, sigma = sigma, _ritz_sigma(image)
        # contiguous: QR returns column-major Q, and a checkpointed block comes back row-major;
        # one layout keeps the bmm summation order, hence resumed runs, bitwise identical.
        block = torch.linalg.qr(torch.bmm(matrices.transpose(1, 2), image)).Q.contiguous()
    if previous is None:
        change = torch.full_like(sigma, float("inf"))
    else:
        change = (sigma - previous).abs() / sigma.clamp_min(_EPS)
    return sigma, change, block


def converged_power_iteration(
    matrices: torch.Tensor,
    right_vectors: torch.Tensor | None = None,
    *,
    rtol: float = 1e-6,
    max_iterations: int = 2000,
    check_every: int = 10,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cold start: iterate until no sigma changes by more than ``rtol`` over an iteration."""
    if right_vectors is None:
        right_vectors = initial_singular_vectors(
            matrices.shape[0], matrices.shape[2], matrices.device, matrices.dtype
        )
    vectors, done = right_vectors, 0
    while True:
        sigma, change, vectors = power_iteration(matrices, vectors, check_every)
        done += check_every
        if done >= max_iterations or bool(change.max() <= rtol):
            return sigma, vectors


def _use_gram_route(r: int, m: int, n: int) -> bool:
    """Through the r×r Grams costs 4r²(m+n) flops, through M = B·A 6·m·r·n: pick the cheaper.

    The Gram route wins for attention heads (r = head_dim ≪ m, n), the M route for FFNs (r = 4n).
    """
    return 2 * r * (m + n) < 3 * m * n


def direction_flops(batch: int, r: int, m: int, n: int) -> int:
    """Matrix-product flops (2 per multiply-add) of `colinearity_directions` on ``batch`` pairs A (r×n), B (m×r).

    Counts the route it takes (`_use_gram_route`); the element-wise terms of the modes are O(size)
    and left out. Used to state CD's arithmetic floor against a training step's.
    """
    if _use_gram_route(r, m, n):
        return batch * 4 * r * r * (m + n)  # A·Aᵀ, B·(A·Aᵀ), Bᵀ·B, (Bᵀ·B)·A
    return batch * 6 * m * r * n  # M = B·A, Bᵀ·M, M·Aᵀ


def power_iteration_flops(
    batch: int, rows: int, cols: int, iterations: int, block_size: int = POWER_BLOCK_SIZE
) -> int:
    """Matrix-product flops of `power_iteration` on ``batch`` matrices (rows×cols): A·V, Aᵀ·(A·V), the k×k Gram.

    The QR and the k×k eigenvalue problem (k = the block size) are O(cols·k²) and left out.
    """
    k = min(block_size, cols)
    return batch * iterations * (4 * rows * cols * k + 2 * rows * k * k)


CD_MODES: tuple[str, ...] = ("plain", "outlier_rows", "balanced")

CD_RATE_SCHEDULES: tuple[str, ...] = ("follow_lr", "peak_lr")
"""How the per-step rate follows the learning-rate schedule: ``follow_lr`` (η_t·λ, the method) or
``peak_lr`` (η_peak·λ every step: a fixed decay budget per step that does not fade as the lr anneals)."""

CD_FACTORS: tuple[str, ...] = ("both", "in", "out")
"""Which factor of each pair the step writes: both (the method), only A (the in side), or only B.

``in`` leaves the output matrix (fc2, o_proj) untouched: on the real DINOv2-S, plain CD's B-side
step lowered fc2's output-to-rounding-noise ratio at 4 bits (``bench/results/efficacy-diagnosis.md``).
"""


def _relative_excess(values: torch.Tensor, threshold: float) -> torch.Tensor:
    """``clamp(v / (θ·median v) − 1, 0, 1)`` per batch entry: 0 up to θ× the typical value, 1 from 2θ×."""
    typical = values.median(dim=1, keepdim=True).values.clamp_min(_EPS)
    return (values / (threshold * typical) - 1.0).clamp(0.0, 1.0)


def colinearity_directions(
    a: torch.Tensor,
    b: torch.Tensor,
    sigma_a: torch.Tensor,
    sigma_b: torch.Tensor,
    mode: str = "plain",
    threshold: float = 2.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The per-factor CD directions and ``‖B·A‖_F²`` for batches A (P, r, n), B (P, m, r).

    The step is ``−η·λ`` times each direction. ``mode`` chooses what counts as *detrimental*
    alignment (``M = B·A``, ``m_k`` its k-th row, ``g_k = ‖m_k‖`` the gain of output channel k,
    ``a_j`` / ``b_j`` the j-th row of A / column of B, θ = ``threshold``)::

        plain:         D_A = Bᵀ·M / ‖B‖₂²                  D_B = M·Aᵀ / ‖A‖₂²
        outlier_rows:  D_A = Bᵀ·W·M / ‖B‖₂²                D_B = W·M·Aᵀ / ‖A‖₂²
                       W = diag(w),  w_k = clamp(g_k / (θ·median g) − 1, 0, 1)
        balanced:      D_A = plain D_A + U·A               D_B = plain D_B + B·U
                       U = diag(u),  u_j = clamp(t_j / (θ·median t) − 1, 0, 1),  t_j = ‖a_j‖·‖b_j‖

    ``outlier_rows`` is the gradient of ``½ Σ_k w_k ‖m_k‖²`` with w held fixed: only output channels
    whose gain is well above the typical one decay (TWEO's mechanism, in weight space), the worst at
    the full rate. ``balanced`` adds a weight decay restricted to hidden units that carry far more
    than the typical unit, so plain CD cannot pile the mass into a few of them (the post-GELU
    outliers of fc2's input in the spec's regime B). Both leave typical rows and units alone.
    """
    if mode not in CD_MODES:
        raise ValueError(f"Unknown CD mode {mode!r}; choose from {', '.join(CD_MODES)}.")
    r, n = a.shape[1:]
    m = b.shape[1]
    inv_sq_a = (1.0 / sigma_a.square().clamp_min(_EPS)).view(-1, 1, 1)
    inv_sq_b = (1.0 / sigma_b.square().clamp_min(_EPS)).view(-1, 1, 1)
    if _use_gram_route(r, m, n):
        gram_a = torch.bmm(a, a.transpose(1, 2))  # A·Aᵀ (P, r, r)
        b_gram_a = torch.bmm(b, gram_a)  # B·A·Aᵀ = M·Aᵀ (P, m, r)
        row_sq_gains = (b_gram_a * b).sum(dim=2)  # ‖m_k‖² = b_kᵀ·A·Aᵀ·b_k
        product_sq_norm = row_sq_gains.sum(dim=1)
        if mode == "outlier_rows":
            weights = _relative_excess(row_sq_gains.clamp_min(0).sqrt(), threshold).unsqueeze(2)
            gram_b = torch.bmm((b * weights).transpose(1, 2), b)  # Bᵀ·W·B
            direction_b = b_gram_a * (weights * inv_sq_a)
        else:
            gram_b = torch.bmm(b.transpose(1, 2), b)  # Bᵀ·B (P, r, r)
            direction_b = b_gram_a * inv_sq_a
        # scale the small r×r factor, not the large result: one fewer pass over r×n
        direction_a = torch.bmm(gram_b * inv_sq_b, a)
    else:
        product = torch.bmm(b, a)  # M (P, m, n)
        product_sq_norm = product.square().sum(dim=(1, 2))
        if mode == "outlier_rows":
            weights = _relative_excess(product.norm(dim=2), threshold).unsqueeze(2)
            product = product * weights
        direction_a = torch.bmm(b.transpose(1, 2), product * inv_sq_b)  # M is m×n, smaller than r×n
        direction_b = torch.bmm(product * inv_sq_a, a.transpose(1, 2))
    if mode == "balanced":
        throughput = a.norm(dim=2) * b.norm(dim=1)  # (P, r): ‖a_j‖·‖b_j‖ per hidden unit
        unit_weights = _relative_excess(throughput, threshold)
        direction_a = direction_a + unit_weights.unsqueeze(2) * a
        direction_b = direction_b + b * unit_weights.unsqueeze(1)
    return direction_a, direction_b, product_sq_norm


def normalized_alignment(
    b_sq_frobenius: torch.Tensor, sigma_a: torch.Tensor, product_sq_norm: torch.Tensor
) -> torch.Tensor:
    """``‖B·A‖_F² / (‖B‖_F²·‖A‖₂²)``: 1 when every row of B lies along A's top direction, ~0 when none do."""
    return product_sq_norm / (b_sq_frobenius * sigma_a.square()).clamp_min(_EPS)


def alignment(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact normalized alignment of batches A (P, r, n), B (P, m, r) (diagnostics, not the hot path)."""
    a, b = a.float(), b.float()
    sigma_a = torch.linalg.matrix_norm(a, ord=2)
    product_sq_norm = torch.bmm(b, a).square().sum(dim=(1, 2))
    return normalized_alignment(b.square().sum(dim=(1, 2)), sigma_a, product_sq_norm)


def colinearity_step(a: torch.Tensor, b: torch.Tensor, rate: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One exact CD step on a single pair (exact spectral norms): the reference for the batched path."""
    sigma_a = torch.linalg.matrix_norm(a, ord=2).reshape(1)
    sigma_b = torch.linalg.matrix_norm(b, ord=2).reshape(1)
    direction_a, direction_b, _ = colinearity_directions(a.unsqueeze(0), b.unsqueeze(0), sigma_a, sigma_b)
    return a - rate * direction_a[0], b - rate * direction_b[0]
