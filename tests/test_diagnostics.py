"""Alignment and activation diagnostics, and their plots."""

from __future__ import annotations

import pytest
import torch
from transformers import ViTForImageClassification

from conftest import tiny_vit_config
from hf_cd import (
    activation_stats,
    alignment_summary,
    measure_alignment,
    outlier_summary,
    plot_activation_stats,
    plot_alignment,
)


def _model():
    torch.manual_seed(0)
    return ViTForImageClassification(tiny_vit_config())


def test_alignment_table_has_one_row_per_head_and_matches_a_hand_computation():
    model = _model()
    table = measure_alignment(model)
    heads = model.config.num_attention_heads
    assert len(table.where(kind="value_output")) == heads * model.config.num_hidden_layers
    assert len(table.where(kind="ffn")) == model.config.num_hidden_layers
    layer = model.vit.layers[1]
    a, b = layer.mlp.fc1.weight.detach(), layer.mlp.fc2.weight.detach()
    expected = ((b @ a).square().sum() / (b.square().sum() * torch.linalg.matrix_norm(a, ord=2) ** 2)).item()
    (row,) = table.where(kind="ffn", block=1).rows
    assert abs(row["alignment"] - expected) < 1e-5
    summary = alignment_summary(table)
    assert set(summary) == {"ffn", "value_output"}
    assert summary["value_output"]["max"] >= summary["value_output"]["mean"] > 0


def test_activation_stats_find_a_planted_outlier_channel():
    model = _model().train()
    with torch.no_grad():  # make channel 7 of block 1's residual stream huge via fc2's bias
        model.vit.layers[1].mlp.fc2.bias[7] = 50.0
    table = activation_stats(model, {"pixel_values": torch.randn(4, 1, 28, 28)})
    residual = table.where(block=1, site="residual")[0]
    assert residual["top_channels"][0] == 7
    assert residual["max_abs"] > 45
    assert residual["kurtosis"] > 10  # one channel far out: heavy tails
    sites = [row["site"] for row in table.where(block=0)]
    assert sites == [
        "residual",
        "q_proj_input",
        "k_proj_input",
        "v_proj_input",
        "o_proj_input",
        "fc1_input",
        "fc2_input",
    ]
    assert table.where(block=-1, site="residual")  # the embedding output, block 0's input
    assert outlier_summary(table)["residual_max_last_block"] == residual["max_abs"]
    assert model.training  # the training/eval mode is restored
    assert not any(module._forward_pre_hooks or module._forward_hooks for module in model.modules())


def test_plots_return_figures_save_only_when_given_a_path_and_keep_the_callers_backend(tmp_path):
    import matplotlib
    from matplotlib.figure import Figure

    model = _model()
    tables = {"before": measure_alignment(model), "after": measure_alignment(model)}
    stats = activation_stats(model, torch.randn(2, 1, 28, 28))
    backend = matplotlib.get_backend()
    figures = [plot_alignment(tables), plot_activation_stats(stats)]  # a notebook: no path, nothing written
    assert all(isinstance(fig, Figure) for fig in figures) and list(tmp_path.iterdir()) == []
    for fig, path in (
        (plot_alignment(tables, tmp_path / "a.png"), tmp_path / "a.png"),
        (plot_activation_stats(stats, tmp_path / "b.png"), tmp_path / "b.png"),
    ):
        assert isinstance(fig, Figure) and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert matplotlib.get_backend() == backend
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "b.png"]  # no temporary file left


def test_plotting_without_matplotlib_names_the_extra(monkeypatch):
    import sys

    from hf_cd.extras import MissingExtraError

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if `pip install hf-cd` without [plots]
    with pytest.raises(MissingExtraError, match=r"pip install 'hf-cd\[plots\]'") as error:
        plot_alignment({"model": measure_alignment(_model())})
    assert "\n" not in str(error.value)


def test_outlier_profile_finds_a_planted_residual_channel_and_reads_norms_and_layer_scale():
    from transformers import Dinov2ForImageClassification

    from conftest import tiny_dinov2_config
    from hf_cd import outlier_profile

    torch.manual_seed(0)
    model = Dinov2ForImageClassification(tiny_dinov2_config()).eval()
    layers = model.dinov2.encoder.layer
    with torch.no_grad():
        layers[0].mlp.fc2.bias[5] = 40.0  # a massive residual channel from block 0 on
        layers[1].norm2.weight[3] = 8.0  # one LayerNorm γ far above the others (the rest are 1)
        layers[1].layer_scale2.lambda1[0] = 3.0
    profile = outlier_profile(model, torch.randn(4, 1, 28, 28))
    assert profile["residual_top_channel"] == [5, 5]
    assert min(profile["residual_max"]) > 30
    assert profile["norm_before_ffn_gamma_max_over_median"] == [1.0, 8.0]
    assert profile["norm_before_attention_gamma_max_over_median"] == [1.0, 1.0]
    assert profile["layer_scale_max"] == [1.0, 3.0]
    assert len(profile["fc2_input_max_over_median"]) == 2 and all(
        v > 1 for v in profile["fc2_input_max_over_median"]
    )
    assert set(profile["alignment_mean"]) == {"ffn", "value_output", "query_key"}
