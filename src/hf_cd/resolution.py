"""Run a pretrained ViT / DeiT / Dinov2 at another input resolution: position embeddings and processor.

Why a module of its own: any checkpoint fine-tuned on small images needs this (Fashion-MNIST at
56 px instead of 224), not only the offline DINOv2 of `hf_cd.pretrained`. The architecture knowledge
(where the position embeddings live) comes from `hf_cd.architectures`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from hf_cd.architectures import get_layout, unwrap_model


@torch.no_grad()
def resize_position_embeddings(model: nn.Module, image_size: int) -> nn.Module:
    """Resample a ViT / DeiT / Dinov2 model's position embeddings for ``image_size`` inputs, in place.

    Bicubic, as transformers' own ``interpolate_pos_encoding``, done once so the checkpoint is
    self-consistent at the new resolution (``config.image_size`` is updated) and no forward pays
    for the interpolation. Prefix tokens (CLS, DeiT's distillation token) keep their embeddings.
    """
    inner = unwrap_model(model)
    layout = get_layout(inner)
    base = getattr(inner, getattr(inner, "base_model_prefix", ""), inner)
    embeddings = base
    for part in layout.position_embeddings.split("."):
        embeddings = getattr(embeddings, part)
    patch_size = inner.config.patch_size
    if image_size % patch_size:
        raise ValueError(
            f"image_size {image_size} is not a multiple of the patch size {patch_size}; "
            f"use e.g. {max(patch_size, round(image_size / patch_size) * patch_size)}."
        )
    total = embeddings.shape[1]
    old_grid = math.isqrt(total - 1)
    prefix = total - old_grid * old_grid
    new_grid = image_size // patch_size
    if new_grid != old_grid:
        grid = embeddings[:, prefix:].reshape(1, old_grid, old_grid, -1).permute(0, 3, 1, 2).float()
        grid = nn.functional.interpolate(grid, size=(new_grid, new_grid), mode="bicubic", align_corners=False)
        grid = grid.permute(0, 2, 3, 1).reshape(1, new_grid * new_grid, -1).to(embeddings.dtype)
        embeddings.data = torch.cat([embeddings[:, :prefix], grid], dim=1)
    # ViT's embeddings and patch embedding check the input size against their own copies of it.
    for path in (layout.position_embeddings, layout.patch_embedding):
        module = base
        for part in path.split(".")[:-1]:
            module = getattr(module, part)
        if isinstance(getattr(module, "image_size", None), (tuple, list)):
            module.image_size = (image_size, image_size)
        if isinstance(getattr(module, "num_patches", None), int):
            module.num_patches = new_grid * new_grid
    inner.config.image_size = image_size
    return model


def adapt_to_resolution(model: nn.Module, image_processor: Any, image_size: int) -> tuple[nn.Module, Any]:
    """Make a pretrained checkpoint and its processor work at ``image_size`` × ``image_size``.

    The position embeddings are resampled once (`resize_position_embeddings`), and the processor
    resizes every image to exactly that size without a center crop: small images such as
    Fashion-MNIST's 28 × 28 would lose their edges to a 224/256 crop. Both change in place.
    """
    resize_position_embeddings(model, image_size)
    image_processor.size = {"height": image_size, "width": image_size}
    if hasattr(image_processor, "crop_size"):
        image_processor.crop_size = {"height": image_size, "width": image_size}
    image_processor.do_center_crop = False
    image_processor.do_resize = True
    return model, image_processor
