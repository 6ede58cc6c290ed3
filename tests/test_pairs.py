"""The architecture table and the pairs it yields, for ViT, DeiT and Dinov2 (GELU and SwiGLU)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import (
    DeiTConfig,
    DeiTForImageClassification,
    DeiTForImageClassificationWithTeacher,
    Dinov2ForImageClassification,
    ResNetConfig,
    ResNetForImageClassification,
    ViTForImageClassification,
    ViTModel,
)

from conftest import tiny_dinov2_config, tiny_vit_config
from hf_cd import PAIR_KINDS, UnsupportedArchitectureError, find_pairs
from hf_cd.cd.pairs import factor_heads, head_shapes


def _deit_config() -> DeiTConfig:
    vit = tiny_vit_config()
    return DeiTConfig(
        hidden_size=vit.hidden_size,
        num_hidden_layers=vit.num_hidden_layers,
        num_attention_heads=vit.num_attention_heads,
        intermediate_size=vit.intermediate_size,
        image_size=28,
        patch_size=7,
        num_channels=1,
        num_labels=10,
    )


MODELS = {
    "vit": lambda: ViTForImageClassification(tiny_vit_config()),
    "vit_base_model": lambda: ViTModel(tiny_vit_config()),
    "deit": lambda: DeiTForImageClassification(_deit_config()),
    "deit_distilled": lambda: DeiTForImageClassificationWithTeacher(_deit_config()),
    "dinov2": lambda: Dinov2ForImageClassification(tiny_dinov2_config()),
    "dinov2_swiglu": lambda: Dinov2ForImageClassification(tiny_dinov2_config(use_swiglu_ffn=True)),
}


@pytest.mark.parametrize("name", MODELS)
def test_every_kind_is_found_in_every_block(name):
    model = MODELS[name]()
    pairs = find_pairs(model, PAIR_KINDS)
    depth = model.config.num_hidden_layers
    ffn_per_block = 2 if name == "dinov2_swiglu" else 1
    counts = {kind: sum(p.kind == kind for p in pairs) for kind in PAIR_KINDS}
    assert counts == {
        "ffn": depth * ffn_per_block,
        "value_output": depth,
        "query_key": depth,
        "cross_norm": 2 * depth - 1,  # the last block's FFN feeds the final norm, not another block
    }
    params = dict(model.named_parameters())
    shapes = {n: p.shape for n, p in params.items()}
    for pair in pairs:  # every pair chains: A's output width is B's input width
        (r_a, _), (_, r_b) = head_shapes(pair, shapes)
        assert r_a == r_b, pair.name
    assert [p.block for p in pairs] == sorted(p.block for p in pairs)


def test_default_kinds_are_ffn_and_value_output():
    pairs = find_pairs(MODELS["vit"]())
    assert {p.kind for p in pairs} == {"ffn", "value_output"}
    assert pairs[0].a.params == ("vit.layers.0.mlp.fc1.weight",)
    assert pairs[0].b.params == ("vit.layers.0.mlp.fc2.weight",)


def test_swiglu_pairs_gate_and_up_with_down():
    pairs = find_pairs(MODELS["dinov2_swiglu"](), ["ffn"])
    block0 = [p for p in pairs if p.block == 0]
    assert [(p.a.params[0].rsplit(".", 2)[-2], p.b.params[0].rsplit(".", 2)[-2]) for p in block0] == [
        ("gate_proj", "down_proj"),
        ("up_proj", "down_proj"),
    ]


def test_value_output_heads_match_explicit_slicing():
    model = MODELS["vit"]()
    pair = next(p for p in find_pairs(model, ["value_output"]) if p.block == 1)
    tensors = {n: p.detach() for n, p in model.named_parameters()}
    a_heads = factor_heads(pair.a, pair.heads, tensors)
    b_heads = factor_heads(pair.b, pair.heads, tensors)
    attention = model.vit.layers[1].attention
    d = attention.head_dim
    for h in range(pair.heads):
        torch.testing.assert_close(
            a_heads[h], attention.v_proj.weight[h * d : (h + 1) * d, :], rtol=0, atol=0
        )
        torch.testing.assert_close(
            b_heads[h], attention.o_proj.weight[:, h * d : (h + 1) * d], rtol=0, atol=0
        )


def test_query_key_heads_give_the_logit_bilinear_form():
    model = MODELS["vit"]()
    pair = next(p for p in find_pairs(model, ["query_key"]) if p.block == 0)
    tensors = {n: p.detach() for n, p in model.named_parameters()}
    a_heads, b_heads = factor_heads(pair.a, pair.heads, tensors), factor_heads(pair.b, pair.heads, tensors)
    attention = model.vit.layers[0].attention
    d = attention.head_dim
    x = torch.randn(5, attention.q_proj.in_features)
    for h in range(pair.heads):
        q = x @ attention.q_proj.weight[h * d : (h + 1) * d].T
        k = x @ attention.k_proj.weight[h * d : (h + 1) * d].T
        torch.testing.assert_close(x @ (b_heads[h] @ a_heads[h]) @ x.T, q @ k.T, rtol=1e-5, atol=1e-5)


def test_cross_norm_folds_the_layernorm_gamma_into_the_reader():
    model = MODELS["vit"]()
    with torch.no_grad():
        model.vit.layers[0].layernorm_after.weight.uniform_(0.5, 2.0)
    pair = next(p for p in find_pairs(model, ["cross_norm"]) if p.name.endswith("attention_to_ffn"))
    tensors = {n: p.detach() for n, p in model.named_parameters()}
    b = factor_heads(pair.b, 1, tensors)[0]
    layer = model.vit.layers[0]
    torch.testing.assert_close(b, layer.mlp.fc1.weight * layer.layernorm_after.weight, rtol=0, atol=0)


def test_layer_scale_folding_is_opt_in():
    model = MODELS["dinov2"]()
    plain = find_pairs(model, ["ffn"])[0]
    folded = find_pairs(model, ["ffn"], fold_layer_scale=True)[0]
    assert plain.b.row_scale is None
    assert folded.b.row_scale == "dinov2.encoder.layer.0.layer_scale2.lambda1"


def test_unsupported_model_lists_architectures_and_shows_how_to_pass_pairs():
    model = ResNetForImageClassification(
        ResNetConfig(num_channels=1, embedding_size=8, hidden_sizes=[8], depths=[1])
    )
    with pytest.raises(UnsupportedArchitectureError) as error:
        find_pairs(model)
    message = str(error.value)
    assert "resnet" in message and "vit" in message and "dinov2" in message and "deit" in message
    assert "pairs=" in message


class TwoLayerMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(6, 12), nn.GELU(), nn.Linear(12, 6)) for _ in range(2)
        )


def test_explicit_pairs_for_any_model_by_module_or_parameter_name():
    model = TwoLayerMLP()
    pairs = find_pairs(model, pairs=["blocks.0.0:blocks.0.2", ("blocks.1.0.weight", "blocks.1.2")])
    assert [(p.a.params, p.b.params) for p in pairs] == [
        (("blocks.0.0.weight",), ("blocks.0.2.weight",)),
        (("blocks.1.0.weight",), ("blocks.1.2.weight",)),
    ]


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ("blocks.0.0:blocks.1.0", "does not chain"),
        ("blocks.0.0:blocks.9.2", "neither a parameter nor a module"),
        ("blocks.0.0", "in_module:out_module"),
    ],
)
def test_bad_explicit_pairs_are_explained(spec, needle):
    with pytest.raises(ValueError, match=needle):
        find_pairs(TwoLayerMLP(), pairs=[spec])


def test_unknown_kind_is_rejected():
    with pytest.raises(ValueError, match="query_key"):
        find_pairs(MODELS["vit"](), ["ffn", "attention"])


def test_fold_norm_scales_the_columns_of_a_by_the_layernorm_gamma():
    model = MODELS["vit"]()
    with torch.no_grad():
        model.vit.layers[0].layernorm_after.weight.uniform_(0.5, 2.0)
        model.vit.layers[0].layernorm_before.weight.uniform_(0.5, 2.0)
    ffn, value_output = find_pairs(model, fold_norm=True)[:2]
    tensors = {n: p.detach() for n, p in model.named_parameters()}
    layer = model.vit.layers[0]
    a = factor_heads(ffn.a, 1, tensors)[0]
    torch.testing.assert_close(a, layer.mlp.fc1.weight * layer.layernorm_after.weight, rtol=0, atol=0)
    v = factor_heads(value_output.a, value_output.heads, tensors)
    d = layer.attention.head_dim
    expected = (layer.attention.v_proj.weight * layer.layernorm_before.weight)[:d]
    torch.testing.assert_close(v[0], expected, rtol=0, atol=0)
