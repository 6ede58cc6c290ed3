"""Per-channel pixel mean and std of a split: the normalization a model trained from scratch should use.

Why: a preset has no pretrained image processor to inherit statistics from, and a fixed guess
(0.5 / 0.5, or another dataset's numbers) silently shifts every input. The training split's own
statistics are what the classical recipes (e.g. the ImageNet mean / std) are, for that dataset.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from datasets import Dataset, Image

from hf_cd.data.images import decode_image
from hf_cd.data.transforms import convert_channels

DEFAULT_MAX_IMAGES = 2000
"""Enough for the mean and std to settle to about three decimals, and a few seconds of decoding."""


@dataclass(frozen=True)
class ChannelStatistics:
    """Per-channel mean and std of pixels rescaled to [0, 1], and how many images they came from."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    num_images: int


def channel_statistics(
    dataset: Dataset,
    num_channels: int,
    *,
    image_column: str = "image",
    max_images: int | None = DEFAULT_MAX_IMAGES,
    seed: int = 0,
) -> ChannelStatistics:
    """Mean and std per channel over ``dataset``'s images (a seeded draw of at most ``max_images``).

    Images are converted to ``num_channels`` (grayscale or RGB) as the model will see them; every
    image counts equally whatever its size. ``std`` is the pixel std over all drawn pixels.
    """
    if len(dataset) == 0:
        raise ValueError("Cannot compute pixel statistics of an empty split.")
    indices = np.arange(len(dataset))
    if max_images is not None and len(dataset) > max_images:
        indices = np.sort(np.random.default_rng(seed).choice(len(dataset), size=max_images, replace=False))
    undecoded = dataset.select_columns([image_column]).cast_column(image_column, Image(decode=False))
    sums = np.zeros(num_channels)
    squares = np.zeros(num_channels)
    for index in indices.tolist():
        image = convert_channels(decode_image(undecoded[index][image_column]), num_channels)
        pixels = np.asarray(image, dtype=np.float64).reshape(-1, num_channels) / 255.0
        sums += pixels.mean(axis=0)
        squares += np.square(pixels).mean(axis=0)
    mean = sums / len(indices)
    std = np.sqrt(np.maximum(squares / len(indices) - np.square(mean), 0.0))
    std = np.where(std > 1e-6, std, 1.0)  # a constant channel: leave it unscaled rather than divide by 0
    return ChannelStatistics(
        mean=tuple(round(float(v), 4) for v in mean),
        std=tuple(round(float(v), 4) for v in std),
        num_images=len(indices),
    )
