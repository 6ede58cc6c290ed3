"""RepQ-ViT's scale reparameterization: float function unchanged, per-channel ranges made equal."""

from __future__ import annotations

import pytest
import torch
from transformers import Dinov2ForImageClassification, ViTForImageClassification

from conftest import tiny_dinov2_config, tiny_vit_config
from hf_cd.architectures import resolve_blocks
from hf_cd.quant.algorithms.observers import PercentileObserver
from hf_cd.quant.algorithms.quantizers import asymmetric_params
from hf_cd.quant.algorithms.repq_reparam import fold_into_layernorm, layernorm_reparameterization


def _with_outlier_channels(model):
    """LayerNorms with uneven per-channel ranges and offsets, as trained ViTs have."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for block in resolve_blocks(model):
            for norm in (block.norm_before_attention, block.norm_before_ffn):
                width = norm.weight.shape[0]
                norm.weight.copy_(torch.rand(width, generator=generator) * 2 + 0.1)
                norm.bias.copy_(torch.randn(width, generator=generator))
                norm.weight[1] = 15.0  # an outlier channel
                norm.bias[2] = 6.0  # a channel far from zero
    return model.eval()


def _per_channel_params(norm, hidden_states, bits=4):
    observer = PercentileObserver(bits, (0.999, 0.9999, 0.99999), per_channel=True)
    output = norm(hidden_states)
    for pass_index in range(observer.num_passes):
        observer.begin_pass(pass_index, output.shape[0])
        observer.observe(output)
        observer.end_pass()
    return observer.params()


@pytest.mark.parametrize(
    "model_factory",
    [
        lambda: ViTForImageClassification(tiny_vit_config()),
        lambda: Dinov2ForImageClassification(tiny_dinov2_config(use_swiglu_ffn=True)),
    ],
    ids=["vit", "dinov2-swiglu"],
)
@torch.no_grad()
def test_folding_leaves_a_real_block_unchanged_in_float(model_factory):
    torch.manual_seed(0)
    model = _with_outlier_channels(model_factory())
    embeddings = model.base_model.embeddings(torch.randn(6, 1, 28, 28))
    block = resolve_blocks(model)[0]
    before = block.module(embeddings)
    for norm, consumers in (
        (block.norm_before_attention, (block.query, block.key, block.value)),
        (block.norm_before_ffn, block.ffn_inputs),
    ):
        params = _per_channel_params(norm, embeddings if norm is block.norm_before_attention else before)
        ratio, shift = layernorm_reparameterization(params.scale, params.zero_point)
        assert not torch.allclose(ratio, torch.ones_like(ratio))  # the fold is not a no-op
        fold_into_layernorm(norm, consumers, ratio, shift)
    after = block.module(embeddings)
    assert (after - before).norm() / before.norm() <= 1e-5


def test_reparameterization_maps_every_channel_range_onto_one_range():
    scale = torch.tensor([0.01, 0.2, 0.05, 1.3])
    zero_point = torch.tensor([3.0, 12.0, -40.0, 7.0])  # channel 2 lies far above zero
    ratio, shift = layernorm_reparameterization(scale, zero_point)
    bits = 4
    minimum = -zero_point * scale
    maximum = minimum + (2**bits - 1) * scale
    new_minimum, new_maximum = minimum / ratio - shift, maximum / ratio - shift
    assert torch.allclose(new_minimum, new_minimum[0].expand(4), atol=1e-6)
    assert torch.allclose(new_maximum, new_maximum[0].expand(4), atol=1e-6)
    assert torch.allclose(new_maximum - new_minimum, (2**bits - 1) * scale.mean().expand(4))
    target_scale, _ = asymmetric_params(new_minimum[0], new_maximum[0], bits, include_zero=False)
    assert torch.allclose(target_scale, scale.mean())
