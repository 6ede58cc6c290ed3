"""GPTQ (Frantar et al., ICLR 2023) as pure functions: input statistics, weight grid, and the solver.

GPTQ quantizes a linear layer's weight one input column at a time and, after each column, moves the
columns not yet quantized to cancel the output error that column's rounding caused, as measured on
the layer's calibration inputs ``X``. With ``H = 2/n · Σ x xᵀ`` (the Hessian of the squared output
error) and ``U`` the upper Cholesky factor of ``H⁻¹``, quantizing column ``i`` of a row ``w`` gives::

    q_i = quant(w_i),   e_i = (w_i − q_i) / U_ii,   w_j ← w_j − e_i · U_ij   for j > i

Lazy batches (``block_size`` columns) apply the updates of a block to the later columns in one matrix
product, which is algebraically the same. ``H`` is damped by ``percdamp · mean(diag H)`` so its
Cholesky factor exists; ``act_order`` quantizes the columns with the largest ``H_ii`` first.

The grid is the library's weight format (`hf_cd.quant.algorithms.quantizers`): narrow-range symmetric, one scale
per output channel (or per group of ``group_size`` input columns), each scale's clipping ratio chosen
by least squared weight error, computed once on the float weight (static groups).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from hf_cd.quant.algorithms.quantizers import fake_quantize_symmetric, quantization_mse, symmetric_scale

Correction = Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]
"""``correction(upper, permutation) -> P``: GPTAQ's residual term, built once the factor is known."""


class HessianNotPositiveDefiniteError(ValueError):
    """The damped Hessian of a layer has no Cholesky factor; the message says how much damping to add."""


@dataclass(frozen=True)
class SolverSettings:
    """How GPTQ solves one layer (the same for every layer of a run)."""

    percdamp: float = 0.01
    """Damping added to the Hessian's diagonal, as a fraction of its mean diagonal."""
    block_size: int = 128
    """Columns per lazy batch update."""
    act_order: bool = False
    """Quantize columns in order of decreasing ``H_ii`` (the most salient inputs first)."""
    dtype: torch.dtype = torch.float64
    """Arithmetic of the solver and of the statistics; float64 keeps ill-conditioned layers stable."""

    def __post_init__(self) -> None:
        if not self.percdamp >= 0:
            raise ValueError(f"percdamp must be ≥ 0 (typically 0.01), got {self.percdamp!r}.")
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size < 1:
            raise ValueError(f"block_size must be a positive int (typically 128), got {self.block_size!r}.")
        if self.dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype must be torch.float32 or torch.float64, got {self.dtype}.")


DEFAULT_SOLVER_SETTINGS = SolverSettings()


# --- input statistics -------------------------------------------------------------------------------


class InputStatistics:
    """Running sums over a layer's calibration inputs, for the Hessian, GPTAQ's residual and the errors.

    ``x_q`` is the input the layer gets in the partially quantized model (rows are tokens); ``x_fp``
    the input of the same layer in the float model, for the same images (optional: GPTQ needs only
    ``x_q``). Sums, not means, are kept (in ``dtype``) and scaled by ``2/n`` on the way out::

        hessian  = 2/n Σ x_q x_qᵀ          residual = 2/n Σ (x_fp − x_q) x_qᵀ        (dXXᵀ)
        Σ (x_fp − x_q)(x_fp − x_q)ᵀ        (only for the reconstruction error)
    """

    def __init__(self, features: int, device: torch.device, dtype: torch.dtype, with_reference: bool):
        self.features = features
        self.count = 0
        self.with_reference = with_reference
        zeros = lambda: torch.zeros(features, features, device=device, dtype=dtype)  # noqa: E731
        self.xq_xq = zeros()
        self.dx_xq = zeros() if with_reference else None
        self.dx_dx = zeros() if with_reference else None

    @torch.no_grad()
    def add(self, x_q: torch.Tensor, x_fp: torch.Tensor | None = None) -> None:
        """Add a batch of inputs, any leading shape (``…, features``)."""
        x_q = x_q.reshape(-1, self.features).to(self.xq_xq.dtype)
        if not torch.isfinite(x_q).all():
            raise ValueError("A calibration input of this layer holds NaN or Inf; check the model and data.")
        self.xq_xq.addmm_(x_q.T, x_q)
        if self.with_reference:
            if x_fp is None:
                raise ValueError("These statistics track the float input too: pass x_fp with x_q.")
            dx = x_fp.reshape(-1, self.features).to(x_q.dtype) - x_q
            if dx.shape != x_q.shape:
                raise ValueError(
                    f"The float input has {dx.shape[0]} rows but the quantized one {x_q.shape[0]}."
                )
            self.dx_xq.addmm_(dx.T, x_q)
            self.dx_dx.addmm_(dx.T, dx)
        self.count += x_q.shape[0]

    def merged(self, other: InputStatistics) -> InputStatistics:
        """The statistics of both sets of inputs together (e.g. a fit split and a held-out split)."""
        if other.features != self.features or other.with_reference != self.with_reference:
            raise ValueError("Only statistics of the same layer (features, reference or not) can be merged.")
        both = InputStatistics.__new__(InputStatistics)
        both.features, both.with_reference = self.features, self.with_reference
        both.count = self.count + other.count
        both.xq_xq = self.xq_xq + other.xq_xq
        both.dx_xq = None if self.dx_xq is None else self.dx_xq + other.dx_xq
        both.dx_dx = None if self.dx_dx is None else self.dx_dx + other.dx_dx
        return both

    def _scaled(self, total: torch.Tensor) -> torch.Tensor:
        if self.count == 0:
            raise ValueError("No calibration inputs were added to these statistics.")
        return total * (2.0 / self.count)

    @property
    def hessian(self) -> torch.Tensor:
        """``H = 2/n Σ x_q x_qᵀ``."""
        return self._scaled(self.xq_xq)

    @property
    def residual(self) -> torch.Tensor:
        """GPTAQ's ``dXXᵀ = 2/n Σ (x_fp − x_q) x_qᵀ`` (zero without a reference)."""
        if not self.with_reference:
            return torch.zeros_like(self.xq_xq)
        return self._scaled(self.dx_xq)


@torch.no_grad()
def relative_reconstruction_error(
    weight: torch.Tensor, quantized: torch.Tensor, statistics: InputStatistics
) -> float:
    """``‖W_q X_q − W X_fp‖_F / ‖W X_fp‖_F`` over the calibration inputs, from the statistics alone.

    Written as ``(W_q − W) X_q − W ΔX`` (``ΔX = X_fp − X_q``) so the large ``W X`` terms never
    cancel; without a reference ``X_fp = X_q`` (GPTQ's own objective). Biases cancel and are left out.
    """
    dtype = statistics.xq_xq.dtype
    w = weight.detach().reshape(weight.shape[0], -1).to(dtype)
    delta = quantized.detach().reshape(w.shape).to(dtype) - w
    xq_xq = statistics.xq_xq
    error = ((delta @ xq_xq) * delta).sum()
    output = ((w @ xq_xq) * w).sum()
    if statistics.with_reference:
        w_dx_xq = w @ statistics.dx_xq  # rows of W ΔX X_qᵀ
        w_dx_dx = ((w @ statistics.dx_dx) * w).sum()
        error = error - 2.0 * (w_dx_xq * delta).sum() + w_dx_dx
        output = output + 2.0 * (w_dx_xq * w).sum() + w_dx_dx
    if output <= 0:
        return 0.0 if error <= 0 else float("inf")
    return float(error.clamp(min=0.0).sqrt() / output.sqrt())


# --- the weight grid ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class WeightGrid:
    """Symmetric ``bits``-bit scales of a ``rows × columns`` weight: one per row and group of columns."""

    bits: int
    scales: torch.Tensor
    """``rows × groups``, float32."""
    group_size: int
    """Input columns per scale (all of them: per output channel)."""

    def column_scale(self, column: int) -> torch.Tensor:
        return self.scales[:, column // self.group_size]

    def quantize_column(self, values: torch.Tensor, column: int) -> torch.Tensor:
        """Fake-quantize column ``column`` (its ``rows`` values) onto its scales."""
        return fake_quantize_symmetric(values, self.column_scale(column).to(values.dtype), self.bits)

    def quantize(self, weight: torch.Tensor) -> torch.Tensor:
        """Round every column to nearest (RTN) on this grid, in ``weight``'s dtype."""
        columns = weight.shape[1]
        scales = self.scales.repeat_interleave(self.group_size, dim=1)[:, :columns]
        return fake_quantize_symmetric(weight, scales.to(weight.dtype), self.bits)


def weight_grid(
    weight: torch.Tensor, bits: int, group_size: int | None = None, clip_ratios: Sequence[float] = (1.0,)
) -> WeightGrid:
    """Per-row (``group_size=None``) or per-group scales, each clipping ratio of least squared error.

    The same search as `quantize_weight_symmetric` (so per-channel RTN on this grid equals the
    ``percentile`` pipeline's weights): clipping a few large weights buys finer steps for the rest.
    """
    rows = weight.detach().reshape(weight.shape[0], -1).float()
    columns = rows.shape[1]
    size = columns if group_size is None else int(group_size)
    if size < 1:
        raise ValueError(f"group_size must be a positive int or None (per channel), got {group_size!r}.")
    size = min(size, columns)
    groups = -(-columns // size)
    padded = torch.nn.functional.pad(rows, (0, groups * size - columns))  # zeros never raise absmax
    blocks = padded.reshape(rows.shape[0], groups, size)
    absmax = blocks.abs().amax(dim=2)  # rows × groups
    ratios = torch.tensor([float(r) for r in clip_ratios], device=rows.device)
    chunk = max(1, 2**24 // max(blocks.numel(), 1))
    best_error = best_scale = None
    for start in range(0, ratios.numel(), chunk):
        scales = symmetric_scale(absmax.unsqueeze(0) * ratios[start : start + chunk].view(-1, 1, 1), bits)
        candidates = blocks.unsqueeze(0)
        errors = quantization_mse(
            candidates, fake_quantize_symmetric(candidates, scales.unsqueeze(-1), bits), dim=3
        )
        error, index = errors.min(dim=0)
        scale = scales.gather(0, index.unsqueeze(0)).squeeze(0)
        if best_error is None:
            best_error, best_scale = error, scale
        else:
            better = error < best_error
            best_error = torch.where(better, error, best_error)
            best_scale = torch.where(better, scale, best_scale)
    return WeightGrid(bits=bits, scales=best_scale, group_size=size)


# --- the solver --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HessianFactor:
    """What the column loop needs from ``H``: the column order and ``U`` with ``H⁻¹ = Uᵀ U``."""

    upper: torch.Tensor
    permutation: torch.Tensor | None
    """Column order (``act_order``), or ``None`` for the natural order."""


def factor_hessian(
    hessian: torch.Tensor, settings: SolverSettings, name: str = "this layer"
) -> HessianFactor:
    """Damp ``H``, order its columns, and return the upper Cholesky factor of its inverse.

    Columns whose input is always zero get ``H_ii = 1`` (their weight then moves nothing else).
    """
    h = hessian.detach().to(settings.dtype).clone()
    if not torch.isfinite(h).all():
        raise ValueError(f"The Hessian of {name} holds NaN or Inf: the calibration inputs are not finite.")
    diagonal = torch.diagonal(h)
    dead = diagonal == 0
    diagonal[dead] = 1.0
    permutation = None
    if settings.act_order:
        permutation = torch.argsort(diagonal, descending=True, stable=True)
        h = h[permutation][:, permutation]
        diagonal = torch.diagonal(h)
    damp = settings.percdamp * diagonal.mean()
    diagonal += damp
    lower, info = torch.linalg.cholesky_ex(h)
    if info.item() == 0:
        inverse = torch.cholesky_inverse(lower)
        upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
    if info.item() != 0:
        raise HessianNotPositiveDefiniteError(
            f"The Hessian of {name} ({h.shape[0]} input features) is not positive definite even after adding "
            f"{float(damp):.3g} (percdamp={settings.percdamp}) to its diagonal. Raise the damping, e.g. "
            "GPTQConfig(damp=0.1) (spec option gptq_damp=0.1), use more calibration images, or "
            "precision='float64' (gptq_precision=float64)."
        )
    return HessianFactor(upper=upper, permutation=permutation)


def solve_columns(
    weight: torch.Tensor,
    upper: torch.Tensor,
    quantize_column: Callable[[torch.Tensor, int], torch.Tensor],
    block_size: int,
    correction: torch.Tensor | None = None,
) -> torch.Tensor:
    """The GPTQ column loop on ``weight`` (already in the factor's column order); returns ``Q``.

    ``correction`` is GPTAQ's ``P`` (strictly upper triangular): the update after column ``i`` becomes
    ``w_j ← w_j − e_i U_ij + w_i P_ij``, with ``w_i`` the column's value just before it is rounded.
    The lazy part uses those same values, so the result does not depend on ``block_size``.
    """
    w = weight.clone()
    columns = w.shape[1]
    quantized = torch.zeros_like(w)
    for start in range(0, columns, block_size):
        end = min(start + block_size, columns)
        block = w[:, start:end].clone()
        errors = torch.zeros_like(block)
        before = torch.zeros_like(block) if correction is not None else None
        upper_block = upper[start:end, start:end]
        for i in range(end - start):
            column = block[:, i].clone()
            q = quantize_column(column, start + i)
            quantized[:, start + i] = q
            error = (column - q) / upper_block[i, i]
            update = error.unsqueeze(1) * upper_block[i, i:].unsqueeze(0)
            if correction is not None:
                update = update - column.unsqueeze(1) * correction[start + i, start + i : end].unsqueeze(0)
                before[:, i] = column
            block[:, i:] -= update
            errors[:, i] = error
        if end < columns:
            lazy = errors @ upper[start:end, end:]
            if correction is not None:
                lazy = lazy - before @ correction[start:end, end:]
            w[:, end:] -= lazy
    return quantized


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    grid: WeightGrid,
    settings: SolverSettings = DEFAULT_SOLVER_SETTINGS,
    correction: Correction | None = None,
    name: str = "this layer",
) -> torch.Tensor:
    """GPTQ-quantize ``weight`` (``rows × columns``) on ``grid`` for inputs with Hessian ``hessian``.

    Returns the fake-quantized weight in ``weight``'s shape and dtype; every value lies on ``grid``.
    ``correction`` (GPTAQ) builds the residual term from the factor; ``None`` is plain GPTQ.
    """
    rows = weight.detach().reshape(weight.shape[0], -1)
    if hessian.shape != (rows.shape[1], rows.shape[1]):
        raise ValueError(f"The Hessian of {name} is {tuple(hessian.shape)}, expected {rows.shape[1]}².")
    factor = factor_hessian(hessian.to(rows.device), settings, name)
    w = rows.to(settings.dtype)
    order = factor.permutation
    if order is not None:
        w = w[:, order]
    original_column = list(range(w.shape[1])) if order is None else order.tolist()

    def quantize_column(values: torch.Tensor, column: int) -> torch.Tensor:
        return grid.quantize_column(values, original_column[column])

    p = correction(factor.upper, order) if correction is not None else None
    quantized = solve_columns(w, factor.upper, quantize_column, settings.block_size, p)
    if order is not None:
        quantized = quantized[:, torch.argsort(order)]
    if not torch.isfinite(quantized).all():
        raise HessianNotPositiveDefiniteError(
            f"GPTQ produced non-finite weights for {name}: raise the damping (gptq_damp) or use float64."
        )
    return quantized.reshape(weight.shape).to(weight.dtype)
