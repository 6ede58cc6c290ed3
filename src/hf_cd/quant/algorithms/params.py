"""`QuantParams`: what calibration decides for one activation site, and how to apply it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from hf_cd.quant.algorithms.quantizers import (
    fake_quantize_asymmetric,
    fake_quantize_dynamic_per_token,
    fake_quantize_log_sqrt2,
    fake_quantize_symmetric,
)

Scheme = Literal["asymmetric", "symmetric", "log_sqrt2", "log_sqrt2_zero_code", "dynamic_per_token"]
SCHEMES: tuple[str, ...] = (
    "asymmetric",
    "symmetric",
    "log_sqrt2",
    "log_sqrt2_zero_code",
    "dynamic_per_token",
)
"""``log_sqrt2`` is RepQ-ViT's (2^b levels and a zero outside them); ``log_sqrt2_zero_code`` gives
zero one of the 2^b codes (`hf_cd.quant.algorithms.quantizers.fake_quantize_log_sqrt2`). ``dynamic_per_token``
is not calibrated: every row of the last dimension (a token; per head inside attention) gets its
own asymmetric range from its own min and max at run time (QuaRot's activations); its ``scale``
holds a clip ratio of that range (1: none)."""


@dataclass(frozen=True)
class QuantParams:
    """Scheme, bits and the tensors of one quantizer.

    ``scale`` is a scalar (per tensor) or ``(C,)`` (per channel of the last dimension); for
    the log√2 schemes it is the largest level ``delta``. ``zero_point`` is set for ``asymmetric`` only,
    and may be fractional (RepQ-ViT's post-LayerNorm target is a mean of zero-points).
    """

    scheme: Scheme
    bits: int
    scale: torch.Tensor
    zero_point: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise ValueError(f"Unknown quantization scheme {self.scheme!r}; known: {', '.join(SCHEMES)}.")
        if (self.scheme == "asymmetric") != (self.zero_point is not None):
            raise ValueError("An asymmetric quantizer needs a zero_point, and only it has one.")

    @property
    def per_channel(self) -> bool:
        return self.scale.ndim > 0 and self.scale.numel() > 1

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Fake-quantize ``x`` (quantize and dequantize, same dtype and shape)."""
        return fake_quantize(x, self.scheme, self.bits, self.scale, self.zero_point)


def fake_quantize(
    x: torch.Tensor, scheme: str, bits: int, scale: torch.Tensor, zero_point: torch.Tensor | None = None
) -> torch.Tensor:
    if scheme == "asymmetric":
        return fake_quantize_asymmetric(x, scale, zero_point, bits)
    if scheme == "symmetric":
        return fake_quantize_symmetric(x, scale, bits)
    if scheme == "dynamic_per_token":
        return fake_quantize_dynamic_per_token(x, bits, scale)
    if scheme in ("log_sqrt2", "log_sqrt2_zero_code"):
        return fake_quantize_log_sqrt2(x, scale, bits, reserve_zero_code=scheme == "log_sqrt2_zero_code")
    raise ValueError(f"Unknown quantization scheme {scheme!r}; known: {', '.join(SCHEMES)}.")
