"""Non-finite numbers are errors, never results: one check of a model's weights for every command.

Why one check: a NaN weight makes every output NaN, and each consumer then fails its own way or
not at all. Quantization reports chance-level rows, the ONNX export writes a NaN graph, and
diagnostics crash inside an SVD. Quantization, export, the recipe and `CDTrainer` call
`require_finite_weights` before any work, so they all raise the same `NonFiniteWeightsError`, which
names the parameters.
"""

from __future__ import annotations

import torch
from torch import nn

from hf_cd.architectures import unwrap_model
from hf_cd.cd.decay import NonFiniteWeightsError

__all__ = ["NonFiniteWeightsError", "non_finite_parameters", "require_finite_weights"]


def non_finite_parameters(model: nn.Module) -> dict[str, int]:
    """``{parameter name: number of NaN/Inf values}`` for every parameter that holds any (one sync if none)."""
    named = [
        (name, getattr(p, "_local_tensor", p).detach())
        for name, p in model.named_parameters()
        if p.is_floating_point()
    ]
    if not named:
        return {}
    norms = torch._foreach_norm([tensor.float() for _, tensor in named])
    if bool(torch.isfinite(torch.stack([n.float() for n in norms])).all()):
        return {}
    return {
        name: int((~torch.isfinite(tensor)).sum())
        for name, tensor in named
        if not bool(torch.isfinite(tensor).all())
    }


def require_finite_weights(model: nn.Module, when: str) -> None:
    """Raise `NonFiniteWeightsError` naming each parameter that holds NaN/Inf; ``when`` says what was about to run."""
    bad = non_finite_parameters(unwrap_model(model))
    if not bad:
        return
    listed = ", ".join(f"{name} ({count} non-finite values)" for name, count in list(bad.items())[:8])
    more = f" and {len(bad) - 8} more" if len(bad) > 8 else ""
    raise NonFiniteWeightsError(
        f"The model holds NaN/Inf {when}, in {len(bad)} parameter(s): {listed}{more}. They come from the weights "
        "it was loaded with (the checkpoint or the initialization): load another checkpoint, or re-initialize "
        "those parameters."
    )
