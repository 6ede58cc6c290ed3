"""``gptq``: GPTQ encoder weights (Hessian from the partially quantized model's inputs), stage by stage.

`ReconstructionPipeline` is the shared skeleton of ``gptq``, ``gptaq``, ``marr`` and ``marr_grid``
(the engine and its options: `hf_cd.quant.reconstruction`); a subclass only says how one linear's
weight is solved from its input statistics.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from hf_cd.quant.config import QuantConfig
from hf_cd.quant.gptq import (
    SolverSettings,
    WeightGrid,
    gptq_quantize,
    relative_reconstruction_error,
    weight_grid,
)
from hf_cd.quant.marr import AlphaSearch
from hf_cd.quant.observers import Observer
from hf_cd.quant.pipelines.base import FakeQuantPipeline
from hf_cd.quant.prepare import ActivationSite, WeightSite, prepare_fake_quant_copy, quantization_state
from hf_cd.quant.quantizers import is_float_bits
from hf_cd.quant.reconstruction import (
    RECONSTRUCTION_ATTRIBUTE,
    LayerInputs,
    ReconstructionOptions,
    Stage,
    calibrate_sites,
    collect_statistics,
    plan_stages,
    progress_bar,
)
from hf_cd.quant.registry import get_pipeline
from hf_cd.table import Table


class ReconstructionPipeline(FakeQuantPipeline):
    """Base class: copy, reparameterize as the activation pipeline does, then calibrate and solve in order."""

    method: str = ""
    needs_reference: bool = False
    """Whether the solve needs each linear's float input (a second, float copy of the model)."""

    def __call__(
        self, model: nn.Module, config: QuantConfig, calibration_images: torch.Tensor | None
    ) -> nn.Module:
        options = ReconstructionOptions.from_extra(config.extra)
        activation = self.activation_pipeline(options)
        settings = options.solver_settings()
        quantized = prepare_fake_quant_copy(model, config)
        state = quantization_state(quantized)
        encoder = [w for w in state.weights if w.block is not None and not is_float_bits(w.bits)]
        if encoder and calibration_images is None:
            raise ValueError(
                f"Pipeline {self.name!r} solves the encoder weights on calibration inputs, so it needs "
                "calibration images even when no activation is quantized: pass calib_data=... to quantize(). "
                "(evaluate_quantized hands images only to rows that quantize some activation: keep "
                "embedding_bits or classifier_bits below 16 there.)"
            )
        activation.before_weights(quantized, state, config, calibration_images)
        reference = None
        if self.needs_reference and encoder:
            reference = prepare_fake_quant_copy(model, config)  # stays float: every quantizer passes through
            activation.before_weights(reference, quantization_state(reference), config, calibration_images)
        with torch.no_grad():
            for site in state.weights:
                if site.block is None and not is_float_bits(site.bits):
                    weight = site.module.weight
                    weight.copy_(activation.quantize_weight(weight.detach(), site.bits, config))
        label = f"{self.name} {config.label}"
        outer = [s for s in state.activations if s.block is None]
        calibrate_sites(
            quantized, [s for s in outer if s.group == 0], activation, config, calibration_images, label
        )
        stages = plan_stages(state.activations, encoder, len(state.blocks))
        rows: list[dict[str, Any]] = []
        with progress_bar(len(stages), label, config.progress) as bar:
            for stage in stages:
                bar.set_postfix_str(stage.name)
                calibrate_sites(quantized, stage.sites, activation, config, calibration_images, label)
                if stage.weights:
                    rows += self.solve_stage(
                        quantized, reference, stage, calibration_images, config, options, settings
                    )
                bar.update(1)
        calibrate_sites(
            quantized, [s for s in outer if s.group != 0], activation, config, calibration_images, label
        )
        del reference
        state.num_calibration = 0 if calibration_images is None else int(calibration_images.shape[0])
        object.__setattr__(quantized, RECONSTRUCTION_ATTRIBUTE, Table(rows))
        return quantized

    def check(self, config: QuantConfig) -> None:
        """Reject bad ``gptq_``/``gptaq_``/``marr_`` options (and the activation pipeline's) before any row runs."""
        self.activation_pipeline(ReconstructionOptions.from_extra(config.extra)).check(config)

    @staticmethod
    def activation_pipeline(options: ReconstructionOptions) -> FakeQuantPipeline:
        pipeline = get_pipeline(options.gptq_activations)
        if not isinstance(pipeline, FakeQuantPipeline) or isinstance(pipeline, ReconstructionPipeline):
            raise ValueError(
                f"gptq_activations={options.gptq_activations!r} must name a fake-quant activation pipeline "
                "(e.g. 'percentile', 'minmax' or 'repq'), not a runtime or another reconstruction pipeline."
            )
        return pipeline

    @torch.no_grad()
    def solve_stage(
        self,
        quantized: nn.Module,
        reference: nn.Module | None,
        stage: Stage,
        images: torch.Tensor,
        config: QuantConfig,
        options: ReconstructionOptions,
        settings: SolverSettings,
    ) -> list[dict[str, Any]]:
        """Collect the stage's input statistics once, then solve each of its linears."""
        reference_modules = dict(reference.named_modules()) if reference is not None else {}

        def statistics_of(subset: torch.Tensor):
            return collect_statistics(
                quantized,
                [site.module for site in stage.weights],
                subset,
                config.batch_size,
                settings.dtype,
                reference,
                [reference_modules[site.name] for site in stage.weights] if reference is not None else (),
            )

        holdout = self.holdout_fraction(options)
        if holdout is None:
            statistics = statistics_of(images)
            inputs = LayerInputs(statistics, statistics, statistics)
        else:
            held_out = max(1, round(images.shape[0] * holdout))
            if held_out >= images.shape[0]:
                raise ValueError(
                    f"marr_feedback='holdout' needs at least 2 calibration images, got {images.shape[0]}."
                )
            fit, feedback = statistics_of(images[:-held_out]), statistics_of(images[-held_out:])
            inputs = LayerInputs(fit.merged(feedback), fit, feedback)
        clip_ratios = config.weight_clip_ratios if options.gptq_clip_search else (1.0,)
        rows = []
        for site in stage.weights:
            weight = site.module.weight
            grid = weight_grid(weight, site.bits, options.gptq_group_size, clip_ratios)
            solution, error, search = self.solve(weight.detach(), inputs, grid, options, settings, site.name)
            weight.copy_(solution)
            rows.append(
                {
                    "module": site.name,
                    "block": site.block,
                    "role": site.role,
                    "method": self.method,
                    "alpha": None if search is None else search.best_alpha,
                    "error": error,
                    "error_alpha_0": None
                    if search is None or 0.0 not in search.alphas
                    else search.errors[search.alphas.index(0.0)],
                    "float_target": inputs.statistics.with_reference,
                    "feedback": None if search is None else ("holdout" if inputs.split else "calibration"),
                    "alphas": [] if search is None else search.alphas,
                    "errors": [] if search is None else search.errors,
                    "tokens": inputs.statistics.count,
                }
            )
        return rows

    def holdout_fraction(self, options: ReconstructionOptions) -> float | None:
        """Share of calibration images held out as the α search's feedback (``None``: no α search)."""
        return None

    def solve(
        self,
        weight: torch.Tensor,
        inputs: LayerInputs,
        grid: WeightGrid,
        options: ReconstructionOptions,
        settings: SolverSettings,
        name: str,
    ) -> tuple[torch.Tensor, float, AlphaSearch | None]:
        """One linear: its quantized weight, its relative reconstruction error, and the α search (if any)."""
        raise NotImplementedError

    def quantize_weight(self, weight: torch.Tensor, bits: int, config: QuantConfig) -> torch.Tensor:
        """Round-to-nearest as the activation pipeline does (what encoder weights get without a solve)."""
        options = ReconstructionOptions.from_extra(config.extra)
        return self.activation_pipeline(options).quantize_weight(weight, bits, config)

    def weight_scheme(self, site: WeightSite, config: QuantConfig) -> str:
        """Encoder linears are solved on the symmetric grid; the others are the activation pipeline's."""
        if site.block is not None and not is_float_bits(site.bits):
            return "symmetric"
        return self.activation_pipeline(ReconstructionOptions.from_extra(config.extra)).weight_scheme(
            site, config
        )

    def observer(self, site: ActivationSite, config: QuantConfig) -> Observer:
        options = ReconstructionOptions.from_extra(config.extra)
        return self.activation_pipeline(options).observer(site, config)


class GPTQPipeline(ReconstructionPipeline):
    name = "gptq"
    method = "gptq"
    description = "GPTQ encoder weights on the partially quantized inputs; activations as gptq_activations"

    def solve(self, weight, inputs, grid, options, settings, name):
        solution = gptq_quantize(weight, inputs.hessian, grid, settings, name=name)
        return solution, relative_reconstruction_error(weight, solution, inputs.statistics), None
