"""Quantization-aware training (QAT) with learned step sizes (LSQ, Esser et al. 2019), started from PTQ.

Why LSQ and no new dependency: LSQ is what the ViT QAT papers build on (Q-ViT, OFQ, GPLQ), it learns
the activation step sizes too, and it is one autograd function on top of the PTQ arithmetic that
`hf_cd.quant.algorithms.quantizers` already has; torchao's QAT is GPU-oriented and has no learned activation
steps. What is quantized, at which bits, is exactly what PTQ quantizes: the copy is made by the same
`prepare_fake_quant_copy` and calibrated by a registered pipeline (``percentile`` by default), whose
ranges become the initial step sizes::

    from hf_cd.quant import PercentileConfig, QATConfig, prepare_qat, convert

    qat = prepare_qat(model, QATConfig(PercentileConfig(w_bits=4, a_bits=4)), calib)
    ...train qat (CDTrainer with CDConfig(qat_bits="W4A4") does this itself)...
    deployable = convert(qat)  # the form `quantize` returns: save it with `save_quantized`

* Weights: per output row (per tensor for ``per_tensor``) with the pipeline's scheme, symmetric or
  asymmetric with its zero-point kept fixed; the float weights stay the trained parameters (the
  *latent* weights, which CD decays), rounded on every forward.
* Activations: per tensor as the pipeline calibrated them; asymmetric and symmetric step sizes are
  learned (zero-points stay), log√2 and dynamic per-token sites are applied with a straight-through
  gradient and nothing learned.
* Gradients: the straight-through estimator for the rounded tensor (zero where clipped), LSQ's
  gradient for the step size, scaled by ``1 / sqrt(N · Q_P)`` (N values share the step: a weight
  row's length, an activation's values per image; Q_P the largest positive code).

The forward of a learned quantizer is the PTQ forward (`fake_quantize_asymmetric` /
`fake_quantize_symmetric`) bit for bit; only the backward is LSQ's.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hf_cd.architectures import UnsupportedArchitectureError, unwrap_model
from hf_cd.quant.algorithms.params import QuantParams, fake_quantize
from hf_cd.quant.algorithms.quantizers import (
    asymmetric_range,
    fake_quantize_asymmetric,
    fake_quantize_symmetric,
    is_float_bits,
    symmetric_range,
)
from hf_cd.quant.api import calibration_images_for
from hf_cd.quant.config import BaseQuantConfig, parse_bits
from hf_cd.quant.fake_quant import ActivationQuantizer
from hf_cd.quant.method_configs import PercentileConfig
from hf_cd.quant.prepare import (
    QuantizationState,
    check_quantizable,
    prepare_fake_quant_copy,
    quantization_state,
)
from hf_cd.quant.registry import SPELLINGS, pipeline_for
from hf_cd.quant.spec import config_to_dict, parse_quant_spec, to_typed

QAT_ATTRIBUTE = "hf_cd_qat"
"""Attribute of a model returned by `prepare_qat` holding its `QATConfig`."""

LEARNED_SCHEMES = ("asymmetric", "symmetric")
"""Schemes whose step size LSQ learns; the others pass gradients straight through and learn nothing."""


def qat_init_pipelines() -> list[str]:
    """Registered pipelines a QAT run can start from (round-to-nearest grids, the model's own modules)."""
    return sorted(name for name, factory in SPELLINGS.items() if pipeline_for(factory()).qat_init)


@dataclass(frozen=True)
class QATConfig:
    """What `prepare_qat` quantizes and how it starts.

    ``init`` is a PTQ method's config (e.g. ``PercentileConfig(w_bits=4, a_bits=4)``): its bits and protocol fix the quantized sites and widths (the
    same as that PTQ row's), its pipeline calibrates the initial step sizes on the calibration images.
    """

    init: BaseQuantConfig = field(default_factory=lambda: PercentileConfig(w_bits=4, a_bits=4))
    learn_weight_steps: bool = True
    learn_activation_steps: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.init, BaseQuantConfig):
            raise TypeError(
                f"QATConfig.init must be a method's config (e.g. PercentileConfig(...)), got {type(self.init).__name__}."
            )
        object.__setattr__(self, "init", to_typed(self.init))
        if not pipeline_for(self.init).qat_init:
            raise ValueError(
                f"QAT cannot start from pipeline {self.init.name!r} (it rotates the model or solves its "
                f"weights instead of rounding them to a grid); use one of {', '.join(qat_init_pipelines())}."
            )
        if is_float_bits(self.init.w_bits) and is_float_bits(self.init.a_bits):
            raise ValueError(
                f"QAT at {self.init.label} quantizes nothing in the encoder: give weight or activation bits in 2..8."
            )

    @classmethod
    def from_bits(cls, bits: Any, init: str = "percentile", **quant_config: Any) -> QATConfig:
        """``QATConfig.from_bits("W4A4", init="repq", num_calibration=64)``: bits as the recipe spells them."""
        w_bits, a_bits = parse_bits(bits)
        extra = quant_config.pop("extra", None)
        return cls(parse_quant_spec(init, w_bits=w_bits, a_bits=a_bits, extra=extra, **quant_config))

    @property
    def label(self) -> str:
        return self.init.label

    def to_dict(self) -> dict[str, Any]:
        return {
            "init": config_to_dict(self.init),
            "learn_weight_steps": self.learn_weight_steps,
            "learn_activation_steps": self.learn_activation_steps,
        }


# --- the arithmetic -------------------------------------------------------------------------------


def _sum_to(gradient: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Sum a broadcast gradient back to the shape of ``like`` (a scalar, ``(C,)`` or ``(C, 1)``)."""
    if like.ndim == 0:
        return gradient.sum()
    return gradient.sum_to_size(like.shape)


class _LearnedStepFakeQuantize(torch.autograd.Function):
    """PTQ's fake quantization forward; the straight-through and LSQ gradients backward."""

    @staticmethod
    def forward(ctx, x, scale, zero_point, bits: int, symmetric: bool, grad_scale: float):
        if symmetric:
            out = fake_quantize_symmetric(x, scale, bits)
        else:
            out = fake_quantize_asymmetric(x, scale, zero_point, bits)
        ctx.save_for_backward(x, scale, zero_point if zero_point is not None else torch.zeros(()))
        ctx.bits, ctx.symmetric, ctx.grad_scale = bits, symmetric, grad_scale
        return out

    @staticmethod
    def backward(ctx, grad_output):
        x, scale, zero_point = ctx.saved_tensors
        low, high = symmetric_range(ctx.bits) if ctx.symmetric else asymmetric_range(ctx.bits)
        values = x.float() / scale
        rounded = torch.round(values)
        codes = rounded + zero_point
        below, above = codes < low, codes > high
        inside = ~(below | above)
        grad = grad_output.float()
        grad_x = (grad * inside).to(x.dtype)
        step = torch.where(below, low - zero_point, torch.where(above, high - zero_point, rounded - values))
        grad_scale = _sum_to(grad * step, scale) * ctx.grad_scale
        return grad_x, grad_scale.to(scale.dtype), None, None, None, None


class _StraightThrough(torch.autograd.Function):
    """A fixed quantizer (log√2, dynamic per token): its forward, and the identity backward."""

    @staticmethod
    def forward(ctx, x, scheme: str, bits: int, scale, zero_point):
        return fake_quantize(x, scheme, bits, scale, zero_point)

    @staticmethod
    def backward(ctx, grad_output):
        return grad_output, None, None, None, None


def largest_positive_code(scheme: str, bits: int) -> int:
    """LSQ's Q_P: the largest code of the integer range."""
    return (symmetric_range(bits) if scheme == "symmetric" else asymmetric_range(bits))[1]


def lsq_fake_quantize(
    x: torch.Tensor, params: QuantParams, scale: torch.Tensor, values_per_step: int
) -> torch.Tensor:
    """``params.apply(x)`` with ``scale`` as the step size, differentiable in ``x`` and ``scale`` (LSQ)."""
    grad_scale = (values_per_step * largest_positive_code(params.scheme, params.bits)) ** -0.5
    return _LearnedStepFakeQuantize.apply(
        x, scale, params.zero_point, params.bits, params.scheme == "symmetric", grad_scale
    )


# --- modules --------------------------------------------------------------------------------------


class LearnedWeightQuantizer(nn.Module):
    """The grid of one weight: a learned step per output row (``scale``, ``(C, 1)``) and a fixed zero-point."""

    def __init__(self, params: QuantParams, learn: bool = True) -> None:
        super().__init__()
        self.scheme, self.bits = params.scheme, params.bits
        scale = params.scale.detach().clone().float()
        if learn:
            self.scale = nn.Parameter(scale)
        else:
            self.register_buffer("scale", scale)
        zero_point = None if params.zero_point is None else params.zero_point.detach().clone().float()
        self.register_buffer("zero_point", zero_point)

    @property
    def params(self) -> QuantParams:
        return QuantParams(self.scheme, self.bits, self.scale.detach(), self.zero_point)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        rows = weight.reshape(weight.shape[0], -1)
        quantized = lsq_fake_quantize(rows, self.params, self.scale, rows.shape[1])
        return quantized.reshape(weight.shape)

    def extra_repr(self) -> str:
        return f"scheme={self.scheme}, bits={self.bits}, rows={self.scale.shape[0]}"


class QATLinear(nn.Linear):
    """`nn.Linear` whose forward uses its weight rounded by ``weight_quantizer`` (the class of a QAT linear)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.linear(input, self.weight_quantizer(self.weight), self.bias)


class QATConv2d(nn.Conv2d):
    """`nn.Conv2d` (the patch embedding) with its weight rounded by ``weight_quantizer``."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(input, self.weight_quantizer(self.weight), self.bias)


QAT_CLASSES: dict[type[nn.Module], type[nn.Module]] = {nn.Linear: QATLinear, nn.Conv2d: QATConv2d}
"""The module types whose weights QAT rounds, and the subclass each becomes (same parameters, so CD,
checkpoints and optimizers see the same ``weight``)."""


class LearnedActivationQuantizer(ActivationQuantizer):
    """An `ActivationQuantizer` whose step size is a parameter; what `prepare_qat` turns each calibrated one into."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode != "quantize":
            return super().forward(x)
        params = QuantParams(self.scheme, self.bits, self.scale.detach(), self.zero_point)
        if self.scheme in LEARNED_SCHEMES and isinstance(self.scale, nn.Parameter):
            values = x[0].numel() if x.ndim > 1 else x.numel()
            return lsq_fake_quantize(x, params, self.scale, values)
        return _StraightThrough.apply(x, self.scheme, self.bits, self.scale, self.zero_point)


def _learn_activation(quantizer: ActivationQuantizer, learn: bool) -> None:
    quantizer.__class__ = LearnedActivationQuantizer
    if learn and quantizer.scheme in LEARNED_SCHEMES:
        quantizer.scale = nn.Parameter(quantizer.scale.detach().clone().float())


# --- prepare / convert ----------------------------------------------------------------------------


def is_qat_model(model: nn.Module) -> bool:
    return hasattr(unwrap_model(model), QAT_ATTRIBUTE)


def qat_config(model: nn.Module) -> QATConfig:
    config = getattr(unwrap_model(model), QAT_ATTRIBUTE, None)
    if config is None:
        raise ValueError("This model was not returned by hf_cd.quant.prepare_qat (it has no QAT state).")
    return config


def check_qat_model(model: nn.Module) -> None:
    """One-line errors before any work: LoRA, an already prepared model, a model without supported linears."""
    if hasattr(model, "peft_config"):
        raise ValueError(
            "QAT with LoRA is not supported: the quantized weight would be W0 + B·A, which LoRA keeps apart. "
            "Merge the adapter first (model.merge_and_unload()) or fine-tune all weights (no --use_lora)."
        )
    if is_qat_model(model):
        raise ValueError("This model is already prepared for QAT; pass the float model to prepare_qat.")
    try:
        check_quantizable(model)
    except UnsupportedArchitectureError as error:
        raise UnsupportedArchitectureError(f"QAT needs supported linears: {error}") from error


def prepare_qat(model: nn.Module, config: QATConfig | None = None, calib_data: Any = None) -> nn.Module:
    """A copy of ``model`` for QAT: PTQ's sites and bits, step sizes calibrated by ``config.init``'s pipeline.

    ``model`` is left as it is. The copy is in ``model``'s train/eval mode; its forward at the initial
    step sizes is the PTQ copy's (`hf_cd.quant.quantize` with ``config.init``) on the latent weights.
    """
    config = config or QATConfig()
    if not isinstance(config, QATConfig):
        raise TypeError(f"config must be a hf_cd.quant.QATConfig, got {type(config).__name__}.")
    check_qat_model(model)
    init = config.init
    images = calibration_images_for(init, calib_data, model)
    pipeline = pipeline_for(init)
    pipeline.check(init)

    quantized = prepare_fake_quant_copy(model, init)
    state = quantization_state(quantized)
    for site in state.weights:
        if not is_float_bits(site.bits) and type(site.module) not in QAT_CLASSES:
            raise UnsupportedArchitectureError(
                f"QAT rounds nn.Linear and nn.Conv2d weights only; {site.name} is a {type(site.module).__name__}."
            )
    pipeline.before_weights(quantized, state, init, images)
    latent, grids = {}, {}
    for site in state.weights:
        if not is_float_bits(site.bits):
            weight = site.module.weight.detach()
            latent[site.name] = weight.clone()
            grids[site.name] = pipeline.weight_params(weight, site.bits, init)
    pipeline.quantize_weights(state, init)
    pipeline.calibrate_activations(quantized, state, init, images)

    with torch.no_grad():
        for site in state.weights:
            if site.name in latent:
                site.module.weight.copy_(latent[site.name])
                site.module.__class__ = QAT_CLASSES[type(site.module)]
                site.module.weight_quantizer = LearnedWeightQuantizer(
                    grids[site.name], config.learn_weight_steps
                ).to(site.module.weight.device)
    for site in state.activations:
        if site.quantizer.mode == "quantize":
            _learn_activation(site.quantizer, config.learn_activation_steps)
    object.__setattr__(quantized, QAT_ATTRIBUTE, config)
    return quantized.train(model.training)


def step_size_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The learned step sizes of a QAT model (its own optimizer group: no weight decay, their own rate)."""
    return [
        module.scale
        for module in unwrap_model(model).modules()
        if isinstance(module, (LearnedWeightQuantizer, LearnedActivationQuantizer))
        and isinstance(module.scale, nn.Parameter)
    ]


def qat_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The QAT tensors (step sizes, zero-points) by their names in ``model``: what a checkpoint adds to the weights."""
    model = unwrap_model(model)
    quantizers = {
        name
        for name, module in model.named_modules()
        if isinstance(module, (LearnedWeightQuantizer, ActivationQuantizer))
    }
    return {
        name: tensor.detach()
        for name, tensor in model.state_dict().items()
        if name.rsplit(".", 1)[0] in quantizers
    }


@contextlib.contextmanager
def _rng_untouched() -> Iterator[None]:
    """Building a model draws random initial weights: keep the run's random stream where it was."""
    with torch.random.fork_rng(devices=[]):
        yield


def float_model(model: nn.Module) -> nn.Module:
    """A plain transformers model (its own attention, no quantizer) holding ``model``'s float weights.

    For a QAT model these are the latent weights; for a `quantize` / `convert` result, the rounded
    ones. Built fresh rather than deep-copied: a copy would keep hooks bound to the old quantizers.
    """
    source = unwrap_model(model)
    state: QuantizationState = quantization_state(source)
    config = copy.deepcopy(source.config)
    config._attn_implementation = state.original_attention
    with _rng_untouched():
        plain = type(source)(config)
    parameter = next(source.parameters())
    plain.to(device=parameter.device, dtype=parameter.dtype)
    quantizer_tensors = qat_state_dict(source)
    weights = {name: tensor for name, tensor in source.state_dict().items() if name not in quantizer_tensors}
    result = plain.load_state_dict(weights, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise RuntimeError(
            f"The float weights of this {type(source).__name__} do not fit a fresh one: missing "
            f"{result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}."
        )
    return plain.train(source.training)


def fake_quant_model(
    plain: nn.Module,
    config: BaseQuantConfig,
    activations: dict[str, QuantParams],
    num_calibration: int = 0,
) -> nn.Module:
    """The `quantize`-shaped copy of ``plain`` (weights already rounded) with ``activations`` loaded by site.

    What `convert` returns and what `hf_cd.quant.load_quantized` rebuilds from a saved folder.
    """
    quantized = prepare_fake_quant_copy(plain, config)
    state = quantization_state(quantized)
    for site in state.activations:
        if is_float_bits(site.bits):
            continue
        params = activations.get(site.name)
        if params is None:
            raise ValueError(
                f"No quantization parameters for activation site {site.name!r} ({site.bits} bits)."
            )
        site.quantizer.load(params)
    state.num_calibration = num_calibration
    return quantized


def convert(model: nn.Module) -> nn.Module:
    """The trained QAT model as `quantize` returns models: rounded weights, activation quantizers at the
    learned steps; its logits equal the QAT model's in eval mode. ``model`` is left as it is."""
    source = unwrap_model(model)
    config = qat_config(source)
    state = quantization_state(source)
    with torch.no_grad():
        plain = float_model(source)
        modules = dict(plain.named_modules())
        names = {module: name for name, module in source.named_modules()}
        for site in state.weights:
            quantizer = getattr(site.module, "weight_quantizer", None)
            if quantizer is not None:
                target = modules[names[site.module]].weight
                target.copy_(quantizer(site.module.weight.detach()))
    activations = {
        site.name: replace(site.quantizer.params, scale=site.quantizer.scale.detach().clone())
        for site in state.activations
        if site.quantizer.mode == "quantize"
    }
    converted = fake_quant_model(plain.eval(), config.init, activations, state.num_calibration)
    object.__setattr__(converted, "hf_cd_quant_method", "qat")
    return converted


def describe_steps(model: nn.Module) -> dict[str, Any]:
    """How many step sizes a QAT model learns and how many sites it quantizes, for logs and records."""
    source = unwrap_model(model)
    state = quantization_state(source)
    return {
        "weight_sites": sum(1 for s in state.weights if hasattr(s.module, "weight_quantizer")),
        "activation_sites": sum(1 for s in state.activations if s.quantizer.mode == "quantize"),
        "step_sizes": sum(p.numel() for p in step_size_parameters(source)),
    }


QAT_PIPELINE = "qat"
"""``pipeline`` of a QAT model's result row (beside the PTQ rows; ``qat_init`` names the pipeline it started from)."""


def qat_result_row(
    model: nn.Module,
    eval_data: Any,
    *,
    reference_accuracy: float | None = None,
    batch_size: int = 64,
    progress: bool = True,
    **extra: Any,
) -> dict[str, Any]:
    """The result row (`hf_cd.quant.results`) of a trained QAT model: its `convert` form, evaluated.

    ``model`` is a QAT model or its `convert` result; ``extra`` adds keys (e.g. the steps trained).
    """
    import time

    from hf_cd.quant.evaluate import evaluate_accuracy
    from hf_cd.quant.results import result_row

    started = time.perf_counter()
    converted = model if not is_qat_model(model) else convert(model)
    convert_seconds = time.perf_counter() - started
    state = quantization_state(converted)
    init = state.config
    started = time.perf_counter()
    accuracy, count = evaluate_accuracy(
        converted, eval_data, batch_size, progress, description=f"{QAT_PIPELINE} {init.label} eval"
    )
    return result_row(
        pipeline=QAT_PIPELINE,
        runtime="fake_quant",
        w_bits=init.w_bits,
        a_bits=init.a_bits,
        embedding_bits=init.embedding_weight_bits,
        classifier_bits=init.classifier_weight_bits,
        protocol=init.protocol,
        accuracy=accuracy,
        num_eval=count,
        num_calibration=state.num_calibration,
        seed=init.seed,
        quantize_seconds=convert_seconds,
        eval_seconds=time.perf_counter() - started,
        reference_accuracy=reference_accuracy,
        qat_init=init.name,
        **{**pipeline_for(init).row_fields(init), **extra},
    )
