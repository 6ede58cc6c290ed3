"""`ActivationQuantizer`: the module that sits at one activation site of a fake-quantized copy.

It has three modes: ``float`` (pass through), ``observe`` (feed an `Observer`, pass through) and
``quantize`` (apply its `QuantParams`). Parameters live in buffers so ``.to(device)`` moves them.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from hf_cd.quant.algorithms.observers import Observer
from hf_cd.quant.algorithms.params import QuantParams, fake_quantize
from hf_cd.quant.algorithms.quantizers import is_float_bits

Mode = Literal["float", "observe", "quantize"]


class ActivationQuantizer(nn.Module):
    """Fake-quantizes one activation tensor once calibrated; ``bits ≥ 16`` keeps it float for good."""

    def __init__(self, site: str, role: str, bits: int) -> None:
        super().__init__()
        self.site = site
        self.role = role
        self.bits = bits
        self.mode: Mode = "float"
        self.observer: Observer | None = None
        self.scheme: str | None = None
        self.register_buffer("scale", None)
        self.register_buffer("zero_point", None)

    @property
    def is_float(self) -> bool:
        return is_float_bits(self.bits)

    def observe_with(self, observer: Observer) -> None:
        self.observer, self.mode = observer, "observe"

    def load(self, params: QuantParams) -> None:
        """Take calibrated parameters and start quantizing."""
        self.scheme, self.bits = params.scheme, params.bits
        self.scale = params.scale.detach().clone()
        self.zero_point = None if params.zero_point is None else params.zero_point.detach().clone()
        self.observer, self.mode = None, "quantize"

    @property
    def params(self) -> QuantParams | None:
        if self.scheme is None:
            return None
        return QuantParams(self.scheme, self.bits, self.scale, self.zero_point)

    def reset(self) -> None:
        """Back to float pass-through, forgetting any calibration (RepQ's per-channel statistics pass)."""
        self.mode, self.observer, self.scheme = "float", None, None
        self.scale = self.zero_point = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "quantize":
            return fake_quantize(x, self.scheme, self.bits, self.scale, self.zero_point)
        if self.mode == "observe":
            self.observer.observe(x)
        return x

    def extra_repr(self) -> str:
        scheme = f", scheme={self.scheme}" if self.scheme else ""
        return f"site={self.site!r}, bits={self.bits}, mode={self.mode}{scheme}"


class AttentionQuantizers(nn.Module):
    """The four inputs of the two attention matmuls: ``q``·``kᵀ`` and ``probs``·``v``.

    Attached to an attention module of the quantized copy, read by the registered attention
    function. ``fallback`` is the attention implementation the original model used; while all four
    stay float it runs unchanged, so ``bits ≥ 16`` reproduces the original logits.
    """

    ROLES = ("query", "key", "value", "probs")

    def __init__(self, prefix: str, bits: int, fallback: str | None) -> None:
        super().__init__()
        self.query = ActivationQuantizer(f"{prefix}:query", "query", bits)
        self.key = ActivationQuantizer(f"{prefix}:key", "key", bits)
        self.value = ActivationQuantizer(f"{prefix}:value", "value", bits)
        self.probs = ActivationQuantizer(f"{prefix}:probs", "attention_probs", bits)
        self.fallback = fallback

    @property
    def passthrough(self) -> bool:
        return all(q.mode == "float" for q in (self.query, self.key, self.value, self.probs))
