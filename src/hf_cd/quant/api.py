"""`quantize`: the one verb. A new quantized model; the one passed in never changes."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from hf_cd.quant.config import BaseQuantConfig
from hf_cd.quant.inputs import check_pixel_values, select_calibration_images
from hf_cd.quant.method_configs import RepQConfig
from hf_cd.quant.prepare import check_quantizable
from hf_cd.quant.registry import pipeline_for
from hf_cd.quant.spec import to_typed


def quantize(model: nn.Module, config: BaseQuantConfig | None = None, calib_data: Any = None) -> nn.Module:
    """Return a quantized copy of ``model`` (ViT / DeiT / Dinov2 from transformers).

    Args:
        model: the float model; left exactly as it is (weights, config, hooks, train/eval mode).
        config: the method and its settings, e.g. ``RepQConfig(w_bits=4, a_bits=4)`` or
            ``RotateConfig(solver=GPTAQConfig())`` (``None`` is W8A8 ``RepQConfig()``); the pipeline
            registered for its type runs (`register_handler`).
        calib_data: calibration images: a ``pixel_values`` tensor, ``(pixel_values, labels)``, a
            DataLoader or list of batch dicts, or a ``datasets.Dataset`` with ``pixel_values``.
            ``config.num_calibration`` images are drawn from it with ``config.seed``. May be ``None``
            only when no activation is quantized (all activation bits ≥ 16).

    Returns:
        A copy on the same device, in eval mode, whose forward runs the quantized model; its
        quantizers and calibration details are in ``copy.hf_cd_quant`` (see `quantization_report`).
    """
    config = RepQConfig() if config is None else config
    if not isinstance(config, BaseQuantConfig):
        raise TypeError(
            f"config must be a method's config (e.g. hf_cd.quant.RepQConfig(...)), got {type(config).__name__}."
        )
    config = to_typed(config)
    pipeline = pipeline_for(config)
    check_quantizable(model)
    images = calibration_images_for(config, calib_data, model)
    return pipeline(model, config, images)


def calibration_images_for(
    config: BaseQuantConfig, calib_data: Any, model: nn.Module | None = None
) -> torch.Tensor | None:
    """The calibration images `quantize` uses for ``config`` (``None`` when nothing needs them).

    With ``model``, they are checked against it first (`check_pixel_values`: dtype, layout, size, range).
    """
    if calib_data is None and not config.quantizes_activations:
        return None
    if calib_data is None:
        raise ValueError(
            f"Quantizing activations ({config.label}, embedding input {config.embedding_input_bits} bits, "
            f"classifier input {config.classifier_input_bits} bits) needs calibration data: pass "
            "calib_data=... (e.g. 32 training images)."
        )
    images = select_calibration_images(calib_data, config.num_calibration, config.seed, config.batch_size)
    if model is not None:
        check_pixel_values(images, model, "Calibration images")
    return images
