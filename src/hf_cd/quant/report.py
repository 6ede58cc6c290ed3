"""`quantization_report`: what each quantizer of a quantized copy ended up with, as a `Table`."""

from __future__ import annotations

from torch import nn

from hf_cd.quant.prepare import quantization_state
from hf_cd.quant.registry import pipeline_for
from hf_cd.table import Table


def quantization_report(model: nn.Module) -> Table:
    """One row per activation site (scheme, bits, scale range, zero-point) and per weight (bits).

    For debugging a bad result: which site is per-channel, which scale is suspiciously large.
    """
    state = quantization_state(model)
    rows = []
    for site in state.activations:
        quantizer = site.quantizer
        params = quantizer.params
        scale = None if params is None else params.scale.float()
        rows.append(
            {
                "kind": "activation",
                "site": site.name,
                "role": site.role,
                "block": site.block,
                "bits": site.bits,
                "scheme": params.scheme if params else "float",
                "scale_min": None if scale is None else scale.min().item(),
                "scale_max": None if scale is None else scale.max().item(),
                "zero_point": None
                if params is None or params.zero_point is None or params.per_channel
                else params.zero_point.item(),
            }
        )
    for site in state.weights:
        rows.append(
            {
                "kind": "weight",
                "site": site.name,
                "role": site.role,
                "block": site.block,
                "bits": site.bits,
                "scheme": pipeline_for(state.config).weight_scheme(site, state.config),
            }
        )
    return Table(rows)
