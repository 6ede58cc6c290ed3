"""``repq``: RepQ-ViT (Li et al., ICCV 2023), by default as its reference code does it.

The reference is ``zkkli/RepQ-ViT``, ``classification/``: ``quant/quantizer.py`` (the quantizers),
``quant/quant_model.py`` (which layer gets which) and ``test_quant.py`` (the order of the steps).

1. On the float copy, calibrate each post-LayerNorm activation *per channel* (percentile search;
   no channel's range is widened to contain 0).
2. Fold those per-channel scales and zero-points into LayerNorm γ/β and into the weight columns and
   bias of the linears that read it (`hf_cd.quant.algorithms.repq_reparam`), so one per-tensor range fits. That
   range is the mean of the per-channel scales and of the zero-points, as ``test_quant.py`` sets
   it; it is fixed here and never calibrated again.
3. Quantize the (reparameterized) weights asymmetrically per output row, each row's range
   ``[quantile(1 − p), quantile(p)]`` with the ``p`` of least squared error
   (``UniformQuantizer(channel_wise=True)``).
4. Calibrate every other activation per tensor with the same percentile search, except the
   softmax probabilities, which get the log√2 quantizer (2^b levels and a zero below them).

Our variants, `RepQConfig`'s fields (spelt ``repq_<field>`` in ``repq:key=value``):

===========================  ======================  ============================================
``weights``                  ``asymmetric``          ``symmetric``: narrow-range symmetric per
                                                     channel, clip ratio from
                                                     ``weight_clip_ratios`` (as ``percentile``)
``weight_percentiles``       0.999, 0.9999, 0.99999  candidates of the asymmetric weight search
``post_layernorm``           ``mean``                ``recalibrate``: calibrate the post-LayerNorm
                                                     site again after folding (an integer zero-point
                                                     in range; the mean's may be fractional)
``log_zero_code``            False                   True: the last of the 2^b log√2 codes is zero
                                                     (2^b − 1 levels), so the softmax fits b bits
===========================  ======================  ============================================

``RepQConfig(weight_prefix_tokens=True)`` (ours; off by default here because RepQ-ViT does not do
it) makes the percentile search of the block activations count the CLS token as much as all patch
tokens, so it stops clipping the CLS token's rare large values (bench/results/pretrained_ptq.md).

Per-tensor activation ranges widen to contain 0 unless ``activation_include_zero`` is
False (RepQ-ViT's; it changes only ranges that exclude 0). Left as it is: the reference takes the
per-channel statistics and every other activation range in one pass over the quantized model
before folding and never refits them; here the statistics come from the float copy and the other
ranges are calibrated after folding, block by block (``sequential``).
"""

from __future__ import annotations

import torch
from torch import nn

from hf_cd.quant.algorithms.observers import LogSqrt2Observer, Observer, PercentileObserver
from hf_cd.quant.algorithms.params import QuantParams
from hf_cd.quant.algorithms.quantizers import (
    asymmetric_weight_params,
    is_float_bits,
    quantize_weight_asymmetric,
    quantize_weight_symmetric,
    symmetric_weight_scale,
)
from hf_cd.quant.algorithms.repq_reparam import (
    fold_into_layernorm,
    layernorm_reparameterization,
    post_layernorm_target,
)
from hf_cd.quant.calibration import calibrate
from hf_cd.quant.method_configs import RepQConfig
from hf_cd.quant.pipelines.base import FakeQuantPipeline
from hf_cd.quant.prepare import ActivationSite, QuantizationState, WeightSite

POST_LAYERNORM_ROLES = ("attention_input", "ffn_input")


class RepQPipeline(FakeQuantPipeline):
    name = "repq"
    description = (
        "RepQ-ViT: LayerNorm scale reparameterization, log√2 softmax, asymmetric percentile elsewhere"
    )
    qat_init = True

    def before_weights(
        self,
        model: nn.Module,
        state: QuantizationState,
        config: RepQConfig,
        calibration_images: torch.Tensor | None,
    ) -> None:
        sites = [s for s in state.activations if s.role in POST_LAYERNORM_ROLES and not is_float_bits(s.bits)]
        if not sites:
            return
        if calibration_images is None:
            raise ValueError(
                "Pipeline 'repq' needs calibration images for its per-channel LayerNorm statistics."
            )
        observers = {
            site.name: PercentileObserver(
                site.bits, config.activation_percentiles, per_channel=True, name=site.name
            )
            for site in sites
        }
        per_channel = calibrate(
            model,
            calibration_images,
            observers,
            state,
            batch_size=config.batch_size,
            sequential=False,  # float model: every site at once
            activate=False,
            progress=config.progress,
            description=f"repq {config.label} per-channel LayerNorm statistics",
        )
        for block in state.blocks:
            for norm, consumers in (
                (block.norm_before_attention, (block.query, block.key, block.value)),
                (block.norm_before_ffn, block.ffn_inputs),
            ):
                site = norm.output_quantizer.site
                params = per_channel.get(site)
                if params is None:
                    continue
                ratio, shift = layernorm_reparameterization(params.scale, params.zero_point)
                fold_into_layernorm(norm, consumers, ratio, shift)
                if config.post_layernorm == "mean":
                    scale, zero_point = post_layernorm_target(params.scale, params.zero_point)
                    state.preset[site] = QuantParams("asymmetric", params.bits, scale, zero_point)

    def quantize_weight(self, weight: torch.Tensor, bits: int, config: RepQConfig) -> torch.Tensor:
        if config.weights == "symmetric":
            return quantize_weight_symmetric(
                weight, bits, per_channel=True, clip_ratios=config.weight_clip_ratios
            )
        return quantize_weight_asymmetric(weight, bits, config.weight_percentiles)

    def weight_params(self, weight: torch.Tensor, bits: int, config: RepQConfig) -> QuantParams:
        if config.weights == "symmetric":
            scale = symmetric_weight_scale(
                weight, bits, per_channel=True, clip_ratios=config.weight_clip_ratios
            )
            return QuantParams("symmetric", bits, scale)
        scale, zero_point = asymmetric_weight_params(weight, bits, config.weight_percentiles)
        return QuantParams("asymmetric", bits, scale, zero_point)

    def weight_scheme(self, site: WeightSite, config: RepQConfig) -> str:
        if is_float_bits(site.bits):
            return "float"
        return config.weights

    def observer(self, site: ActivationSite, config: RepQConfig) -> Observer:
        if site.role == "attention_probs":
            return LogSqrt2Observer(
                site.bits,
                config.activation_percentiles,
                name=site.name,
                reserve_zero_code=config.log_zero_code,
            )
        return PercentileObserver(
            site.bits,
            config.activation_percentiles,
            name=site.name,
            include_zero=config.activation_include_zero,
            prefix_tokens=self.prefix_tokens(site, config),
        )
