"""The `Pipeline` base class, and the registry that maps a config type to the pipeline that runs it.

``quantize(model, RepQConfig(...), images)`` runs the pipeline registered for ``RepQConfig``
(torchao's handler per config type). A user adds a method with a frozen config subclassing
`BaseQuantConfig` (its ``name`` is its CLI / YAML spelling) and a `Pipeline`::

    register_handler(MyConfig, MyPipeline())

A pipeline is called as ``pipeline(model, config, calibration_images) -> nn.Module`` and returns a
*new* model (the one passed in must not change) whose forward takes ``pixel_values`` and returns an
output with ``.logits``. Fake-quant pipelines subclass `hf_cd.quant.pipelines.base.FakeQuantPipeline`;
a real runtime also overrides `Pipeline.evaluate`, so `evaluate_quantized` reports it in the same rows.

``register_pipeline`` / ``get_pipeline`` (by name) serve the deprecated ``QuantConfig(pipeline=...)``.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from hf_cd.deprecation import warn_deprecated
from hf_cd.quant.algorithms.quantizers import is_float_bits
from hf_cd.quant.config import BaseQuantConfig


class Pipeline:
    """What every pipeline declares; the defaults are a fake-quant pipeline's."""

    name: str = ""
    runtime: str = "fake_quant"
    """What executes the quantized model, reported in every result row: ``fake_quant`` for the
    built-ins (float kernels on quantized values), a runtime name for real integer backends."""
    description: str = ""
    qat_init: bool = False
    """Whether `hf_cd.quant.qat` can start from this pipeline (its weights lie on a per-row grid it exposes)."""

    def __call__(
        self, model: nn.Module, config: BaseQuantConfig, calibration_images: torch.Tensor | None
    ) -> nn.Module:
        raise NotImplementedError

    def check(self, config: BaseQuantConfig) -> None:
        """Refuse, before any work, what this pipeline cannot run (bits, a runtime missing); none here.

        The config validated its own fields; `evaluate_quantized` checks every row first.
        """

    def row_fields(self, config: BaseQuantConfig) -> dict[str, Any]:
        """Keys every result row of this pipeline adds (`hf_cd.quant.results`): at least ``activation_mode``."""
        return {"activation_mode": "static_per_tensor"}

    def weight_scheme(self, site: Any, config: BaseQuantConfig) -> str:
        """How ``site``'s weight is quantized (`quantization_report`): ``symmetric`` unless a pipeline says otherwise."""
        return "float" if is_float_bits(site.bits) else "symmetric"

    def evaluate(
        self,
        model: nn.Module,
        config: BaseQuantConfig,
        calibration_images: torch.Tensor | None,
        eval_data: Any,
    ) -> dict[str, Any] | None:
        """Measure this pipeline's row itself, or ``None`` to let `evaluate_quantized` run the returned model.

        A real runtime times itself against its own float model, which a returned module cannot; it
        returns `result_row`'s keyword arguments except ``pipeline``, ``runtime``, ``seed`` and
        ``reference_accuracy``.
        """
        return None

    def runtime_for(self, config: BaseQuantConfig) -> str:
        """The ``runtime`` a result row of ``config`` records (this pipeline's)."""
        return self.runtime

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


class UnknownPipelineError(ValueError):
    """A method name or config type that is not registered; the message lists the registered ones."""


HANDLERS: dict[type, Pipeline] = {}
"""Config type → the pipeline that runs it."""
SPELLINGS: dict[str, Callable[..., BaseQuantConfig]] = {}
"""Name as the CLI / YAML spell it → the config factory (``rotate_gptaq`` → ``RotateConfig(solver=GPTAQConfig())``)."""
PIPELINES: dict[str, Pipeline] = {}
"""Name → pipeline: every registered name (the deprecated ``QuantConfig(pipeline=name)`` reads it)."""


def register_handler(
    config_type: type,
    pipeline: Pipeline,
    *,
    names: dict[str, Callable[..., BaseQuantConfig]] | None = None,
    overwrite: bool = False,
) -> Pipeline:
    """Run ``pipeline`` for configs of ``config_type``; ``names`` (default ``{config_type.name: config_type}``)
    are the spellings ``parse_quant_spec`` accepts for it. Returns the pipeline."""
    if not (isinstance(config_type, type) and issubclass(config_type, BaseQuantConfig)):
        raise TypeError(f"config_type must be a subclass of BaseQuantConfig, got {config_type!r}.")
    if not isinstance(pipeline, Pipeline):
        raise TypeError(
            f"The handler of {config_type.__name__} must be a hf_cd.quant.Pipeline, got {pipeline!r}."
        )
    if names is None:
        name = config_type.__dict__.get("name")
        if not isinstance(name, str) or not name:
            raise ValueError(
                f"{config_type.__name__} needs a class attribute `name` (its CLI spelling), or pass names=."
            )
        names = {name: config_type}
    if not overwrite:
        taken = [n for n in names if n in SPELLINGS and PIPELINES.get(n) is not pipeline]
        if (config_type in HANDLERS and HANDLERS[config_type] is not pipeline) or taken:
            raise ValueError(
                f"{config_type.__name__} or the name {', '.join(taken) or config_type.__name__!r} is already "
                "registered; pass overwrite=True to replace it."
            )
    HANDLERS[config_type] = pipeline
    for name, factory in names.items():
        SPELLINGS[name] = factory
        PIPELINES[name] = pipeline
    return pipeline


def pipeline_for(config: BaseQuantConfig) -> Pipeline:
    """The pipeline registered for ``type(config)`` (or its nearest registered base class)."""
    for klass in type(config).__mro__:
        if klass in HANDLERS:
            return HANDLERS[klass]
    if type(config) is BaseQuantConfig:
        raise UnknownPipelineError(
            "BaseQuantConfig holds the shared settings only: pick a method, e.g. RepQConfig(...), "
            f"PercentileConfig(...) or RotateConfig(...) (registered: {', '.join(available_pipelines())})."
        )
    raise UnknownPipelineError(
        f"No pipeline is registered for {type(config).__name__}; add one with "
        "hf_cd.quant.register_handler(ConfigType, pipeline)."
    )


def register_pipeline(pipeline: Pipeline, *, overwrite: bool = False) -> Pipeline:
    """Deprecated: register ``pipeline`` by its name, for ``QuantConfig(pipeline=name)``; use `register_handler`."""
    warn_deprecated("register_pipeline(pipeline)", "register_handler(ConfigType, pipeline)", "hf_cd.quant")
    name = getattr(pipeline, "name", None)
    if not isinstance(name, str) or not name:
        raise ValueError(f"A pipeline needs a non-empty string `name`, got {name!r}.")
    if name in PIPELINES and not overwrite and PIPELINES[name] is not pipeline:
        raise ValueError(
            f"A pipeline named {name!r} is already registered; pass overwrite=True to replace it."
        )
    if not callable(pipeline):
        raise TypeError(f"Pipeline {name!r} must be callable as pipeline(model, config, calibration_images).")
    PIPELINES[name] = pipeline
    return pipeline


def available_pipelines(runtime: str | None = None) -> list[str]:
    """Registered names, sorted; ``runtime="fake_quant"`` lists only the simulated ones (any bits, any device)."""
    return sorted(name for name, pipeline in PIPELINES.items() if runtime in (None, pipeline.runtime))


def get_pipeline(name: str) -> Pipeline:
    """The pipeline registered under ``name`` (raises `UnknownPipelineError`, listing them, with a did-you-mean)."""
    if name not in PIPELINES:
        close = difflib.get_close_matches(str(name), list(PIPELINES), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise UnknownPipelineError(
            f"Unknown quantization pipeline {name!r}.{hint} Known pipelines: {', '.join(available_pipelines())}. "
            "Add one with hf_cd.quant.register_handler(ConfigType, pipeline)."
        )
    return PIPELINES[name]
