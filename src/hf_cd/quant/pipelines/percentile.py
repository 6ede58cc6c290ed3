"""``percentile``: ranges that clip outliers where that lowers the squared error.

Weights: symmetric per output channel, each channel's clipping ratio of its absmax chosen from
``config.weight_clip_ratios`` by least squared error. Activations: asymmetric per tensor with range
``[quantile(1 − p), quantile(p)]``, ``p`` from ``config.activation_percentiles`` (RepQ-ViT's
{0.999, 0.9999, 0.99999}) by least squared error on the calibration images.
"""

from __future__ import annotations

import torch

from hf_cd.quant.config import QuantConfig
from hf_cd.quant.observers import Observer, PercentileObserver
from hf_cd.quant.pipelines.base import FakeQuantPipeline
from hf_cd.quant.prepare import ActivationSite
from hf_cd.quant.quantizers import quantize_weight_symmetric


class PercentilePipeline(FakeQuantPipeline):
    name = "percentile"
    description = (
        "per-channel MSE-clipped symmetric weights, per-tensor MSE-percentile asymmetric activations"
    )

    def quantize_weight(self, weight: torch.Tensor, bits: int, config: QuantConfig) -> torch.Tensor:
        return quantize_weight_symmetric(
            weight, bits, per_channel=True, clip_ratios=config.weight_clip_ratios
        )

    def observer(self, site: ActivationSite, config: QuantConfig) -> Observer:
        return PercentileObserver(
            site.bits,
            config.activation_percentiles,
            name=site.name,
            include_zero=config.activation_include_zero,
        )
