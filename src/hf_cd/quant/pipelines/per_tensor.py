"""``per_tensor``: static per-tensor AbsMax, symmetric, for weights and activations alike.

The simplest setting every integer runtime supports, and the one outlier channels hurt most: one
large value sets the step for the whole tensor.
"""

from __future__ import annotations

import torch

from hf_cd.quant.algorithms.observers import AbsMaxObserver, Observer
from hf_cd.quant.algorithms.params import QuantParams
from hf_cd.quant.algorithms.quantizers import quantize_weight_symmetric, symmetric_weight_scale
from hf_cd.quant.pipelines.base import FakeQuantPipeline
from hf_cd.quant.prepare import ActivationSite


class PerTensorPipeline(FakeQuantPipeline):
    name = "per_tensor"
    description = "per-tensor AbsMax symmetric weights and activations"
    qat_init = True

    def quantize_weight(self, weight: torch.Tensor, bits: int, config) -> torch.Tensor:
        return quantize_weight_symmetric(weight, bits, per_channel=False)

    def weight_params(self, weight: torch.Tensor, bits: int, config) -> QuantParams:
        return QuantParams("symmetric", bits, symmetric_weight_scale(weight, bits, per_channel=False))

    def observer(self, site: ActivationSite, config) -> Observer:
        return AbsMaxObserver(site.bits, site.name)
