"""The model-level engine of the reconstruction pipelines (``gptq``, ``gptaq``, ``marr``, ``marr_grid``).

Every encoder linear is quantized by solving for its weight on calibration inputs, in forward order,
and every activation site is calibrated just before the linears that read it, so each solve sees
the input the finished model will give that layer. A block runs in four stages::

    stage 0: calibrate the attention input (LayerNorm output)    → solve q, k, v
    stage 1: calibrate the attention matmul inputs and o's input → solve o
    stage 2: calibrate the FFN input (LayerNorm output)          → solve fc1 (gate, up)
    stage 3: calibrate fc2's input                               → solve fc2

Activation sites use the observers of the activation pipeline (``percentile`` by default; ``repq``
also reparameterizes LayerNorms first), and so do the patch embedding and classifier weights; only
how encoder linear weights are chosen changes. For GPTAQ and MARR a second, float copy of the model
gives each linear's full-precision input for the same images.

Options: the fields of `GPTQConfig`, `GPTAQConfig`, `MARRConfig` and `MARRGridConfig`, spelt as below in
``NAME:key=value`` (the field is the key without its prefix; a misspelt key is refused with a did-you-mean):

=========================  =========  ==============================================================
``gptq_activations``       percentile registered fake-quant pipeline for activations, embedding, head
``gptq_damp``              0.01       damping, fraction of mean(diag H) added to diag H
``gptq_block_size``        128        columns per lazy batch update
``gptq_group_size``        None       input columns per weight scale (None: one per output channel)
``gptq_act_order``         False      quantize columns by decreasing H_ii
``gptq_clip_search``       True       each scale's clipping ratio by least weight MSE (config.weight_clip_ratios)
``gptq_precision``         float64    arithmetic of statistics and solver (float32 or float64)
``gptaq_alpha``            0.25       ``gptaq``: the one global scale α of the residual term
``marr_alpha_init``        0.25       ``marr``: α_0 of every module's PID loop
``marr_rounds``            6          ``marr``: error evaluations per module after α = 0
``marr_gains``             (0.8, 0.05, 0.1)  ``marr``: (K_p, K_i, K_d)
``marr_max_step``          0.35       ``marr``: largest change of α per round
``marr_tolerance``         0.01       ``marr``: stop when α moves less than this
``marr_grid``              0, 0.125, …, 1  ``marr_grid``: α candidates per module
``marr_feedback``          calibration  ``marr``/``marr_grid``: where E(α) is measured: ``calibration``
                                      (the images the solve fits) or ``holdout`` (solve on the other
                                      images, measure on a held-out share, then re-solve on all)
``marr_holdout``           0.25       share of the calibration images held out for ``holdout``
=========================  =========  ==============================================================

What each pipeline did per module (α, its trajectory, the errors) is kept on the copy; read it with
`reconstruction_report`. `measure_reconstruction_errors` measures any quantized copy (any pipeline)
against the float model on held-out images with the same relative error.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from hf_cd.quant.algorithms.gptq import (
    InputStatistics,
    SolverSettings,
    WeightGrid,
    weight_grid,
)
from hf_cd.quant.algorithms.marr import AlphaSearch
from hf_cd.quant.algorithms.observers import Observer
from hf_cd.quant.algorithms.quantizers import is_float_bits
from hf_cd.quant.calibration import calibrate, forward_images, load_presets, model_device_and_dtype
from hf_cd.quant.config import BaseQuantConfig
from hf_cd.quant.method_configs import GPTQConfig
from hf_cd.quant.pipelines.base import FakeQuantPipeline
from hf_cd.quant.prepare import (
    ActivationSite,
    WeightSite,
    prepare_fake_quant_copy,
    quantization_state,
)
from hf_cd.quant.reconstruction_errors import RECONSTRUCTION_ATTRIBUTE
from hf_cd.quant.registry import pipeline_for
from hf_cd.table import Table

SITE_STAGES: dict[str, int] = {
    "attention_input": 0,
    "query": 1,
    "key": 1,
    "value": 1,
    "attention_probs": 1,
    "attention_output": 1,
    "ffn_input": 2,
    "ffn_hidden": 3,
}
"""Stage at whose start each activation role of a block is calibrated (`hf_cd.quant.prepare` roles)."""
NUM_STAGES = 4
STAGE_NAMES = ("qkv", "attention_output", "ffn_input", "ffn_output")


def linear_stage(role: str) -> int:
    """Stage in which the linear of ``role`` (`ResolvedBlock.linears` keys) is solved."""
    if role in ("query", "key", "value"):
        return 0
    if role == "output":
        return 1
    if role.startswith("ffn_input"):
        return 2
    if role == "ffn_output":
        return 3
    raise ValueError(f"No reconstruction stage for an encoder linear of role {role!r}.")


# --- capturing a layer's input ------------------------------------------------------------------------


class _InputCaptured(Exception):
    """Raised by a pre-hook once a stage's input is captured, to stop the forward there."""


def capture_input(model: nn.Module, modules: Sequence[nn.Module], images: torch.Tensor) -> torch.Tensor:
    """The input of the first of ``modules`` to run when ``model`` sees ``images`` (the forward stops there).

    A forward pre-hook registered now runs after the quantizer hooks a copy already has, so it sees
    the input exactly as the layer will (fake-quantized where the layer's input site is).
    """
    captured: list[torch.Tensor] = []

    def hook(module: nn.Module, args: tuple) -> None:
        captured.append(args[0].detach())
        raise _InputCaptured

    handles = [module.register_forward_pre_hook(hook) for module in modules]
    try:
        with contextlib.suppress(_InputCaptured):
            forward_images(model, images)
    finally:
        for handle in handles:
            handle.remove()
    if not captured:
        raise RuntimeError(
            f"None of the {len(modules)} layers of this stage ran during a forward pass; is the model's "
            "architecture entry (hf_cd.architectures) pointing at modules its forward uses?"
        )
    return captured[0]


@torch.no_grad()
def collect_statistics(
    model: nn.Module,
    modules: Sequence[nn.Module],
    images: torch.Tensor,
    batch_size: int,
    dtype: torch.dtype,
    reference: nn.Module | None = None,
    reference_modules: Sequence[nn.Module] = (),
) -> InputStatistics:
    """`InputStatistics` of the (shared) input of ``modules``, batch by batch over ``images``.

    With a ``reference`` (the float copy) each batch also runs there to the same layers, so the
    statistics hold GPTAQ's residual ``Σ (x_fp − x_q) x_qᵀ``.
    """
    device, _ = model_device_and_dtype(model)
    statistics = InputStatistics(modules[0].in_features, device, dtype, with_reference=reference is not None)
    for start in range(0, images.shape[0], batch_size):
        batch = images[start : start + batch_size]
        x_q = capture_input(model, modules, batch)
        x_fp = capture_input(reference, reference_modules, batch) if reference is not None else None
        statistics.add(x_q, x_fp)
    return statistics


@dataclass
class LayerInputs:
    """What the solves of one stage read: its input statistics, and the split an α search uses.

    ``fit`` (the Hessian and residual the α search solves with) and ``feedback`` (where it measures
    E(α)) are both ``statistics`` unless MARR's feedback is a held-out split of the calibration images.
    """

    statistics: InputStatistics
    fit: InputStatistics
    feedback: InputStatistics

    def __post_init__(self) -> None:
        self.hessian = self.statistics.hessian
        self.residual = self.statistics.residual if self.statistics.with_reference else None
        same = self.fit is self.statistics
        self.fit_hessian = self.hessian if same else self.fit.hessian
        self.fit_residual = self.residual if same or not self.fit.with_reference else self.fit.residual

    @property
    def split(self) -> bool:
        return self.fit is not self.statistics


# --- the engine --------------------------------------------------------------------------------------


@dataclass
class Stage:
    """One stage of one block: the activation sites to calibrate, then the linears to solve."""

    block: int
    index: int
    sites: list[ActivationSite] = field(default_factory=list)
    weights: list[WeightSite] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"block {self.block} {STAGE_NAMES[self.index] if self.index < NUM_STAGES else 'rest'}"


def plan_stages(
    sites: Sequence[ActivationSite], weights: Sequence[WeightSite], num_blocks: int
) -> list[Stage]:
    """Every block's stages in forward order; sites of unknown roles are calibrated at the block's end."""
    stages = [Stage(block, index) for block in range(num_blocks) for index in range(NUM_STAGES + 1)]
    for site in sites:
        if site.block is not None:
            stages[site.block * (NUM_STAGES + 1) + SITE_STAGES.get(site.role, NUM_STAGES)].sites.append(site)
    for weight in weights:
        if weight.block is not None:
            stages[weight.block * (NUM_STAGES + 1) + linear_stage(weight.role)].weights.append(weight)
    return [stage for stage in stages if stage.sites or stage.weights]


def progress_bar(total: int, description: str, enabled: bool):
    return tqdm(total=total, desc=description, unit="stage", disable=not enabled, leave=False)


def calibrate_sites(
    model: nn.Module,
    sites: Sequence[ActivationSite],
    activation_pipeline: Any,
    config: BaseQuantConfig,
    images: torch.Tensor | None,
    description: str,
) -> None:
    """Calibrate ``sites`` (in one sequential pass set) with the activation pipeline's observers.

    Sites the activation pipeline fixed before calibration (``state.preset``) are loaded instead.
    """
    state = quantization_state(model)
    observers = {
        site.name: activation_pipeline.observer(site, config)
        for site in load_presets(state, list(sites))
        if not is_float_bits(site.bits)
    }
    if not observers:
        return
    if images is None:
        raise ValueError(f"{description} needs calibration images to quantize activations.")
    calibrate(
        model,
        images,
        observers,
        state,
        batch_size=config.batch_size,
        sequential=True,
        progress=False,
        description=description,
    )


# --- the pipeline base ------------------------------------------------------------------------------


class ReconstructionPipeline(FakeQuantPipeline):
    """Base class: copy, reparameterize as the activation pipeline does, then calibrate and solve in order."""

    method: str = ""
    needs_reference: bool = False
    """Whether the solve needs each linear's float input (a second, float copy of the model)."""

    def __call__(
        self, model: nn.Module, config: GPTQConfig, calibration_images: torch.Tensor | None
    ) -> nn.Module:
        activation, activation_config = self.activation_pipeline(config), config.activation_config()
        settings = solver_settings(config)
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
        activation.before_weights(quantized, state, activation_config, calibration_images)
        reference = None
        if self.needs_reference and encoder:
            reference = prepare_fake_quant_copy(model, config)  # stays float: every quantizer passes through
            activation.before_weights(
                reference, quantization_state(reference), activation_config, calibration_images
            )
        with torch.no_grad():
            for site in state.weights:
                if site.block is None and not is_float_bits(site.bits):
                    weight = site.module.weight
                    weight.copy_(activation.quantize_weight(weight.detach(), site.bits, activation_config))
        label = f"{self.name} {config.label}"
        outer = [s for s in state.activations if s.block is None]
        calibrate_sites(
            quantized,
            [s for s in outer if s.group == 0],
            activation,
            activation_config,
            calibration_images,
            label,
        )
        stages = plan_stages(state.activations, encoder, len(state.blocks))
        rows: list[dict[str, Any]] = []
        with progress_bar(len(stages), label, config.progress) as bar:
            for stage in stages:
                bar.set_postfix_str(stage.name)
                calibrate_sites(
                    quantized, stage.sites, activation, activation_config, calibration_images, label
                )
                if stage.weights:
                    rows += self.solve_stage(
                        quantized, reference, stage, calibration_images, config, settings
                    )
                bar.update(1)
        calibrate_sites(
            quantized,
            [s for s in outer if s.group != 0],
            activation,
            activation_config,
            calibration_images,
            label,
        )
        del reference
        state.num_calibration = 0 if calibration_images is None else int(calibration_images.shape[0])
        object.__setattr__(quantized, RECONSTRUCTION_ATTRIBUTE, Table(rows))
        return quantized

    def check(self, config: GPTQConfig) -> None:
        """The activation method's own check (bits a runtime cannot run, …) before any row runs."""
        self.activation_pipeline(config).check(config.activation_config())

    @staticmethod
    def activation_pipeline(config: GPTQConfig) -> FakeQuantPipeline:
        """The pipeline of ``config.activations``: its observers, weight rounding and reparameterization."""
        pipeline = pipeline_for(config.activations)
        if not isinstance(pipeline, FakeQuantPipeline) or isinstance(pipeline, ReconstructionPipeline):
            raise ValueError(
                f"GPTQConfig.activations={type(config.activations).__name__}(...) must be a fake-quant "
                "activation method (e.g. PercentileConfig(), MinMaxConfig() or RepQConfig()), not a runtime or "
                "another reconstruction."
            )
        return pipeline

    @torch.no_grad()
    def solve_stage(
        self,
        quantized: nn.Module,
        reference: nn.Module | None,
        stage: Stage,
        images: torch.Tensor,
        config: GPTQConfig,
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

        holdout = config.holdout_fraction()
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
        clip_ratios = config.weight_clip_ratios if config.clip_search else (1.0,)
        rows = []
        for site in stage.weights:
            weight = site.module.weight
            grid = weight_grid(weight, site.bits, config.group_size, clip_ratios)
            solution, error, search = self.solve(weight.detach(), inputs, grid, config, settings, site.name)
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

    def solve(
        self,
        weight: torch.Tensor,
        inputs: LayerInputs,
        grid: WeightGrid,
        config: GPTQConfig,
        settings: SolverSettings,
        name: str,
    ) -> tuple[torch.Tensor, float, AlphaSearch | None]:
        """One linear: its quantized weight, its relative reconstruction error, and the α search (if any)."""
        raise NotImplementedError

    def quantize_weight(self, weight: torch.Tensor, bits: int, config: GPTQConfig) -> torch.Tensor:
        """Round-to-nearest as the activation method does (what encoder weights get without a solve)."""
        return self.activation_pipeline(config).quantize_weight(weight, bits, config.activation_config())

    def weight_scheme(self, site: WeightSite, config: GPTQConfig) -> str:
        """Encoder linears are solved on the symmetric grid; the others are the activation method's."""
        if site.block is not None and not is_float_bits(site.bits):
            return "symmetric"
        return self.activation_pipeline(config).weight_scheme(site, config.activation_config())

    def observer(self, site: ActivationSite, config: GPTQConfig) -> Observer:
        return self.activation_pipeline(config).observer(site, config.activation_config())


def solver_settings(config: GPTQConfig) -> SolverSettings:
    """The solver's settings (`hf_cd.quant.algorithms.gptq`) from ``config``."""
    return SolverSettings(
        percdamp=float(config.damp),
        block_size=config.block_size,
        act_order=config.act_order,
        dtype=getattr(torch, config.precision),
    )
