"""The quantizer arithmetic (`hf_cd.quant.algorithms.quantizers`) and the streaming observers built on it."""

from __future__ import annotations

import math

import pytest
import torch

from hf_cd.quant.algorithms.observers import LogSqrt2Observer, MinMaxObserver, PercentileObserver
from hf_cd.quant.algorithms.quantizers import (
    asymmetric_params,
    asymmetric_range,
    fake_quantize_asymmetric,
    fake_quantize_log_sqrt2,
    fake_quantize_symmetric,
    quantize_weight_symmetric,
    symmetric_range,
    symmetric_scale,
    tail_length,
    upper_quantile_from_top,
)

BITS = range(2, 9)


@pytest.mark.parametrize("bits", BITS)
def test_asymmetric_quantizer_levels_clamping_zero_point_and_error(bits):
    minimum, maximum = torch.tensor(-1.3), torch.tensor(2.9)
    scale, zero_point = asymmetric_params(minimum, maximum, bits)
    low, high = asymmetric_range(bits)
    assert (low, high) == (0, 2**bits - 1)
    assert zero_point == torch.round(zero_point) and low <= zero_point.item() <= high
    assert torch.allclose(scale, (maximum - minimum) / (2**bits - 1))
    assert fake_quantize_asymmetric(torch.zeros(3), scale, zero_point, bits).eq(0).all()  # zero is exact

    inside = torch.linspace(minimum.item(), maximum.item(), 20_001)
    quantized = fake_quantize_asymmetric(inside, scale, zero_point, bits)
    assert (inside - quantized).abs().max() <= scale / 2 * (1 + 1e-4)

    wide = torch.linspace(-10.0, 10.0, 40_001)
    wide_quantized = fake_quantize_asymmetric(wide, scale, zero_point, bits)
    codes = wide_quantized / scale + zero_point
    assert torch.allclose(codes, codes.round(), atol=1e-3)
    assert codes.round().unique().tolist() == list(range(low, high + 1))  # every code, nothing else
    assert wide_quantized[0] == (low - zero_point) * scale  # clamped below
    assert wide_quantized[-1] == (high - zero_point) * scale  # clamped above


@pytest.mark.parametrize("bits", BITS)
def test_symmetric_quantizer_levels_clamping_sign_symmetry_and_error(bits):
    absmax = torch.tensor(0.77)
    scale = symmetric_scale(absmax, bits)
    low, high = symmetric_range(bits)
    assert (low, high) == (-(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1)
    assert torch.allclose(scale * high, absmax)

    inside = torch.linspace(-absmax.item(), absmax.item(), 20_001)
    quantized = fake_quantize_symmetric(inside, scale, bits)
    assert (inside - quantized).abs().max() <= scale / 2 * (1 + 1e-4)
    assert torch.equal(fake_quantize_symmetric(-inside, scale, bits), -quantized)
    assert fake_quantize_symmetric(torch.zeros(2), scale, bits).eq(0).all()

    wide = torch.linspace(-5.0, 5.0, 40_001)
    wide_quantized = fake_quantize_symmetric(wide, scale, bits)
    assert wide_quantized.unique().numel() == 2**bits - 1
    assert wide_quantized.max() == high * scale and wide_quantized.min() == low * scale


def test_log_sqrt2_quantizer_hand_computed_values():
    # 3 bits, RepQ-ViT's: levels 2^(-k/2) for k = 0..7 and an exact zero below them (9 values).
    x = torch.tensor([1.0, 1.7, 2**-0.5, 0.6, 0.5, 0.3, 2**-3, 2**-3.5, 2**-3.8, 1e-6, 0.0])
    expected = torch.tensor([1.0, 1.0, 2**-0.5, 2**-0.5, 0.5, 2**-1.5, 2**-3, 2**-3.5, 0.0, 0.0, 0.0])
    assert torch.allclose(fake_quantize_log_sqrt2(x, torch.tensor(1.0), bits=3), expected)
    # delta scales every level: the same points relative to delta = 0.25.
    assert torch.allclose(fake_quantize_log_sqrt2(x * 0.25, torch.tensor(0.25), bits=3), expected * 0.25)
    # The b-bit variant gives the last of its 8 codes to zero: 2^-3.5 is no longer a level.
    expected[7] = 0.0
    assert torch.allclose(
        fake_quantize_log_sqrt2(x, torch.tensor(1.0), bits=3, reserve_zero_code=True), expected
    )


@pytest.mark.parametrize("reserve_zero_code", [False, True])
@pytest.mark.parametrize("bits", BITS)
def test_log_sqrt2_quantizer_is_monotonic_and_has_its_levels_and_zero(bits, reserve_zero_code):
    levels = 2**bits - 1 if reserve_zero_code else 2**bits
    smallest_level = 2.0 ** (-(levels - 1) / 2)
    x = torch.cat(
        [
            torch.zeros(1, dtype=torch.float64),
            torch.logspace(math.log2(smallest_level) - 2, 0.3, 200_000, base=2.0, dtype=torch.float64),
        ]
    )
    one = torch.tensor(1.0, dtype=torch.float64)
    quantized = fake_quantize_log_sqrt2(x, one, bits, reserve_zero_code)
    assert (quantized[1:] >= quantized[:-1]).all()
    assert quantized[0] == 0 and quantized[1] == 0  # below the last level: exact zero
    assert quantized.unique().numel() == levels + 1  # the levels and zero
    assert quantized.max() == 1.0
    assert math.isclose(quantized[quantized > 0].min().item(), smallest_level, rel_tol=1e-12)
    assert (
        fake_quantize_log_sqrt2(torch.tensor([-0.5]), torch.tensor(1.0), bits, reserve_zero_code).item()
        == 0.0
    )


@pytest.mark.parametrize("per_channel", [True, False])
def test_weight_clip_search_never_loses_to_absmax_and_picks_per_channel(per_channel):
    torch.manual_seed(0)
    weight = torch.randn(16, 40)
    weight[3, 5] = 12.0  # an outlier that clipping should sacrifice at 3 bits
    absmax_only = quantize_weight_symmetric(weight, 3, per_channel, clip_ratios=(1.0,))
    searched = quantize_weight_symmetric(
        weight, 3, per_channel, clip_ratios=[1 - 0.01 * i for i in range(60)]
    )
    dims = 1 if per_channel else (0, 1)
    error_absmax = (weight - absmax_only).square().sum(dims)
    error_searched = (weight - searched).square().sum(dims)
    assert (error_searched <= error_absmax + 1e-6).all()
    assert (error_searched < error_absmax).any()
    if per_channel:
        scale = weight.abs().amax(1, keepdim=True) / 3
        assert torch.allclose(absmax_only, fake_quantize_symmetric(weight, scale, 3))
        assert ((searched / scale.clamp(min=1e-12)).abs() <= 3 + 1e-4).all()
    levels = (
        searched.unique(dim=None).numel()
        if not per_channel
        else max(row.unique().numel() for row in searched)
    )
    assert levels <= 2**3 - 1


@pytest.mark.parametrize("q", [0.5, 0.9, 0.999, 0.9999, 0.99999])
def test_quantile_from_the_kept_tail_matches_torch_quantile(q):
    torch.manual_seed(1)
    x = torch.randn(100_003, 3, dtype=torch.float64)
    keep = tail_length(x.shape[0], q)
    top = x.topk(keep, dim=0).values
    assert torch.allclose(
        upper_quantile_from_top(top, x.shape[0], q), torch.quantile(x, q, dim=0), rtol=0, atol=1e-12
    )
    with pytest.raises(ValueError, match="too short"):
        upper_quantile_from_top(top[:1], x.shape[0], min(q, 0.99))


def _feed(observer, batches, num_images):
    for pass_index in range(observer.num_passes):
        observer.begin_pass(pass_index, num_images)
        for batch in batches:
            observer.observe(batch)
        observer.end_pass()
    return observer.params()


@pytest.mark.parametrize("per_channel", [False, True])
def test_percentile_observer_streams_to_the_same_choice_as_a_direct_search(per_channel):
    torch.manual_seed(2)
    x = torch.randn(12, 50, 8) * torch.linspace(0.5, 3, 8)
    x[0, 0, 2] = 40.0  # a rare outlier worth clipping
    percentiles = (0.99, 0.999, 0.99999)
    streamed = _feed(PercentileObserver(4, percentiles, per_channel), list(x.split(5)), 12)
    whole = _feed(PercentileObserver(4, percentiles, per_channel), [x], 12)
    assert torch.allclose(streamed.scale, whole.scale) and torch.equal(streamed.zero_point, whole.zero_point)

    columns = x.reshape(-1, 8) if per_channel else x.reshape(-1, 1)
    best = []
    for c in range(columns.shape[1]):
        candidates = []
        for p in percentiles:
            low, high = torch.quantile(columns[:, c], 1 - p), torch.quantile(columns[:, c], p)
            scale, zero_point = asymmetric_params(low, high, 4, include_zero=not per_channel)
            error = (
                (fake_quantize_asymmetric(columns[:, c], scale, zero_point, 4) - columns[:, c]).square().sum()
            )
            candidates.append((error.item(), scale, zero_point))
        best.append(min(candidates, key=lambda item: item[0]))
    assert torch.allclose(
        streamed.scale.reshape(-1), torch.stack([b[1] for b in best]).reshape(-1), rtol=1e-5
    )
    assert torch.equal(streamed.zero_point.reshape(-1), torch.stack([b[2] for b in best]).reshape(-1))


def test_minmax_and_log_sqrt2_observers():
    torch.manual_seed(3)
    x = torch.randn(6, 10, 4)
    minmax = _feed(MinMaxObserver(8), list(x.split(2)), 6)
    scale, zero_point = asymmetric_params(x.min(), x.max(), 8)
    assert torch.equal(minmax.scale, scale) and torch.equal(minmax.zero_point, zero_point)

    probs = torch.softmax(torch.randn(6, 2, 10, 10) * 3, dim=-1)
    log = _feed(LogSqrt2Observer(4, (0.999, 0.9999, 0.99999)), list(probs.split(3)), 6)
    assert log.scheme == "log_sqrt2"
    candidates = [torch.quantile(probs.reshape(-1), p) for p in (0.999, 0.9999, 0.99999)]
    errors = [(fake_quantize_log_sqrt2(probs, d, 4) - probs).square().sum() for d in candidates]
    assert torch.allclose(log.scale, candidates[int(torch.stack(errors).argmin())])
