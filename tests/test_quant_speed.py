"""Calibration speed-ups that must not change a single range: replayed second passes, tail-only weight quantiles."""

from __future__ import annotations

import pytest
import torch
from transformers import Dinov2ForImageClassification, ViTForImageClassification

from conftest import tiny_dinov2_config, tiny_vit_config
from hf_cd.quant import PercentileConfig, parse_quant_spec, quantization_state, quantize
from hf_cd.quant import calibration as calibration_module

pytestmark = pytest.mark.usefixtures("one_cpu_thread")


def _model(kind: str):
    torch.manual_seed(0)
    if kind == "dinov2":
        return Dinov2ForImageClassification(tiny_dinov2_config()).eval()
    return ViTForImageClassification(tiny_vit_config()).eval()


def _params(model) -> list[tuple[str, torch.Tensor | None, torch.Tensor | None]]:
    return [
        (site.name, site.quantizer.scale, getattr(site.quantizer, "zero_point", None))
        for site in quantization_state(model).activations
    ]


def _assert_same(first, second) -> None:
    assert [name for name, *_ in first] == [name for name, *_ in second] and first
    for (name, scale_a, zero_a), (_, scale_b, zero_b) in zip(first, second):
        assert torch.equal(scale_a, scale_b), name
        assert (zero_a is None and zero_b is None) or torch.equal(zero_a, zero_b), name


def _count_forwards(model) -> list[int]:
    calls = [0]
    embeddings = model.base_model.embeddings
    embeddings.register_forward_hook(lambda *args: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.mark.parametrize("pipeline", ["percentile", "repq"])
@pytest.mark.parametrize("kind", ["vit", "dinov2"])
def test_replayed_second_pass_picks_the_same_ranges_with_fewer_forwards(monkeypatch, pipeline, kind):
    model = _model(kind)
    torch.manual_seed(1)
    images = torch.randn(12, 1, 28, 28)
    config = parse_quant_spec(pipeline, w_bits=4, a_bits=4, batch_size=5, progress=False)
    counts = {}
    results = {}
    for replay_bytes in (0, calibration_module.REPLAY_BYTES):
        monkeypatch.setattr(calibration_module, "REPLAY_BYTES", replay_bytes)
        calls = _count_forwards(model)
        quantized = quantize(model, config, images)
        counts[replay_bytes] = calls[0]
        results[replay_bytes] = (_params(quantized), quantized(pixel_values=images).logits)
        model = _model(kind)  # a fresh model: its hooks do not pile up
    (forwarded, logits_forwarded), (replayed, logits_replayed) = results.values()
    _assert_same(forwarded, replayed)
    assert torch.equal(logits_forwarded, logits_replayed)
    without, with_replay = counts.values()
    assert with_replay < without  # the second pass of each block's range search forwards nothing


def test_a_replay_budget_too_small_for_some_sites_still_gives_the_same_ranges(monkeypatch):
    model = _model("vit")
    torch.manual_seed(1)
    images = torch.randn(12, 1, 28, 28)
    config = PercentileConfig(w_bits=4, a_bits=4, batch_size=5, progress=False)
    monkeypatch.setattr(calibration_module, "REPLAY_BYTES", 0)
    reference = _params(quantize(model, config, images))
    monkeypatch.setattr(calibration_module, "REPLAY_BYTES", 12 * 17 * 32 * 4 * 2)  # two of a block's sites
    partial = _params(quantize(model, config, images))
    _assert_same(reference, partial)


@pytest.mark.parametrize("columns", [7, 64, 384, 1537])
@pytest.mark.parametrize("percentiles", [(0.999, 0.9999, 0.99999), (0.9, 0.99), (0.6, 1.0)])
def test_tail_quantiles_equal_the_quantiles_of_the_sorted_rows(columns, percentiles):
    from hf_cd.quant.algorithms.quantizers import row_tails, sorted_quantile, tail_quantile

    torch.manual_seed(columns)
    rows = torch.randn(16, columns) * torch.rand(16, 1) * 3
    rows[0, :3] = 0.5  # ties
    ordered = rows.sort(dim=1).values
    low, high = row_tails(rows, min(percentiles))
    for p in percentiles:
        for q in (p, 1.0 - p):
            assert torch.equal(tail_quantile(low, high, columns, q), sorted_quantile(ordered, q)), (p, q)


def test_asymmetric_weight_params_pick_the_ranges_a_full_sort_picks():
    from hf_cd.quant.algorithms.quantizers import (
        asymmetric_params,
        asymmetric_weight_params,
        fake_quantize_asymmetric,
        quantization_mse,
        sorted_quantile,
    )

    torch.manual_seed(0)
    weight = torch.randn(96, 384)
    weight[::7, ::11] *= 25  # outliers, so the percentiles compete
    percentiles = (0.999, 0.9999, 0.99999)
    ordered = weight.sort(dim=1).values
    candidates = [
        asymmetric_params(sorted_quantile(ordered, 1 - p), sorted_quantile(ordered, p), 4, include_zero=False)
        for p in percentiles
    ]
    errors = torch.stack(
        [quantization_mse(weight, fake_quantize_asymmetric(weight, s, z, 4), dim=1) for s, z in candidates]
    )
    best = errors.argmin(dim=0)  # first on ties, as the search
    expected_scale = torch.stack([s for s, _ in candidates])[best, torch.arange(96)]
    expected_zero = torch.stack([z for _, z in candidates])[best, torch.arange(96)]
    scale, zero_point = asymmetric_weight_params(weight, 4, percentiles)
    assert torch.equal(scale, expected_scale) and torch.equal(zero_point, expected_zero)
