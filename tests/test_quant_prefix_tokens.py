"""The prefix-aware percentile search (`BaseQuantConfig.weight_prefix_tokens`) and ``percentile``'s weights."""

from __future__ import annotations

import pytest
import torch
from transformers import DeiTConfig, DeiTForImageClassification, ViTForImageClassification

from conftest import tiny_vit_config
from hf_cd.quant import (
    BaseQuantConfig,
    MinMaxConfig,
    PercentileConfig,
    parse_quant_spec,
    quantization_state,
    quantize,
)
from hf_cd.quant.algorithms.observers import PercentileObserver

pytestmark = pytest.mark.usefixtures("one_cpu_thread")


def _tokens_with_a_large_cls_value(seed: int = 0) -> torch.Tensor:
    """(images, tokens, channels): Gaussian tokens, and in 8 of 64 images one large CLS value.

    8 values in 418k: rare enough that a plain squared error prefers clipping them to coarser steps.
    """
    torch.manual_seed(seed)
    x = torch.randn(64, 17, 384)
    x[:8, 0, 7] = 12.0
    return x


def _calibrate(observer: PercentileObserver, x: torch.Tensor):
    for pass_index in range(observer.num_passes):
        observer.begin_pass(pass_index, x.shape[0])
        for part in x.split(16):
            observer.observe(part)
        observer.end_pass()
    return observer.params()


def _top(params) -> float:
    return float((2**params.bits - 1 - params.zero_point) * params.scale)


@pytest.mark.parametrize("bits", [4, 6])  # at 8 bits even the plain search covers it
def test_the_plain_search_clips_the_cls_value_and_the_prefix_aware_one_covers_it(bits):
    x = _tokens_with_a_large_cls_value()
    plain = _calibrate(PercentileObserver(bits, (0.999, 0.9999, 0.99999)), x)
    aware = _calibrate(PercentileObserver(bits, (0.999, 0.9999, 0.99999), prefix_tokens=1), x)
    assert _top(plain) < 6.0  # the CLS value of 12 is cut by more than half
    if bits == 6:  # at 4 bits the coarse steps still make clipping the cheaper error, even weighted
        assert _top(aware) >= 12.0 - float(aware.scale)

    # and the aware search is what it claims: least CLS-weighted error among its candidates
    def weighted_error(params):
        from hf_cd.quant.algorithms.params import fake_quantize

        error = (fake_quantize(x, params.scheme, bits, params.scale, params.zero_point) - x).square()
        error[:, 0] *= 16  # one CLS token = the 16 patch tokens
        return float(error.sum())

    assert weighted_error(aware) <= weighted_error(plain)


def test_the_weighting_concerns_only_the_prefix_tokens():
    torch.manual_seed(1)
    x = torch.randn(64, 17, 384)
    x[:, 0] = 0.0  # exact under every candidate: nothing for the weighting to change
    plain = _calibrate(PercentileObserver(6, (0.999, 0.9999, 0.99999)), x)
    aware = _calibrate(PercentileObserver(6, (0.999, 0.9999, 0.99999), prefix_tokens=1), x)
    assert torch.equal(aware.scale, plain.scale) and torch.equal(aware.zero_point, plain.zero_point)


def _block_prefix_tokens(model, config: BaseQuantConfig) -> set[int]:
    state = quantization_state(quantize(model, config, torch.randn(4, *_input_shape(model))))
    return {site.prefix_tokens for site in state.activations if site.role == "ffn_hidden"}


def _input_shape(model) -> tuple[int, int, int]:
    c = model.config
    return (c.num_channels, c.image_size, c.image_size)


def test_prefix_tokens_come_from_the_architecture_table():
    torch.manual_seed(0)
    vit = ViTForImageClassification(tiny_vit_config()).eval()
    vit_config = tiny_vit_config()
    deit = DeiTForImageClassification(
        DeiTConfig(**{k: getattr(vit_config, k) for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                                            "intermediate_size", "image_size", "patch_size",
                                                            "num_channels", "num_labels")})
    ).eval()  # fmt: skip
    config = MinMaxConfig(progress=False, num_calibration=4)
    assert _block_prefix_tokens(vit, config) == {1}
    assert _block_prefix_tokens(deit, config) == {2}


@pytest.mark.parametrize(
    ("pipeline", "setting", "expected"),
    [("percentile", None, 1), ("repq", None, 0), ("repq", True, 1), ("percentile", False, 0)],
)
def test_pipeline_defaults_and_the_explicit_setting(pipeline, setting, expected):
    from hf_cd.quant.prepare import ActivationSite
    from hf_cd.quant.registry import get_pipeline

    site = ActivationSite(quantizer=None, group=1, block=0, prefix_tokens=1)
    config = parse_quant_spec(pipeline, weight_prefix_tokens=setting)
    assert get_pipeline(pipeline).prefix_tokens(site, config) == expected


def test_percentile_weights_are_asymmetric_per_row_unless_asked_otherwise():
    torch.manual_seed(0)
    model = ViTForImageClassification(tiny_vit_config(hidden_size=256, intermediate_size=256)).eval()
    images = torch.randn(4, 1, 28, 28)
    for scheme, max_levels in (("asymmetric", 16), ("symmetric", 15)):
        config = PercentileConfig(w_bits=4, a_bits=16, progress=False, num_calibration=4, weights=scheme)
        fc1 = quantize(model, config, images).vit.layers[0].mlp.fc1.weight
        levels = max(len(torch.unique(row)) for row in fc1)
        assert levels == max_levels, scheme
        if scheme == "asymmetric":  # an asymmetric row is not sign-symmetric
            assert any(not torch.allclose(row.max(), -row.min()) for row in fc1)
    with pytest.raises(ValueError, match=r"percentile_weights.*'asymmetric'.*'symmetric'"):
        PercentileConfig(weights="minmax")
