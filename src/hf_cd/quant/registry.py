"""The pipeline registry: name → pipeline. Built-ins register themselves in `hf_cd.quant.pipelines`.

A pipeline is any callable ``pipeline(model, config, calibration_images) -> nn.Module`` that
returns a *new* model (the one passed in must not change) whose forward takes ``pixel_values``
and returns an output with ``.logits``. Fake-quant pipelines subclass
`hf_cd.quant.pipelines.base.FakeQuantPipeline`; a real runtime (e.g. ``onnxruntime-int8``) only has
to honour the call contract and set ``runtime``, so `evaluate_quantized` reports it in the same rows.

Optional hook: a pipeline with a method ``evaluate(model, config, calibration_images, eval_data)``
measures its own row (a real runtime times itself against its own float model, which a returned
module cannot); it returns `result_row`'s keyword arguments except ``pipeline``, ``runtime``,
``seed`` and ``reference_accuracy``. See `hf_cd.quant.runtimes`.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import nn


@runtime_checkable
class Pipeline(Protocol):
    name: str
    runtime: str
    """What executes the quantized model, reported in every result row: ``fake_quant`` for the
    built-ins (float kernels on quantized values), a runtime name for real integer backends."""

    def __call__(self, model: nn.Module, config, calibration_images: torch.Tensor | None) -> nn.Module: ...


class UnknownPipelineError(ValueError):
    """A pipeline name that is not registered; the message lists the registered ones."""


PIPELINES: dict[str, Pipeline] = {}


def register_pipeline(pipeline: Pipeline, *, overwrite: bool = False) -> Pipeline:
    """Make ``pipeline`` available as ``QuantConfig(pipeline=pipeline.name)``; returns it (decorator-friendly)."""
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
    if name not in PIPELINES:
        raise UnknownPipelineError(
            f"Unknown quantization pipeline {name!r}. Known pipelines: {', '.join(available_pipelines())}. "
            "Add one with hf_cd.quant.register_pipeline(...)."
        )
    return PIPELINES[name]
