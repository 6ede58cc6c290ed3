"""GPTAQ (Li et al., "GPTAQ: Efficient Finetuning-Free Quantization for Asymmetric Calibration", 2025).

GPTQ fits each layer to the input it gets in the partially quantized model, ``min ‖(W_q − W) X_q‖``,
so error made upstream is taken as given. GPTAQ fits the quantized layer to the *float* layer on the
*float* input, ``min ‖W_q X_q − W X_fp‖``; with ``ΔX = X_fp − X_q`` the objective gains a term
``W ΔX`` that the remaining columns can partly cancel. Solving GPTQ's column step with that term and
splitting it by input neuron (column ``i`` is responsible for ``w_i ΔX_i``, which only the columns
after ``i`` can still absorb through ``H⁻¹`` of the columns left) gives, with ``U`` the upper
Cholesky factor of ``H⁻¹`` and ``dXXᵀ = 2/n Σ ΔX X_qᵀ``::

    P = α · triu(dXXᵀ Uᵀ, 1) · U            (strictly upper triangular, computed once per layer)
    w_j ← w_j − e_i U_ij + w_i P_ij         for j > i, after column i is rounded

``α = 1`` is the decomposed closed form; the paper uses ``α = 0.25`` because ``H`` comes from the
quantized inputs only, which biases the residual term. ``α = 0`` is GPTQ exactly.

One difference from the published code: its lazy batch update multiplies ``P`` by the block's
already-*rounded* columns while its per-column update uses their values *before* rounding; here both
use the values before rounding, so the result is the unbatched algorithm's for any block size.
"""

from __future__ import annotations

import torch

from hf_cd.quant.algorithms.gptq import DEFAULT_SOLVER_SETTINGS, SolverSettings, WeightGrid, gptq_quantize

DEFAULT_ALPHA = 0.25
"""GPTAQ's published scale of the residual term."""


def residual_correction(residual: torch.Tensor, upper: torch.Tensor, alpha: float) -> torch.Tensor:
    """``P = α · triu(dXXᵀ Uᵀ, 1) · U`` (``residual`` = dXXᵀ and ``upper`` in the same column order)."""
    residual = residual.to(upper.dtype)
    return alpha * torch.triu(residual @ upper.T, diagonal=1) @ upper


def gptaq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    residual: torch.Tensor,
    grid: WeightGrid,
    alpha: float = DEFAULT_ALPHA,
    settings: SolverSettings = DEFAULT_SOLVER_SETTINGS,
    name: str = "this layer",
) -> torch.Tensor:
    """GPTQ with GPTAQ's residual correction scaled by ``alpha`` (``alpha = 0`` returns GPTQ's weights).

    ``hessian`` = ``2/n Σ X_q X_qᵀ`` and ``residual`` = ``2/n Σ (X_fp − X_q) X_qᵀ``, as
    `InputStatistics` gives them; act-order permutes the residual's rows and columns with ``H``'s.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1] (GPTAQ's default is {DEFAULT_ALPHA}), got {alpha!r}.")
    if residual.shape != hessian.shape:
        raise ValueError(f"residual is {tuple(residual.shape)} but the Hessian is {tuple(hessian.shape)}.")

    def correction(upper: torch.Tensor, permutation: torch.Tensor | None) -> torch.Tensor:
        r = residual.to(upper.device)
        if permutation is not None:
            r = r[permutation][:, permutation]
        return residual_correction(r, upper, alpha)

    return gptq_quantize(weight, hessian, grid, settings, correction=correction, name=name)
