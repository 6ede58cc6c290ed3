"""`hf_cd.quant.sensitivity`: one activation group at low bits, the rest at 8, with site statistics."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import ViTForImageClassification

from conftest import tiny_vit_config
from hf_cd.quant.sensitivity import SITE_GROUPS, plot_sensitivity, sensitivity


def _model_with_a_hidden_unit_outlier(trained) -> ViTForImageClassification:
    """The spec's regime-B mechanism, planted: in every block hidden unit 7 fires 100× harder and fc2
    reads it 100× weaker, so the float function barely changes but fc2's input gets one huge channel."""
    model = copy.deepcopy(trained).eval()
    with torch.no_grad():
        for layer in model.vit.layers:
            layer.mlp.fc1.weight[7] *= 100.0
            layer.mlp.fc1.bias[7] *= 100.0
            layer.mlp.fc2.weight[:, 7] /= 100.0
    return model


@pytest.mark.slow
def test_the_planted_fc2_input_outlier_is_the_group_that_breaks_and_its_statistics_say_why(
    trained_tiny_vit, fashion_mnist_tensors
):
    model = _model_with_a_hidden_unit_outlier(trained_tiny_vit)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = fashion_mnist_tensors["test"][0][:512]
    labels = model(pixel_values=x).logits.argmax(-1)  # agreement with the float model
    table = sensitivity(
        model,
        (x, labels),
        fashion_mnist_tensors["train"][0][:256],
        pipeline="per_tensor",
        a_bits=4,
        progress=False,
    )
    assert [row["group"] for row in table] == ["none", *SITE_GROUPS, "all"]
    assert table[0]["accuracy_drop"] == 0
    by_group = {row["group"]: row for row in table}
    worst = max(SITE_GROUPS, key=lambda g: by_group[g]["accuracy_drop"])
    assert worst == "fc2_input", table.to_markdown()
    assert by_group["fc2_input"]["accuracy_drop"] > 2 * max(
        by_group[g]["accuracy_drop"] for g in SITE_GROUPS if g != "fc2_input"
    ), table.to_markdown()
    fc2 = by_group["fc2_input"]
    assert fc2["top_channels"][0] == 7
    assert fc2["channel_scale_spread"] > 5 * by_group["fc1_input"]["channel_scale_spread"]
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_per_block_rows_and_heat_map(tmp_path):
    torch.manual_seed(0)
    model = ViTForImageClassification(tiny_vit_config()).eval()
    x = torch.randn(64, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    labels = model(pixel_values=x).logits.argmax(-1)
    table = sensitivity(
        model, (x, labels), x[:32], pipeline="minmax", a_bits=4, per_block=True, progress=False
    )
    blocks = model.config.num_hidden_layers
    assert len(table) == 1 + len(SITE_GROUPS) * blocks + 1
    assert {row["block"] for row in table.where(group="fc2_input")} == set(range(blocks))
    figure = plot_sensitivity({"planted": table}, tmp_path / "heat.png")
    assert figure.axes and (tmp_path / "heat.png").read_bytes()[:4] == b"\x89PNG"
