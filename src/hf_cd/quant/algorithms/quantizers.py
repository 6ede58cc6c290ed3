"""The quantizers as pure functions: every pipeline shares this arithmetic and nothing else here.

Conventions (written once; where RepQ-ViT's reference code, ``zkkli/RepQ-ViT``
``classification/quant/quantizer.py``, differs, the RepQ-ViT variant is named):

* Uniform asymmetric, ``b`` bits: integer codes ``0 … 2^b − 1``; ``scale = (max − min) / (2^b − 1)``
  and ``zero_point = round(−min / scale)``; ``x̂ = (clamp(round(x / scale) + zp) − zp) · scale``.
  `asymmetric_params` widens ``[min, max]`` to contain 0 by default, so the zero-point is a valid
  code; RepQ-ViT's ``UniformQuantizer`` does not (``include_zero=False``).
* Uniform symmetric, ``b`` bits: the narrow signed range ``−(2^(b−1) − 1) … 2^(b−1) − 1`` (2^b − 1 codes),
  so ``q(−x) = −q(x)``; ``scale = absmax / (2^(b−1) − 1)``. Our weight quantizer of ``minmax`` /
  ``percentile``; RepQ-ViT quantizes weights asymmetrically per output row instead
  (`quantize_weight_asymmetric`).
* log√2, ``b`` bits: levels ``delta · 2^(−k/2)`` for softmax probabilities that crowd near 0.
  RepQ-ViT's ``LogSqrt2Quantizer`` has ``2^b`` levels (k = 0 … 2^b − 1) and maps what is below the
  last one to an exact zero outside them (2^b + 1 values in all); ``reserve_zero_code`` keeps 2^b
  codes (k = 0 … 2^b − 2 and zero), which is what a b-bit integer code can hold.

Scales and zero-points broadcast against ``x``: a scalar is per-tensor, a ``(C,)`` tensor is per channel
of the last dimension, a ``(C, 1)`` tensor per row (per output channel of a flattened weight).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

FLOAT_BITS = 16
"""Bit widths at or above this leave a tensor in floating point (no quantization at all)."""

MIN_BITS, MAX_BITS = 2, 8
SCALE_EPS = 1e-8
"""Lower bound on scales, so an all-constant tensor does not divide by zero."""


def is_float_bits(bits: int) -> bool:
    """``True`` when ``bits`` means "leave float" (≥ 16)."""
    return bits >= FLOAT_BITS


def check_bits(name: str, bits: object) -> int:
    """Return ``bits`` if it is an int in 2..8 or ≥ 16, else raise a ValueError naming the fix."""
    if isinstance(bits, bool) or not isinstance(bits, int):
        raise TypeError(
            f"{name} must be an int (2..8 to quantize, ≥ {FLOAT_BITS} to leave float), got {bits!r}."
        )
    if not (MIN_BITS <= bits <= MAX_BITS or bits >= FLOAT_BITS):
        raise ValueError(
            f"{name}={bits} is out of range: use {MIN_BITS}..{MAX_BITS} bits to quantize, "
            f"or ≥ {FLOAT_BITS} to leave that tensor in floating point."
        )
    return bits


def asymmetric_range(bits: int) -> tuple[int, int]:
    """Integer codes of the unsigned asymmetric quantizer."""
    return 0, 2**bits - 1


def symmetric_range(bits: int) -> tuple[int, int]:
    """Integer codes of the narrow-range signed symmetric quantizer."""
    top = 2 ** (bits - 1) - 1
    return -top, top


def asymmetric_params(
    minimum: torch.Tensor, maximum: torch.Tensor, bits: int, include_zero: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and integer zero-point that spread ``[min, max]`` over the codes ``0 … 2^b − 1``.

    ``include_zero`` widens the range to contain 0, so 0 is exact and the zero-point is a valid
    code (what an integer kernel needs); RepQ's per-channel ranges before reparameterization don't.
    """
    minimum = torch.as_tensor(minimum, dtype=torch.float32)
    maximum = torch.as_tensor(maximum, dtype=torch.float32, device=minimum.device)
    if include_zero:
        minimum, maximum = minimum.clamp(max=0.0), maximum.clamp(min=0.0)
    scale = ((maximum - minimum) / (2**bits - 1)).clamp(min=SCALE_EPS)
    zero_point = torch.round(-minimum / scale)
    return scale, zero_point


def symmetric_scale(absmax: torch.Tensor, bits: int) -> torch.Tensor:
    """Scale that maps ``±absmax`` onto the outermost symmetric codes."""
    absmax = torch.as_tensor(absmax, dtype=torch.float32)
    return (absmax / symmetric_range(bits)[1]).clamp(min=SCALE_EPS)


def _compute_dtype(x: torch.Tensor) -> torch.Tensor:
    """``x`` in float32 at least (half precision rounds codes wrongly); float64 stays float64."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def fake_quantize_asymmetric(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int
) -> torch.Tensor:
    """Quantize to ``b``-bit unsigned codes and back, in ``x``'s dtype."""
    low, high = asymmetric_range(bits)
    codes = torch.round(_compute_dtype(x) / scale).add_(zero_point).clamp_(low, high)
    return codes.sub_(zero_point).mul_(scale).to(x.dtype)


def fake_quantize_dynamic_per_token(
    x: torch.Tensor, bits: int, clip_ratio: torch.Tensor | float = 1.0
) -> torch.Tensor:
    """Asymmetric ``b``-bit fake quantization with one range per row of the last dimension, taken at run time.

    Each row's ``[min, max]`` (widened to contain 0, times ``clip_ratio``) is spread over the codes
    ``0 … 2^b − 1``: no calibration, and a token's outliers cost only that token's resolution.
    """
    values = _compute_dtype(x)
    ratio = torch.as_tensor(clip_ratio, dtype=values.dtype, device=values.device)
    minimum = values.amin(dim=-1, keepdim=True).clamp(max=0.0) * ratio
    maximum = values.amax(dim=-1, keepdim=True).clamp(min=0.0) * ratio
    scale = ((maximum - minimum) / (2**bits - 1)).clamp(min=SCALE_EPS)
    zero_point = torch.round(-minimum / scale)
    return fake_quantize_asymmetric(values, scale, zero_point, bits).to(x.dtype)


def fake_quantize_symmetric(x: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Quantize to ``b``-bit narrow-range signed codes and back, in ``x``'s dtype."""
    low, high = symmetric_range(bits)
    return torch.round(_compute_dtype(x) / scale).clamp_(low, high).mul_(scale).to(x.dtype)


def log_sqrt2_num_levels(bits: int, reserve_zero_code: bool = False) -> int:
    """Nonzero levels of the log√2 quantizer: RepQ-ViT's ``2^b``, or ``2^b − 1`` when one code is zero."""
    return 2**bits - 1 if reserve_zero_code else 2**bits


def fake_quantize_log_sqrt2(
    x: torch.Tensor, delta: torch.Tensor, bits: int, reserve_zero_code: bool = False
) -> torch.Tensor:
    """RepQ-ViT's log√2 quantizer: ``delta · 2^(−k/2)`` with ``k = round(−2·log2(x / delta))``.

    Values at or above ``delta`` map to ``delta``. By default (RepQ-ViT's) ``k`` runs over
    ``0 … 2^b − 1`` and values whose ``k`` rounds past the last level become exactly 0, so the
    lowest nonzero level is ``delta · 2^(−(2^b − 1)/2)`` (δ·2^−7.5 at 4 bits). ``reserve_zero_code``
    gives the last code to zero instead (``k ≤ 2^b − 2``), so everything fits in ``b`` bits.
    Values ≤ 0 map to 0 (RepQ-ViT's gives NaN for negatives; softmax has none).
    """
    x32 = _compute_dtype(x)
    levels = log_sqrt2_num_levels(bits, reserve_zero_code)  # index `levels` of the table is zero
    exponent = torch.round(-2.0 * torch.log2(x32 / delta)).nan_to_num_(nan=levels).clamp_(0, levels)
    exponent = torch.where(x32 > 0, exponent, levels).long()
    # A table, not exp2: every element of one level gets the identical value (exp2's vectorized and
    # scalar paths differ in the last bit), so the output has exactly levels + 1 values and is monotonic.
    table = torch.tensor([2.0 ** (-k / 2) for k in range(levels)] + [0.0], dtype=x32.dtype, device=x.device)
    return (table[exponent] * delta).to(x.dtype)


def quantization_mse(x: torch.Tensor, x_hat: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Summed squared error, over everything or over ``dim`` (the criterion of every MSE search here)."""
    error = (x.float() - x_hat.float()).square_()
    return error.sum() if dim is None else error.sum(dim)


# --- weights --------------------------------------------------------------------------------------


def _rows(weight: torch.Tensor) -> torch.Tensor:
    """A Linear or Conv weight as (output channels × everything else)."""
    return weight.detach().reshape(weight.shape[0], -1).float()


def symmetric_weight_scale(
    weight: torch.Tensor, bits: int, per_channel: bool = True, clip_ratios: Sequence[float] = (1.0,)
) -> torch.Tensor:
    """The scale of `quantize_weight_symmetric`: ``(C, 1)`` per output channel, or ``(1, 1)`` per tensor.

    Each channel (or the tensor) takes the clipping ratio of ``absmax`` from ``clip_ratios`` with the
    least squared error (the first on ties): clipping a few large weights buys finer steps for all
    the others. Ratios are tried in chunks of at most 2^24 elements, so big weights fit in memory.
    """
    rows = _rows(weight)
    absmax = rows.abs().amax(dim=1, keepdim=True) if per_channel else rows.abs().amax().reshape(1, 1)
    ratios = torch.tensor([float(r) for r in clip_ratios], device=rows.device)
    chunk = max(1, 2**24 // rows.numel())
    best_error = best_scale = None
    for start in range(0, ratios.numel(), chunk):
        scales = symmetric_scale(absmax.unsqueeze(0) * ratios[start : start + chunk].view(-1, 1, 1), bits)
        errors = quantization_mse(
            rows.unsqueeze(0), fake_quantize_symmetric(rows.unsqueeze(0), scales, bits), dim=2
        )
        if not per_channel:
            errors = errors.sum(dim=1, keepdim=True)  # candidates × 1
        error, index = errors.min(dim=0)  # per channel (or the one tensor)
        scale = scales.expand(-1, absmax.shape[0], 1).gather(0, index.view(1, -1, 1)).squeeze(0)
        if best_error is None:
            best_error, best_scale = error, scale
        else:
            better = error < best_error
            best_error = torch.where(better, error, best_error)
            best_scale = torch.where(better.view(-1, 1), scale, best_scale)
    return best_scale


def quantize_weight_symmetric(
    weight: torch.Tensor, bits: int, per_channel: bool = True, clip_ratios: Sequence[float] = (1.0,)
) -> torch.Tensor:
    """Fake-quantize a weight symmetrically, per output channel or per tensor (`symmetric_weight_scale`)."""
    best_scale = symmetric_weight_scale(weight, bits, per_channel, clip_ratios)
    return fake_quantize_symmetric(_rows(weight), best_scale, bits).reshape(weight.shape).to(weight.dtype)


def sorted_quantile(sorted_rows: torch.Tensor, q: float) -> torch.Tensor:
    """``torch.quantile(rows, q, dim=1, keepdim=True)`` (linear interpolation) from rows sorted ascending.

    Sorting once serves every candidate percentile, and works past `torch.quantile`'s size limit.
    """
    position = q * (sorted_rows.shape[1] - 1)
    lower = int(position)
    upper = min(lower + 1, sorted_rows.shape[1] - 1)
    low, high = sorted_rows[:, lower : lower + 1], sorted_rows[:, upper : upper + 1]
    return torch.lerp(low, high, position - lower)


def row_tails(rows: torch.Tensor, lowest_quantile: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The smallest values of each row ascending and its largest descending: all `tail_quantile` needs.

    Enough for every quantile in ``[1 − q, q]`` outside ``(1 − lowest_quantile, lowest_quantile)``;
    two partial selections instead of sorting every row (a weight row has thousands of values, the
    tails a handful), and the very same values, so the same quantiles.
    """
    columns = rows.shape[1]
    keep = min(columns, int((1.0 - lowest_quantile) * (columns - 1)) + 2)
    if 4 * keep >= columns:  # wide tails: one sort is cheaper than two selections
        ordered = rows.sort(dim=1).values
        return ordered, ordered.flip(1)
    return rows.topk(keep, dim=1, largest=False).values, rows.topk(keep, dim=1, largest=True).values


def tail_quantile(low_tail: torch.Tensor, high_tail: torch.Tensor, columns: int, q: float) -> torch.Tensor:
    """`sorted_quantile` of rows of ``columns`` values from `row_tails`: ``(rows, 1)``."""
    position = q * (columns - 1)
    lower = int(position)
    upper = min(lower + 1, columns - 1)
    keep = low_tail.shape[1]

    def value(index: int) -> torch.Tensor:  # the index-th smallest value of each row
        if index < keep:
            return low_tail[:, index : index + 1]
        from_top = columns - 1 - index
        if from_top >= high_tail.shape[1]:
            raise ValueError(f"quantile {q} lies outside the kept tails of {keep} values per row.")
        return high_tail[:, from_top : from_top + 1]

    return torch.lerp(value(lower), value(upper), position - lower)


def asymmetric_weight_params(
    weight: torch.Tensor, bits: int, percentiles: Sequence[float], include_zero: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """RepQ-ViT's weight quantizer: per output row ``(scale, zero_point)``, each ``(C, 1)``.

    Each row takes the range ``[quantile(1 − p), quantile(p)]`` of its own values with the ``p`` of
    ``percentiles`` of least squared error (the first on ties), as ``UniformQuantizer`` with
    ``channel_wise=True`` does; no zero is forced into the range, as there.
    """
    rows = _rows(weight)
    low_tail, high_tail = row_tails(rows, min(percentiles))
    best_error = best_scale = best_zero_point = None
    for p in percentiles:
        scale, zero_point = asymmetric_params(
            tail_quantile(low_tail, high_tail, rows.shape[1], 1.0 - p),
            tail_quantile(low_tail, high_tail, rows.shape[1], p),
            bits,
            include_zero=include_zero,
        )
        error = quantization_mse(rows, fake_quantize_asymmetric(rows, scale, zero_point, bits), dim=1)
        if best_error is None:
            best_error, best_scale, best_zero_point = error, scale, zero_point
        else:
            better = (error < best_error).view(-1, 1)
            best_error = torch.minimum(error, best_error)
            best_scale = torch.where(better, scale, best_scale)
            best_zero_point = torch.where(better, zero_point, best_zero_point)
    return best_scale, best_zero_point


def quantize_weight_asymmetric(
    weight: torch.Tensor, bits: int, percentiles: Sequence[float], include_zero: bool = False
) -> torch.Tensor:
    """Fake-quantize a weight with `asymmetric_weight_params` (2^b levels per output row)."""
    rows = _rows(weight)
    scale, zero_point = asymmetric_weight_params(weight, bits, percentiles, include_zero)
    quantized = fake_quantize_asymmetric(rows, scale, zero_point, bits)
    return quantized.reshape(weight.shape).to(weight.dtype)


# --- quantiles from the tails ----------------------------------------------------------------------


def upper_quantile_from_top(top: torch.Tensor, count: int, q: float) -> torch.Tensor:
    """``torch.quantile(x, q, dim=0)`` (linear interpolation) from only the largest values of ``x``.

    ``top`` holds the ``k`` largest values of each column of ``x`` in descending order and ``count``
    is the number of rows of ``x``; ``k`` must exceed ``(1 − q)·(count − 1) + 1``. Keeping only the
    tail is what lets calibration stream batches instead of holding every activation.
    """
    position = q * (count - 1)  # ascending index into the sorted column
    lower = int(position)
    fraction = position - lower
    index_low = count - 1 - lower  # the same element counted from the top
    index_high = max(index_low - 1, 0)
    if index_low >= top.shape[0]:
        raise ValueError(
            f"The kept tail of {top.shape[0]} values is too short for quantile {q} of {count} values."
        )
    low, high = top[index_low], top[index_high]
    return low + fraction * (high - low)


def tail_length(count: int, lowest_quantile: float) -> int:
    """How many top values `upper_quantile_from_top` needs for quantiles ≥ ``lowest_quantile``."""
    return min(count, int((1.0 - lowest_quantile) * (count - 1)) + 3)
