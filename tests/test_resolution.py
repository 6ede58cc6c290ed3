"""Running a pretrained ViT at another resolution (`hf_cd.resolution`)."""

from __future__ import annotations

import pytest
import torch
from transformers import Dinov2ForImageClassification, ViTForImageClassification

from conftest import tiny_dinov2_config, tiny_vit_config
from hf_cd.resolution import resize_position_embeddings


@pytest.mark.parametrize(
    "make",
    [
        lambda: Dinov2ForImageClassification(tiny_dinov2_config(image_size=56, num_channels=3)),
        lambda: ViTForImageClassification(tiny_vit_config(image_size=56, num_channels=3)),
    ],
    ids=["dinov2", "vit"],
)
def test_resized_position_embeddings_equal_transformers_own_interpolation(make, one_cpu_thread):
    torch.manual_seed(0)
    model = make().eval()
    pixels = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        interpolated = model(pixel_values=pixels, interpolate_pos_encoding=True).logits
        resize_position_embeddings(model, 28)
        resized = model(pixel_values=pixels).logits
    assert model.config.image_size == 28
    assert model.base_model.embeddings.position_embeddings.shape[1] == 1 + 4 * 4
    torch.testing.assert_close(resized, interpolated, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="multiple of the patch size 7"):
        resize_position_embeddings(model, 30)
