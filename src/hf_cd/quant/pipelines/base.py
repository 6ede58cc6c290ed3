"""`FakeQuantPipeline`: the shared skeleton of the built-in pipelines.

A pipeline says three things: how to quantize a weight, which observer calibrates an activation
site, and (optionally) what to do to the float copy first (RepQ's reparameterization). The
skeleton copies the model, does those in that order, and returns the copy. Calibrating after the
weights are quantized means every activation range is fitted to the quantized model. Sites whose
parameters the first step fixed (``state.preset``: RepQ-ViT's post-LayerNorm target) are loaded
with them instead of being calibrated.
"""

from __future__ import annotations

import torch
from torch import nn

from hf_cd.quant.algorithms.observers import Observer
from hf_cd.quant.algorithms.params import QuantParams
from hf_cd.quant.algorithms.quantizers import is_float_bits
from hf_cd.quant.calibration import calibrate, load_presets
from hf_cd.quant.config import BaseQuantConfig
from hf_cd.quant.prepare import (
    ActivationSite,
    QuantizationState,
    prepare_fake_quant_copy,
    quantization_state,
)
from hf_cd.quant.registry import Pipeline


class FakeQuantPipeline(Pipeline):
    """Base class; subclasses set ``name`` and implement `quantize_weight` and `observer`."""

    weights_prefix_tokens: bool = False
    """Default of `BaseQuantConfig.weight_prefix_tokens` for this pipeline (when the config leaves it None)."""

    def __call__(
        self, model: nn.Module, config: BaseQuantConfig, calibration_images: torch.Tensor | None
    ) -> nn.Module:
        quantized = prepare_fake_quant_copy(model, config)
        state = quantization_state(quantized)
        self.before_weights(quantized, state, config, calibration_images)
        self.quantize_weights(state, config)
        self.calibrate_activations(quantized, state, config, calibration_images)
        return quantized

    def calibrate_activations(
        self,
        quantized: nn.Module,
        state: QuantizationState,
        config: BaseQuantConfig,
        calibration_images: torch.Tensor | None,
    ) -> None:
        """Load the preset activation sites and calibrate the others (after the weights are quantized)."""
        observers = {
            site.name: self.observer(site, config)
            for site in load_presets(state, list(state.activations))
            if not is_float_bits(site.bits)
        }
        if observers:
            if calibration_images is None:
                raise ValueError(f"Pipeline {self.name!r} needs calibration images to quantize activations.")
            calibrate(
                quantized,
                calibration_images,
                observers,
                state,
                batch_size=config.batch_size,
                sequential=config.sequential,
                progress=config.progress,
                description=f"{self.name} {config.label} calibration",
            )
        state.num_calibration = 0 if calibration_images is None else int(calibration_images.shape[0])

    def before_weights(
        self,
        model: nn.Module,
        state: QuantizationState,
        config: BaseQuantConfig,
        calibration_images: torch.Tensor | None,
    ) -> None:
        """Hook on the float copy before anything is quantized (no-op by default)."""

    @torch.no_grad()
    def quantize_weights(self, state: QuantizationState, config: BaseQuantConfig) -> None:
        for site in state.weights:
            if not is_float_bits(site.bits):
                weight = site.module.weight
                weight.copy_(self.quantize_weight(weight.detach(), site.bits, config))

    def quantize_weight(self, weight: torch.Tensor, bits: int, config: BaseQuantConfig) -> torch.Tensor:
        raise NotImplementedError

    def weight_params(self, weight: torch.Tensor, bits: int, config: BaseQuantConfig) -> QuantParams:
        """The per-row grid `quantize_weight` rounds ``weight`` to (scale ``(C, 1)``), where ``qat_init``.

        ``weight_params(w, b, c).apply(w.reshape(C, -1))`` equals ``quantize_weight(w, b, c)``: the
        learned step sizes of `hf_cd.quant.qat` start from these.
        """
        raise NotImplementedError(f"Pipeline {self.name!r} does not expose its weight grid.")

    def observer(self, site: ActivationSite, config: BaseQuantConfig) -> Observer:
        raise NotImplementedError

    def prefix_tokens(self, site: ActivationSite, config: BaseQuantConfig) -> int:
        """How many leading tokens of ``site`` its observer weighs as prefix tokens (0: none)."""
        weigh = config.weight_prefix_tokens
        return site.prefix_tokens if (self.weights_prefix_tokens if weigh is None else weigh) else 0
