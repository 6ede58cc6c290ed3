"""What a reconstruction pipeline did per encoder linear, and any quantized copy's per-linear error.

`reconstruction_report` reads the per-module `Table` a reconstruction pipeline (``gptq``, ``gptaq``,
``marr``, ``marr_grid``: `hf_cd.quant.pipelines.reconstruction`) leaves on its copy;
`measure_reconstruction_errors` measures any copy against the float model on held-out images.
"""

from __future__ import annotations

import torch
from torch import nn

from hf_cd.architectures import unwrap_model
from hf_cd.quant.calibration import forward_images
from hf_cd.quant.prepare import quantization_state
from hf_cd.table import Table

RECONSTRUCTION_ATTRIBUTE = "hf_cd_reconstruction"
"""Attribute of a copy made by a reconstruction pipeline holding its per-module `Table`."""


def reconstruction_report(model: nn.Module) -> Table:
    """Per encoder linear, what a reconstruction pipeline did: α, the α tried, and the errors.

    Columns: ``module``, ``block``, ``role``, ``method``, ``alpha`` (kept; ``None`` for GPTQ),
    ``error`` (relative reconstruction error on the calibration data at that α), ``error_alpha_0``
    (GPTQ's solution on the same inputs, where a float reference exists), ``float_target`` (whether
    the error compares with the float layer on float inputs, or, for GPTQ, with ``W X_q``),
    ``alphas`` / ``errors`` (every α evaluated, in order) and ``tokens``.
    """
    table = getattr(unwrap_model(model), RECONSTRUCTION_ATTRIBUTE, None)
    if table is None:
        raise ValueError(
            "This model was not made by a reconstruction pipeline (gptq, gptaq, marr, marr_grid)."
        )
    return table


@torch.no_grad()
def measure_reconstruction_errors(
    float_model: nn.Module, quantized_model: nn.Module, images: torch.Tensor, batch_size: int = 32
) -> Table:
    """``‖Y_q − Y_fp‖_F / ‖Y_fp − b‖_F`` of every encoder linear, summed over ``images``, for any pipeline.

    ``Y_fp`` is the linear's output in ``float_model`` and ``Y_q`` in the quantized copy (both on
    their own inputs), so this is the error MARR controls (``‖W_q X_q − W X_fp‖ / ‖W X_fp‖``)
    measured on held-out images; a reparameterized copy (RepQ) compares the same way, its outputs
    being the float model's in float.
    """
    state = quantization_state(quantized_model)
    float_model = unwrap_model(float_model)
    float_modules = dict(float_model.named_modules())
    quantized_modules = dict(unwrap_model(quantized_model).named_modules())
    sites = [site for site in state.weights if site.block is not None]
    error = {site.name: 0.0 for site in sites}
    norm = {site.name: 0.0 for site in sites}
    reference: dict[str, torch.Tensor] = {}

    def keep(name: str):
        def hook(module, args, output):
            bias = module.bias if module.bias is not None else 0.0
            reference[name] = output.detach()
            norm[name] += float((output.detach().double() - bias).square().sum())

        return hook

    def compare(name: str):
        def hook(module, args, output):
            error[name] += float((output.detach().double() - reference.pop(name).double()).square().sum())

        return hook

    modes = {m: m.training for model in (float_model, quantized_model) for m in model.modules()}
    handles = []
    try:
        float_model.eval()
        quantized_model.eval()
        for site in sites:
            handles.append(float_modules[site.name].register_forward_hook(keep(site.name)))
            handles.append(quantized_modules[site.name].register_forward_hook(compare(site.name)))
        for start in range(0, images.shape[0], batch_size):
            batch = images[start : start + batch_size]
            forward_images(float_model, batch)
            forward_images(quantized_model, batch)
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes.items():
            module.training = training
    rows = [
        {
            "module": site.name,
            "block": site.block,
            "role": site.role,
            "error": (error[site.name] ** 0.5) / max(norm[site.name] ** 0.5, 1e-30),
        }
        for site in sites
    ]
    return Table(rows)
