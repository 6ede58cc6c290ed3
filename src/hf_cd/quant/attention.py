"""The attention function of fake-quantized copies, registered with transformers' `AttentionInterface`.

Only a copy made by `hf_cd.quant` names it in ``config._attn_implementation``; the user's model
keeps its own implementation. Registering adds a key to transformers' tables and changes none.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.masking_utils import AttentionMaskInterface, eager_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

ATTENTION_IMPLEMENTATION = "hf_cd_fake_quant"
QUANTIZERS_ATTRIBUTE = "matmul_quantizers"
"""Attribute of an attention module holding its `AttentionQuantizers`."""


def eager_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    quantizers=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager attention (as ViT's) with an optional quantizer on each matmul input."""
    if scaling is None:
        scaling = query.size(-1) ** -0.5
    if quantizers is not None:
        query, key, value = quantizers.query(query), quantizers.key(key), quantizers.value(value)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + attention_mask
    probs = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    probs = nn.functional.dropout(probs, p=dropout, training=module.training)
    if quantizers is not None:
        probs = quantizers.probs(probs)
    output = torch.matmul(probs, value).transpose(1, 2).contiguous()
    return output, probs


def fake_quant_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    quantizers = getattr(module, QUANTIZERS_ATTRIBUTE, None)
    if quantizers is None:
        raise RuntimeError(
            f"{type(module).__name__} runs the {ATTENTION_IMPLEMENTATION!r} attention but has no "
            f"`{QUANTIZERS_ATTRIBUTE}`: only models returned by hf_cd.quant.quantize use this implementation."
        )
    if quantizers.passthrough:
        original = ALL_ATTENTION_FUNCTIONS.get_interface(quantizers.fallback or "eager", None)
        if original is not None:
            return original(
                module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
            )
        return eager_attention(module, query, key, value, attention_mask, scaling, dropout)
    return eager_attention(module, query, key, value, attention_mask, scaling, dropout, quantizers)


def register_fake_quant_attention() -> str:
    """Register the attention function (and an eager-style mask for it); idempotent. Returns its name."""
    if AttentionInterface._global_mapping.get(ATTENTION_IMPLEMENTATION) is not fake_quant_attention:
        AttentionInterface.register(ATTENTION_IMPLEMENTATION, fake_quant_attention)
    if ATTENTION_IMPLEMENTATION not in AttentionMaskInterface._global_mapping:
        AttentionMaskInterface.register(ATTENTION_IMPLEMENTATION, eager_mask)
    return ATTENTION_IMPLEMENTATION
