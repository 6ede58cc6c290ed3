"""``repq`` against a small port of RepQ-ViT's reference formulas, and the bit protocols.

The port below is written from reading ``zkkli/RepQ-ViT`` (``classification/quant/quantizer.py``:
``UniformQuantizer``, ``LogSqrt2Quantizer``, ``lp_loss``; ``classification/test_quant.py``: the
post-LayerNorm target; ``classification/quant/quant_modules.py`` / ``quant_model.py``: which layer
gets which bits). It is deliberately naive: whole tensors, `torch.quantile`, one loop per channel.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from transformers import ViTForImageClassification

from conftest import tiny_vit_config
from hf_cd.architectures import resolve_blocks
from hf_cd.hub import build_model_card
from hf_cd.hub.parse import parse_card
from hf_cd.quant import (
    FULL_PRECISION,
    RESULT_COLUMNS,
    BaseQuantConfig,
    MinMaxConfig,
    OnnxRuntimeInt8Config,
    QuantConfig,
    RepQConfig,
    evaluate_quantized,
    get_pipeline,
    parse_quant_spec,
    quantization_state,
    quantize,
)
from hf_cd.quant.algorithms.observers import PercentileObserver
from hf_cd.quant.algorithms.quantizers import asymmetric_weight_params, quantize_weight_asymmetric
from hf_cd.quant.algorithms.repq_reparam import post_layernorm_target
from hf_cd.quant.pipelines.repq import RepQPipeline

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

REFERENCE_PERCENTILES = (0.999, 0.9999, 0.99999)
BITS = 4


# --- the reference, ported ---------------------------------------------------------------------


def ref_uniform(x: torch.Tensor, delta: torch.Tensor, zero_point: torch.Tensor, bits: int) -> torch.Tensor:
    """UniformQuantizer.forward: round, shift by the zero-point, clamp to the codes, back."""
    codes = torch.clamp(torch.round(x / delta) + zero_point, 0, 2**bits - 1)
    return (codes - zero_point) * delta


def ref_uniform_init(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """UniformQuantizer's per-tensor init: the percentile pair of least mean squared error, no forced zero."""
    flat = x.reshape(-1)
    best_score, best = 1e10, None
    for pct in REFERENCE_PERCENTILES:
        high, low = torch.quantile(flat, pct), torch.quantile(flat, 1.0 - pct)
        delta = (high - low) / (2**bits - 1)
        zero_point = torch.round(-low / delta)
        score = (ref_uniform(flat, delta, zero_point, bits) - flat).abs().pow(2).mean()
        if score < best_score:  # strictly: the first candidate wins a tie
            best_score, best = score, (delta, zero_point)
    return best


def ref_channel_wise(x: torch.Tensor, bits: int, channel_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The channel_wise init: the per-tensor init on each output row (weights) or last-dim channel (activations)."""
    pairs = [ref_uniform_init(x.select(channel_dim, c), bits) for c in range(x.shape[channel_dim])]
    return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])


def ref_log_sqrt2(x: torch.Tensor, delta: torch.Tensor, bits: int) -> torch.Tensor:
    """LogSqrt2Quantizer.quantize: codes 0 … 2^b − 1 as δ·2^(−k/2); a code past them is an exact zero."""
    k = torch.round(-2 * torch.log2(x / delta))
    below_last_level = k >= 2**bits
    k = k.clamp(0, 2**bits - 1)
    sqrt2_if_odd = (k % 2) * (math.sqrt(2) - 1) + 1
    out = 2 ** (-torch.ceil(k / 2)) * sqrt2_if_odd * delta
    out[below_last_level] = 0
    return out


def ref_log_sqrt2_init(x: torch.Tensor, bits: int) -> torch.Tensor:
    flat = x.reshape(-1)
    best_score, best = 1e10, None
    for pct in REFERENCE_PERCENTILES:
        delta = torch.quantile(flat, pct)
        score = (ref_log_sqrt2(flat, delta, bits) - flat).abs().pow(2).mean()
        if score < best_score:
            best_score, best = score, delta
    return best


# --- heavy-tailed data ---------------------------------------------------------------------------


def _student_t(*shape: int, seed: int = 0) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.distributions.StudentT(3.0).sample(shape)


def _activations() -> dict[str, torch.Tensor]:
    """(images, tokens, channels): two-sided with outlier columns, one-sided at 0, and one-sided off 0."""
    two_sided = _student_t(6, 17, 12, seed=1)
    two_sided[..., 4] *= 25.0
    return {
        "two_sided_outlier_columns": two_sided,
        "post_gelu": torch.nn.functional.gelu(_student_t(6, 17, 12, seed=2) * 2),
        "positive_off_zero": 3.0 + _student_t(6, 17, 12, seed=3).abs(),
    }


def _observe(observer, x: torch.Tensor, batch: int = 2):
    """Stream ``x`` through ``observer`` in batches of images, as calibration does."""
    for pass_index in range(observer.num_passes):
        observer.begin_pass(pass_index, x.shape[0])
        for part in x.split(batch):
            observer.observe(part)
        observer.end_pass()
    return observer.params()


def _site(role: str, bits: int = BITS) -> SimpleNamespace:
    return SimpleNamespace(role=role, bits=bits, name=f"test:{role}")


# --- weights -------------------------------------------------------------------------------------


def _weights() -> dict[str, torch.Tensor]:
    linear = _student_t(24, 40, seed=4)
    linear[:, 5] *= 15.0  # an outlier input column
    linear[3] = linear[3].abs().clamp(max=4.0) + 3.0  # a one-sided row: its range excludes 0
    return {"linear": linear, "patch_embedding": _student_t(8, 1, 7, 7, seed=5)}


@pytest.mark.parametrize("name", ["linear", "patch_embedding"])
def test_weights_are_asymmetric_per_row_with_the_reference_percentile_search(name):
    weight = _weights()[name]
    rows = weight.reshape(weight.shape[0], -1)
    ref_delta, ref_zero_point = ref_channel_wise(rows, BITS, channel_dim=0)
    scale, zero_point = asymmetric_weight_params(weight, BITS, REFERENCE_PERCENTILES)
    torch.testing.assert_close(scale.reshape(-1), ref_delta, rtol=1e-5, atol=0)
    assert torch.equal(zero_point.reshape(-1), ref_zero_point)

    expected = ref_uniform(rows, ref_delta.view(-1, 1), ref_zero_point.view(-1, 1), BITS).reshape(
        weight.shape
    )
    close = dict(rtol=1e-5, atol=1e-6)  # float rounding of the scale: far below one step
    torch.testing.assert_close(
        quantize_weight_asymmetric(weight, BITS, REFERENCE_PERCENTILES), expected, **close
    )
    # What `repq` does to a weight by default is exactly this.
    repq = RepQPipeline().quantize_weight(weight, BITS, RepQConfig())
    torch.testing.assert_close(repq, expected, **close)
    # A 2^b-code grid per row (codes 0 … 2^b − 1 all in use somewhere); the symmetric one has 2^b − 1.
    codes = repq.reshape(weight.shape[0], -1) / scale + zero_point
    torch.testing.assert_close(codes, codes.round(), rtol=0, atol=1e-3)
    assert codes.round().min() == 0 and codes.round().max() == 2**BITS - 1
    assert (codes.amax(1) - codes.amin(1)).round().max() == 2**BITS - 1
    symmetric = RepQPipeline().quantize_weight(weight, BITS, RepQConfig(weights="symmetric"))
    assert max(row.unique().numel() for row in symmetric.reshape(weight.shape[0], -1)) <= 2**BITS - 1
    assert not torch.allclose(symmetric, repq)
    if name == "linear":
        assert ref_zero_point[3] < 0  # the one-sided row's zero-point lies outside the codes, as there


# --- per-tensor activations --------------------------------------------------------------------


@pytest.mark.parametrize("name", list(_activations()))
def test_per_tensor_activations_match_the_reference(name):
    x = _activations()[name]
    ref_delta, ref_zero_point = ref_uniform_init(x, BITS)
    reference = RepQConfig(activation_include_zero=False)
    params = _observe(RepQPipeline().observer(_site("ffn_hidden"), reference), x)
    torch.testing.assert_close(params.scale, ref_delta, rtol=1e-5, atol=0)
    assert torch.equal(params.zero_point, ref_zero_point)
    torch.testing.assert_close(
        params.apply(x), ref_uniform(x, ref_delta, ref_zero_point, BITS), rtol=1e-5, atol=1e-6
    )

    # The default widens the range to contain 0: the same wherever the range already does, and a
    # valid code (the reference's is negative, so 0 is not on its grid) where it does not.
    default = _observe(RepQPipeline().observer(_site("ffn_hidden"), RepQConfig()), x)
    if name == "positive_off_zero":
        assert ref_zero_point < 0 and default.zero_point == 0
        assert not torch.allclose(default.scale, ref_delta)
    else:
        torch.testing.assert_close(default.scale, params.scale, rtol=0, atol=0)
        assert torch.equal(default.zero_point, params.zero_point)


# --- log√2 ---------------------------------------------------------------------------------------


def test_log_sqrt2_matches_the_reference_including_zeros_and_the_lowest_level():
    logits = _student_t(4, 2, 17, 17, seed=6) * 3.0
    probs = torch.softmax(logits, dim=-1)
    ref_delta = ref_log_sqrt2_init(probs, BITS)
    expected = ref_log_sqrt2(probs, ref_delta, BITS)
    lowest = ref_delta * 2 ** (-(2**BITS - 1) / 2)  # δ·2^−7.5 at 4 bits
    assert (expected == 0).any() and torch.isclose(expected, lowest.expand_as(expected), rtol=1e-6).any()

    params = _observe(RepQPipeline().observer(_site("attention_probs"), RepQConfig()), probs)
    assert params.scheme == "log_sqrt2"
    torch.testing.assert_close(params.scale, ref_delta, rtol=1e-6, atol=0)
    quantized = params.apply(probs)
    torch.testing.assert_close(quantized, expected, rtol=1e-6, atol=0)
    assert torch.equal(quantized == 0, expected == 0)
    assert quantized.unique().numel() <= 2**BITS + 1

    # The b-bit variant gives the lowest level's code to zero: those entries become 0.
    zero_code = RepQConfig(log_zero_code=True)
    variant = _observe(RepQPipeline().observer(_site("attention_probs"), zero_code), probs)
    assert variant.scheme == "log_sqrt2_zero_code"
    at_lowest = torch.isclose(expected, lowest.expand_as(expected), rtol=1e-6)
    assert (variant.apply(probs)[at_lowest] == 0).all()


# --- post-LayerNorm target -----------------------------------------------------------------------


def test_post_layernorm_channel_statistics_and_their_mean_target_match_the_reference():
    x = _student_t(6, 17, 12, seed=7) * torch.linspace(0.2, 3.0, 12)
    x[..., 2] += 8.0  # a channel far from zero
    x[..., 9] *= 20.0  # an outlier channel
    ref_delta, ref_zero_point = ref_channel_wise(x, BITS, channel_dim=-1)
    params = _observe(PercentileObserver(BITS, REFERENCE_PERCENTILES, per_channel=True), x)
    torch.testing.assert_close(params.scale, ref_delta, rtol=1e-5, atol=0)
    assert torch.equal(params.zero_point, ref_zero_point)

    target_scale, target_zero_point = post_layernorm_target(params.scale, params.zero_point)
    torch.testing.assert_close(target_scale, ref_delta.mean(), rtol=1e-6, atol=0)
    torch.testing.assert_close(target_zero_point, ref_zero_point.mean(), rtol=1e-6, atol=0)
    assert target_zero_point != torch.round(target_zero_point)  # a mean zero-point, between codes


def _model_with_uneven_layernorms() -> ViTForImageClassification:
    torch.manual_seed(0)
    model = ViTForImageClassification(tiny_vit_config()).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for block in resolve_blocks(model):
            for norm in (block.norm_before_attention, block.norm_before_ffn):
                norm.weight.copy_(torch.rand(norm.weight.shape[0], generator=generator) * 2 + 0.1)
                norm.bias.copy_(torch.randn(norm.bias.shape[0], generator=generator))
                norm.weight[1] = 12.0
                norm.bias[2] = 5.0
    return model


def _images(count: int, seed: int) -> torch.Tensor:
    return torch.randn(count, 1, 28, 28, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_repq_sets_each_post_layernorm_quantizer_to_the_mean_target_and_never_refits_it():
    model, images = _model_with_uneven_layernorms(), _images(8, seed=1)
    outputs = {}
    handles = [
        norm.register_forward_hook(lambda module, args, output, key=key: outputs.__setitem__(key, output))
        for index, block in enumerate(resolve_blocks(model))
        for key, norm in (
            ((index, "attention"), block.norm_before_attention),
            ((index, "ffn"), block.norm_before_ffn),
        )
    ]
    model(pixel_values=images)
    for handle in handles:
        handle.remove()
    config = RepQConfig(w_bits=BITS, a_bits=BITS, num_calibration=8, progress=False)
    state = quantization_state(quantize(model, config, images))
    recalibrated = quantization_state(quantize(model, config.replace(post_layernorm="recalibrate"), images))
    for (index, kind), output in outputs.items():
        block = state.blocks[index]
        norm = block.norm_before_attention if kind == "attention" else block.norm_before_ffn
        quantizer = norm.output_quantizer
        ref_delta, ref_zero_point = ref_channel_wise(output, BITS, channel_dim=-1)
        torch.testing.assert_close(quantizer.scale, ref_delta.mean(), rtol=1e-5, atol=0)
        torch.testing.assert_close(quantizer.zero_point, ref_zero_point.mean(), rtol=1e-6, atol=0)
        probe = torch.linspace(-30, 30, 1001)
        torch.testing.assert_close(
            quantizer(probe), ref_uniform(probe, ref_delta.mean(), ref_zero_point.mean(), BITS)
        )
        other = recalibrated.activation(quantizer.site).quantizer
        assert other.zero_point == torch.round(other.zero_point)  # refitted: an integer code
        assert not torch.equal(other.scale, quantizer.scale)


# --- options -------------------------------------------------------------------------------------


def test_repq_options_are_checked_with_a_did_you_mean():
    other = parse_quant_spec("repq", extra={"gptq_damp": 0.1})
    assert other == RepQConfig()  # other pipelines' keys are left alone
    with pytest.raises(ValueError, match="Did you mean 'repq_weights'"):
        parse_quant_spec("repq:repq_weight=symmetric")
    with pytest.raises(ValueError, match="post_layernorm"):
        parse_quant_spec("repq:repq_post_layernorm=median")
    with pytest.raises(ValueError, match="Did you mean"):
        parse_quant_spec("repq:repq_log_zero_cod=true")
    with (
        pytest.warns(DeprecationWarning),
        pytest.raises(ValueError, match="Did you mean 'repq_log_zero_code'"),
    ):
        QuantConfig(extra={"repq_log_zero_cod": True})  # the deprecated spelling is checked as early


# --- bit protocols --------------------------------------------------------------------------------


def _bits_by_role(state) -> dict[str, set[int]]:
    """``{"classifier:weight": {4}, "classifier_input:input": {6}, …}``."""
    bits: dict[str, set[int]] = {}
    for kind, sites in (("weight", state.weights), ("input", state.activations)):
        for site in sites:
            bits.setdefault(f"{site.role}:{kind}", set()).add(site.bits)
    return bits


@torch.no_grad()
def test_the_repq_vit_protocol_gives_reference_bits_to_the_patch_embedding_and_the_classifier():
    torch.manual_seed(0)
    model, images = ViTForImageClassification(tiny_vit_config()).eval(), _images(8, seed=2)
    config = MinMaxConfig(w_bits=4, a_bits=6, num_calibration=8, progress=False)
    paper = _bits_by_role(quantization_state(quantize(model, config.replace(protocol="repq_vit"), images)))
    assert paper["patch_embedding:weight"] == {4} and paper["patch_embedding_input:input"] == {8}
    assert paper["classifier:weight"] == {4} and paper["classifier_input:input"] == {6}
    deploy = _bits_by_role(quantization_state(quantize(model, config, images)))
    assert deploy["patch_embedding:weight"] == deploy["patch_embedding_input:input"] == {8}
    assert deploy["classifier:weight"] == deploy["classifier_input:input"] == {8}

    # repq under the paper's protocol: the patch-embedding weight is RepQ-ViT's per-row 4-bit quantizer.
    quantized = quantize(model, RepQConfig(**{**config.shared(), "protocol": "repq_vit"}), images)
    weight = model.vit.embeddings.patch_embeddings.projection.weight
    rows = weight.reshape(weight.shape[0], -1)
    delta, zero_point = ref_channel_wise(rows, 4, channel_dim=0)
    expected = ref_uniform(rows, delta.view(-1, 1), zero_point.view(-1, 1), 4).reshape(weight.shape)
    torch.testing.assert_close(
        quantized.vit.embeddings.patch_embeddings.projection.weight, expected, rtol=1e-5, atol=1e-6
    )


def test_protocols_are_validated():
    with pytest.raises(ValueError, match="Did you mean 'repq_vit'"):
        RepQConfig(protocol="repq-vit")
    with pytest.raises(ValueError, match="leave embedding_bits and classifier_bits at 8"):
        RepQConfig(protocol="repq_vit", embedding_bits=6)
    assert RepQConfig(protocol="repq_vit", w_bits=16, a_bits=16).quantizes_activations  # pixels at 8 bits
    with pytest.raises(ValueError, match="protocol='deploy'"):
        get_pipeline("onnxruntime-int8").check(OnnxRuntimeInt8Config(protocol="repq_vit"))


def test_every_row_names_its_protocol_and_the_card_keeps_the_protocols_apart():
    torch.manual_seed(0)
    model = ViTForImageClassification(tiny_vit_config()).eval()
    x, y = _images(12, seed=3), torch.randint(0, 10, (12,), generator=torch.Generator().manual_seed(4))
    config = BaseQuantConfig(num_calibration=8, batch_size=12, progress=False)
    rows = []
    for protocol in ("deploy", "repq_vit"):
        table = evaluate_quantized(
            model,
            (x, y),
            _images(8, seed=5),
            pipelines=("minmax",),
            bits=((4, 4),),
            config=config.replace(protocol=protocol),
        )
        assert all(list(row)[: len(RESULT_COLUMNS)] == list(RESULT_COLUMNS) for row in table.to_dicts())
        assert table[0]["pipeline"] == FULL_PRECISION and table[0]["protocol"] is None
        assert table[1]["protocol"] == protocol
        assert (table[1]["embedding_bits"], table[1]["classifier_bits"]) == (
            (8, 8) if protocol == "deploy" else (4, 4)
        )
        rows += table.to_dicts()[1 if rows else 0 :]

    card = build_model_card(
        {"cd_settings": {"strength": 1.0}, "quantized": {"status": "done", "rows": rows}}, "someone/vit-cd"
    )
    text = str(card)
    assert "| minmax |" in text and "| minmax, repq_vit protocol |" in text
    assert "Rows marked `repq_vit protocol` use RepQ-ViT's published bit assignment" in text
    assert "--protocol" not in text  # the first quantized row is deploy's
    parsed = parse_card(text, "README.md")
    assert [(row["pipeline"], row["protocol"]) for row in parsed] == [
        (FULL_PRECISION, None),
        ("minmax", "deploy"),
        ("minmax", "repq_vit"),
    ]
