"""``repq``: RepQ-ViT (Li et al., ICCV 2023) scale reparameterization on top of ``percentile``.

1. On the float copy, calibrate each post-LayerNorm activation *per channel* (percentile search).
2. Fold those per-channel scales and zero-points into LayerNorm γ/β and into the weight columns and
   bias of the linears that read it (`hf_cd.quant.reparam`), so one per-tensor range fits.
3. Quantize the (reparameterized) weights and calibrate every activation as ``percentile`` does,
   except the softmax probabilities, which get the log√2 quantizer.
"""

from __future__ import annotations

import torch
from torch import nn

from hf_cd.quant.calibration import calibrate
from hf_cd.quant.config import QuantConfig
from hf_cd.quant.observers import LogSqrt2Observer, Observer, PercentileObserver
from hf_cd.quant.pipelines.percentile import PercentilePipeline
from hf_cd.quant.prepare import ActivationSite, QuantizationState
from hf_cd.quant.quantizers import is_float_bits
from hf_cd.quant.reparam import fold_into_layernorm, layernorm_reparameterization

POST_LAYERNORM_ROLES = ("attention_input", "ffn_input")


class RepQPipeline(PercentilePipeline):
    name = "repq"
    description = "RepQ-ViT: LayerNorm scale reparameterization, log√2 softmax, percentile elsewhere"

    def before_weights(
        self,
        model: nn.Module,
        state: QuantizationState,
        config: QuantConfig,
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
                params = per_channel.get(norm.output_quantizer.site)
                if params is not None:
                    ratio, shift = layernorm_reparameterization(params.scale, params.zero_point)
                    fold_into_layernorm(norm, consumers, ratio, shift)

    def observer(self, site: ActivationSite, config: QuantConfig) -> Observer:
        if site.role == "attention_probs":
            return LogSqrt2Observer(site.bits, config.activation_percentiles, name=site.name)
        return super().observer(site, config)
