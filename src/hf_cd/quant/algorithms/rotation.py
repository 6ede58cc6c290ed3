"""The math of rotation-based PTQ, as pure functions on tensors: Hadamard matrices and the folds.

Why rotations help: a per-tensor (or per-token) quantizer pays for its largest channel. An
orthogonal ``Q`` spreads an outlier channel over all channels (a Hadamard row has every entry
``±1/√n``), so ``x Q`` has a far smaller max/std than ``x``, while ``(x Q)(W Q)ᵀ = x Wᵀ`` keeps the
function. To rotate the residual stream of a pre-norm transformer, LayerNorm has to commute with
``Q`` first (SliceGPT, QuaRot): fold γ and β into the linears that read the norm, make every writer
of the residual stream produce zero-mean vectors (so LayerNorm's mean subtraction is a no-op and
it is an RMSNorm, which commutes with any orthogonal ``Q``), and fold DINOv2's layer scale into the
writers.

Hadamard matrices of orders that are not powers of two (what we do, and why it is exact): an
order ``n = m · 2^k`` has the Hadamard matrix ``H_m ⊗ H_{2^k}`` whenever ``H_m`` exists. ``H_{2^k}`` is
Sylvester's; ``H_m`` comes from Paley's first construction, which gives order ``q + 1`` for every
prime ``q ≡ 3 (mod 4)`` (4, 8, 12, 20, 24, 32, 44, 48, 60, …). So 384 = 12 · 2^5 and 1536 = 12 · 2^7
(and 192, 768, 1024, 1280, 3072, 4096, 5120: every ViT / DeiT / DINOv2 width and MLP width) get a
true Hadamard matrix. `hadamard_transform` applies it fast: a Walsh–Hadamard butterfly on the
``2^k`` factor (``n log n``) and a dense ``m × m`` product on the other. An order with no such
factorization (e.g. 6, 10) gets a seeded random orthogonal matrix instead (`random_orthogonal`),
which is orthogonal but spreads outliers only in expectation; `rotation_matrix` says which it used.
"""

from __future__ import annotations

import math
from functools import cache

import torch

# --------------------------------------------------------------------------------------------------
# Hadamard matrices


def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % d for d in range(2, math.isqrt(q) + 1))


@cache
def paley_hadamard(q: int) -> torch.Tensor:
    """The ±1 Hadamard matrix of order ``q + 1`` by Paley's first construction (``q`` prime, ``q ≡ 3 mod 4``).

    With χ the quadratic character mod q and the Jacobsthal matrix ``J[i, j] = χ(j − i)``,
    ``H = I + [[0, 1ᵀ], [−1, J]]``; then ``H Hᵀ = (q + 1) I``.
    """
    if not (_is_prime(q) and q % 4 == 3):
        raise ValueError(f"Paley's first construction needs a prime q ≡ 3 (mod 4), got q={q}.")
    residues = {(i * i) % q for i in range(1, q)}
    chi = [0] + [1 if a in residues else -1 for a in range(1, q)]
    n = q + 1
    h = torch.zeros(n, n, dtype=torch.float64)
    h[0, 1:] = 1.0
    h[1:, 0] = -1.0
    for i in range(q):
        for j in range(q):
            h[1 + i, 1 + j] = chi[(j - i) % q]
    return h + torch.eye(n, dtype=torch.float64)


def sylvester_hadamard(n: int) -> torch.Tensor:
    """The ±1 Hadamard matrix of order ``n = 2^k`` (Sylvester: ``H_2n = [[H, H], [H, −H]]``), float64."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"Sylvester's construction needs a power of two, got {n}.")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def hadamard_factors(n: int) -> tuple[int, int] | None:
    """``(m, 2^k)`` with ``n = m · 2^k`` and a known Hadamard matrix of order ``m`` (1 or Paley), or ``None``.

    The largest power of two is split off first; ``m`` may itself be a Paley order times a power of
    two (e.g. 12 · 2 = 24 is tried as Paley 24 = 23 + 1 before 12 ⊗ 2 is needed).
    """
    if n < 1:
        return None
    power = n & -n
    odd = n // power
    if odd == 1:
        return 1, n
    m, rest = odd, power
    while True:  # smallest m = odd · 2^j that is a Paley order
        if _is_prime(m - 1) and (m - 1) % 4 == 3:
            return m, rest
        if rest == 1:
            return None
        m, rest = m * 2, rest // 2


def has_hadamard(n: int) -> bool:
    """Whether `hadamard_matrix` can build order ``n`` exactly (else `rotation_matrix` falls back)."""
    return hadamard_factors(n) is not None


def hadamard_matrix(n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The orthogonal Hadamard matrix ``(H_m ⊗ H_{2^k}) / √n`` of order ``n`` (see the module docstring)."""
    factors = hadamard_factors(n)
    if factors is None:
        raise ValueError(
            f"No Hadamard matrix of order {n} is known to hf_cd (n must be 2^k times a Paley order q + 1, "
            "q prime ≡ 3 mod 4); use rotation_matrix(n, ...), which falls back to a random orthogonal matrix."
        )
    m, power = factors
    small = torch.ones(1, 1, dtype=torch.float64) if m == 1 else paley_hadamard(m - 1)
    return (torch.kron(small, sylvester_hadamard(power)) / math.sqrt(n)).to(dtype)


def walsh_hadamard_transform(x: torch.Tensor) -> torch.Tensor:
    """``x @ H_{2^k} / √(2^k)`` over the last dimension by the butterfly (``n log n``), ``n = 2^k``."""
    n = x.shape[-1]
    if n & (n - 1):
        raise ValueError(f"The Walsh–Hadamard transform needs a power-of-two size, got {n}.")
    shape = x.shape
    y = x.reshape(-1, n)
    h = 1
    while h < n:
        y = y.view(-1, n // (2 * h), 2, h)
        y = torch.stack((y[:, :, 0] + y[:, :, 1], y[:, :, 0] - y[:, :, 1]), dim=2)
        h *= 2
    return (y.reshape(shape) / math.sqrt(n)).to(x.dtype)


def hadamard_transform(x: torch.Tensor) -> torch.Tensor:
    """``x @ hadamard_matrix(n)`` over the last dimension, fast: butterfly on ``2^k``, dense ``m × m`` on the rest."""
    n = x.shape[-1]
    factors = hadamard_factors(n)
    if factors is None:
        raise ValueError(f"No Hadamard matrix of order {n}; see hadamard_matrix.")
    m, power = factors
    y = walsh_hadamard_transform(x.reshape(*x.shape[:-1], m, power))
    if m > 1:
        small = (paley_hadamard(m - 1) / math.sqrt(m)).to(device=x.device, dtype=y.dtype)
        y = torch.einsum("...ij,ik->...kj", y, small)
    return y.reshape(x.shape)


def random_orthogonal(n: int, generator: torch.Generator) -> torch.Tensor:
    """A Haar-random orthogonal matrix (QR of a Gaussian, signs fixed), float64: the fallback for odd orders."""
    q, r = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r)).unsqueeze(0)


def random_signs(n: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` random ±1 (float64)."""
    return torch.randint(0, 2, (n,), generator=generator).to(torch.float64) * 2 - 1


def rotation_matrix(n: int, seed: int, randomized: bool = True) -> tuple[torch.Tensor, str]:
    """An orthogonal ``n × n`` rotation (float64) and what it is.

    ``diag(s) · H`` with random signs ``s`` (a randomized Hadamard, as QuaRot fuses offline) when
    ``randomized`` and a Hadamard of order ``n`` exists; the plain ``H`` when not randomized; a random
    orthogonal matrix when no Hadamard of order ``n`` is known.
    """
    generator = torch.Generator().manual_seed(seed)
    if not has_hadamard(n):
        return random_orthogonal(n, generator), "random_orthogonal"
    h = hadamard_matrix(n)
    if not randomized:
        return h, "hadamard"
    return random_signs(n, generator).unsqueeze(1) * h, "randomized_hadamard"


# --------------------------------------------------------------------------------------------------
# Folds. Convention: a linear is y = x Wᵀ + b with W of shape (out, in); the residual stream holds
# row vectors h, rotated as h Q.


def fold_norm_affine(
    weight: torch.Tensor, bias: torch.Tensor | None, gamma: torch.Tensor, beta: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """A linear reading ``n γ + β`` rewritten to read ``n``: ``(W diag(γ), b + W β)``."""
    new_bias = torch.zeros(weight.shape[0], dtype=weight.dtype) if bias is None else bias.clone()
    if beta is not None:
        new_bias = new_bias + weight @ beta.to(weight.dtype)
    return weight * gamma.to(weight.dtype), new_bias


def scale_rows(
    weight: torch.Tensor, bias: torch.Tensor | None, scale: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A writer followed by ``⊙ λ`` (layer scale) as one writer: rows and bias times ``λ``."""
    shape = (-1,) + (1,) * (weight.ndim - 1)
    scale = scale.to(weight.dtype)
    return weight * scale.view(shape), None if bias is None else bias * scale


def centre_rows(weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A writer of the residual stream made to write zero-mean vectors: subtract the mean over outputs.

    ``(I − 11ᵀ/d) (W x + b)``: the output's mean is removed for every input, which LayerNorm would
    remove anyway, so after this LayerNorm equals RMSNorm on the residual stream.
    """
    return weight - weight.mean(dim=0, keepdim=True), None if bias is None else bias - bias.mean()


def centre_vectors(vectors: torch.Tensor) -> torch.Tensor:
    """Learned residual-stream vectors (CLS / register tokens, position embeddings), zero-mean over channels."""
    return vectors - vectors.mean(dim=-1, keepdim=True)


def rotate_writer(
    weight: torch.Tensor, bias: torch.Tensor | None, rotation: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A writer whose output ``y`` becomes ``y Q``: rows mixed by ``Qᵀ`` (any trailing weight dims, e.g. conv)."""
    rotated = torch.einsum("c...,cd->d...", weight, rotation.to(weight.dtype))
    return rotated, None if bias is None else bias @ rotation.to(bias.dtype)


def rotate_reader(weight: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """A reader of ``x`` rewritten to read ``x Q``: ``W Q`` (bias unchanged)."""
    return weight @ rotation.to(weight.dtype)


def block_diagonal(rotation: torch.Tensor, repeats: int) -> torch.Tensor:
    """``diag(R, R, …, R)``: one rotation per attention head."""
    return torch.block_diag(*([rotation] * repeats))
