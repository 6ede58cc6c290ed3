"""``minmax``: the textbook baseline. Weights: symmetric per output channel from their absmax;
activations: asymmetric per tensor from the calibration minimum and maximum."""

from __future__ import annotations

import torch

from hf_cd.quant.algorithms.observers import MinMaxObserver, Observer
from hf_cd.quant.algorithms.params import QuantParams
from hf_cd.quant.algorithms.quantizers import quantize_weight_symmetric, symmetric_weight_scale
from hf_cd.quant.pipelines.base import FakeQuantPipeline
from hf_cd.quant.prepare import ActivationSite


class MinMaxPipeline(FakeQuantPipeline):
    name = "minmax"
    description = "per-channel symmetric weights, per-tensor min/max asymmetric activations"
    qat_init = True

    def quantize_weight(self, weight: torch.Tensor, bits: int, config) -> torch.Tensor:
        return quantize_weight_symmetric(weight, bits, per_channel=True)

    def weight_params(self, weight: torch.Tensor, bits: int, config) -> QuantParams:
        return QuantParams("symmetric", bits, symmetric_weight_scale(weight, bits, per_channel=True))

    def observer(self, site: ActivationSite, config) -> Observer:
        return MinMaxObserver(site.bits, site.name, include_zero=config.activation_include_zero)
