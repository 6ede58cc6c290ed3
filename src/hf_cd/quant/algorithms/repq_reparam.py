"""RepQ-ViT's scale reparameterization of post-LayerNorm activations.

LayerNorm outputs have a few channels with far larger ranges than the rest, so one per-tensor
scale wastes most codes on them. A per-channel quantizer fits them but is not deployable. RepQ-ViT
(Li et al., ICCV 2023, Eq. 6–8) fits per-channel ``(scale_c, zero_point_c)`` and then rewrites the
model so one per-tensor pair fits: with ``r = scale / mean(scale)`` and
``b = min_c / r − mean-min``, LayerNorm gets ``γ / r`` and ``β / r − b`` and every consumer linear
gets ``W · diag(r)`` and bias ``c + W · diag(r) · b``. The float function is unchanged. The one
per-tensor pair is ``(mean(scale), mean(zero_point))`` (`post_layernorm_target`), which RepQ-ViT's
``test_quant.py`` loads into the LayerNorm output's quantizer as it is: the mean zero-point is not
rounded, so it may fall between codes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from hf_cd.quant.algorithms.quantizers import SCALE_EPS


@torch.no_grad()
def post_layernorm_target(scale: torch.Tensor, zero_point: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-tensor ``(scale, zero_point)`` every channel is mapped onto: the means of the per-channel ones."""
    return scale.float().clamp(min=SCALE_EPS).mean(), zero_point.float().mean()


@torch.no_grad()
def layernorm_reparameterization(
    scale: torch.Tensor, zero_point: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(r, b)`` that map per-channel ranges ``(scale_c, zero_point_c)`` onto one per-tensor range.

    Channel ``c`` becomes ``x_c / r_c − b_c``: its range starts at the mean minimum and is
    ``(2^bits − 1) · mean(scale)`` wide, the same for every channel.
    """
    scale = scale.float().clamp(min=SCALE_EPS)
    zero_point = zero_point.float()
    minimum = -zero_point * scale
    target_scale, target_zero_point = post_layernorm_target(scale, zero_point)
    target_minimum = -target_zero_point * target_scale
    ratio = scale / target_scale
    shift = minimum / ratio - target_minimum
    return ratio, shift


@torch.no_grad()
def fold_into_layernorm(
    norm: nn.LayerNorm, consumers: Sequence[nn.Linear], ratio: torch.Tensor, shift: torch.Tensor
) -> None:
    """Divide the LayerNorm output channel ``c`` by ``ratio_c`` and subtract ``shift_c``; undo it in ``consumers``.

    ``consumers`` are every linear reading that LayerNorm output (q, k, v; fc1, or gate and up).
    Works in place on float weights, before any weight is quantized.
    """
    if getattr(norm, "weight", None) is None:
        raise ValueError(
            f"{type(norm).__name__} has no affine weight to fold channel scales into (elementwise_affine=False)."
        )
    weight = norm.weight
    ratio = ratio.to(device=weight.device, dtype=torch.float32)
    shift = shift.to(device=weight.device, dtype=torch.float32)
    bias = norm.bias.float() if norm.bias is not None else torch.zeros_like(ratio)
    new_bias = bias / ratio - shift
    weight.copy_((weight.float() / ratio).to(weight.dtype))
    if norm.bias is None:
        norm.bias = nn.Parameter(new_bias.to(weight.dtype))
    else:
        norm.bias.copy_(new_bias.to(norm.bias.dtype))
    for linear in consumers:
        scaled = linear.weight.float() * ratio  # scales input column c by ratio_c
        correction = scaled @ shift
        linear.weight.copy_(scaled.to(linear.weight.dtype))
        if linear.bias is None:
            linear.bias = nn.Parameter(correction.to(linear.weight.dtype))
        else:
            linear.bias.copy_((linear.bias.float() + correction).to(linear.bias.dtype))
