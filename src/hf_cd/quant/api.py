"""`quantize`: the one verb. A new fake-quantized model; the one passed in never changes."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from hf_cd.quant.config import QuantConfig
from hf_cd.quant.inputs import check_pixel_values, select_calibration_images
from hf_cd.quant.prepare import check_quantizable
from hf_cd.quant.registry import get_pipeline


def quantize(model: nn.Module, config: QuantConfig | None = None, calib_data: Any = None) -> nn.Module:
    """Return a quantized copy of ``model`` (ViT / DeiT / Dinov2 from transformers).

    Args:
        model: the float model; left exactly as it is (weights, config, hooks, train/eval mode).
        config: bits, pipeline and calibration settings (`QuantConfig()` is W8A8 ``repq``).
        calib_data: calibration images: a ``pixel_values`` tensor, ``(pixel_values, labels)``, a
            DataLoader or list of batch dicts, or a ``datasets.Dataset`` with ``pixel_values``.
            ``config.num_calibration`` images are drawn from it with ``config.seed``. May be ``None``
            only when no activation is quantized (all activation bits ≥ 16).

    Returns:
        A copy on the same device, in eval mode, whose forward runs the quantized model; its
        quantizers and calibration details are in ``copy.hf_cd_quant`` (see `quantization_report`).
    """
    config = config or QuantConfig()
    if not isinstance(config, QuantConfig):
        raise TypeError(f"config must be a hf_cd.quant.QuantConfig, got {type(config).__name__}.")
    pipeline = get_pipeline(config.pipeline)
    check_quantizable(model)
    images = calibration_images_for(config, calib_data, model)
    return pipeline(model, config, images)


def calibration_images_for(
    config: QuantConfig, calib_data: Any, model: nn.Module | None = None
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
