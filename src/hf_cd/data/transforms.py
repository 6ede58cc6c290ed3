"""Image transforms driven by a model's image processor, with PIL and torch only (no torchvision).

The processor (``ViTImageProcessor``, Dinov2's ``BitImageProcessor``, ``DeiTImageProcessor``...)
decides output size, resize rule, mean and std, so a dataset is always fed the way the model was
pretrained. Evaluation reproduces the processor (resize, center crop, rescale, normalize); training
swaps the resize and crop for a random-resized crop and a horizontal flip.

Transforms are frozen dataclasses, not closures, so ``DataLoader`` workers can pickle them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from datasets import DatasetDict, Image
from PIL import Image as PILImage

from hf_cd.data.images import decode_image

ImageTransform = Callable[[PILImage.Image], torch.Tensor]
"""One PIL image in, one float C×H×W tensor out."""

_MODES = {1: "L", 3: "RGB"}


def _size_field(size: Any, key: str) -> int | None:
    """Read ``height`` / ``width`` / ``shortest_edge``... from a SizeDict, a dict, or None."""
    if size is None:
        return None
    value = size.get(key) if isinstance(size, Mapping) else getattr(size, key, None)
    return None if value is None else int(value)


def _per_channel(values: float | Iterable[float], num_channels: int, name: str) -> tuple[float, ...]:
    values = (float(values),) if isinstance(values, (int, float)) else tuple(float(v) for v in values)
    if len(values) == num_channels:
        return values
    if len(values) == 1:
        return values * num_channels
    if num_channels == 1:
        # A grayscale model with RGB statistics: the channel average is the statistic of a gray image
        # whose three channels are equal.
        return (sum(values) / len(values),)
    raise ValueError(
        f"The image processor's {name} has {len(values)} values but the model has {num_channels} channels."
    )


@dataclass(frozen=True)
class ImagePreprocessing:
    """What an image processor does to one image, read once so the transforms are pure functions of it."""

    output_size: tuple[int, int]
    """(height, width) of ``pixel_values``."""
    resize_to: tuple[int, int] | None
    """Evaluation: resize to exactly this (height, width) (ViT, DeiT)."""
    resize_shortest_edge: int | None
    """Evaluation: resize so the shorter side has this length, keeping the aspect ratio (Dinov2)."""
    center_crop: bool
    mean: tuple[float, ...]
    std: tuple[float, ...]
    rescale_factor: float
    resample: int
    """A PIL resampling filter, e.g. ``PIL.Image.Resampling.BICUBIC``."""
    num_channels: int

    @classmethod
    def from_image_processor(cls, image_processor: Any, num_channels: int = 3) -> ImagePreprocessing:
        """Read size, crop, mean, std, rescale and resample from a Hugging Face image processor."""
        if num_channels not in _MODES:
            raise ValueError(f"num_channels must be 1 (grayscale) or 3 (RGB), got {num_channels}.")
        size = getattr(image_processor, "size", None)
        resize_to = resize_shortest_edge = None
        if getattr(image_processor, "do_resize", True):
            height, width = _size_field(size, "height"), _size_field(size, "width")
            shortest_edge = _size_field(size, "shortest_edge")
            if height and width:
                resize_to = (height, width)
            elif shortest_edge and not _size_field(size, "longest_edge"):
                resize_shortest_edge = shortest_edge
            else:
                raise ValueError(
                    f"Unsupported image processor size {size}: "
                    "expected height and width, or shortest_edge alone."
                )
        center_crop = bool(getattr(image_processor, "do_center_crop", False))
        crop_size = getattr(image_processor, "crop_size", None)
        if center_crop:
            crop_height, crop_width = _size_field(crop_size, "height"), _size_field(crop_size, "width")
            if not (crop_height and crop_width):
                raise ValueError(
                    f"The image processor center-crops but its crop_size {crop_size} has no height/width."
                )
            output_size = (crop_height, crop_width)
        elif resize_to is not None:
            output_size = resize_to
        else:
            raise ValueError(
                "Cannot tell the output size: the image processor neither center-crops nor resizes "
                f"to a fixed height and width (size={size}, crop_size={crop_size})."
            )
        do_normalize = getattr(image_processor, "do_normalize", True)
        mean = image_processor.image_mean if do_normalize else 0.0
        std = image_processor.image_std if do_normalize else 1.0
        do_rescale = getattr(image_processor, "do_rescale", True)
        resample = getattr(image_processor, "resample", None)
        return cls(
            output_size=output_size,
            resize_to=resize_to,
            resize_shortest_edge=resize_shortest_edge,
            center_crop=center_crop,
            mean=_per_channel(mean, num_channels, "image_mean"),
            std=_per_channel(std, num_channels, "image_std"),
            rescale_factor=float(image_processor.rescale_factor) if do_rescale else 1.0,
            resample=int(PILImage.Resampling.BILINEAR if resample is None else resample),
            num_channels=num_channels,
        )


def convert_channels(image: PILImage.Image, num_channels: int) -> PILImage.Image:
    """Grayscale to RGB for a 3-channel model, RGB to grayscale ("L") for a 1-channel one."""
    mode = _MODES[num_channels]
    return image if image.mode == mode else image.convert(mode)


def to_normalized_tensor(image: PILImage.Image, preprocessing: ImagePreprocessing) -> torch.Tensor:
    """uint8 PIL image to float32 C×H×W, rescaled then normalized with the processor's mean and std."""
    pixels = torch.from_numpy(np.array(image, dtype=np.uint8))
    pixels = pixels.unsqueeze(0) if pixels.ndim == 2 else pixels.permute(2, 0, 1)
    mean = torch.tensor(preprocessing.mean, dtype=torch.float32).view(-1, 1, 1)
    std = torch.tensor(preprocessing.std, dtype=torch.float32).view(-1, 1, 1)
    return (pixels.to(torch.float32) * preprocessing.rescale_factor - mean) / std


def _shortest_edge_size(width: int, height: int, shortest_edge: int) -> tuple[int, int]:
    """(width, height) with the shorter side at ``shortest_edge``; the rounding of Hugging Face processors."""
    if width <= height:
        return shortest_edge, int(shortest_edge * height / width)
    return int(shortest_edge * width / height), shortest_edge


@dataclass(frozen=True)
class EvalImageTransform:
    """Resize, center crop, rescale, normalize: the processor's own pipeline, deterministic."""

    preprocessing: ImagePreprocessing

    def __call__(self, image: PILImage.Image) -> torch.Tensor:
        p = self.preprocessing
        image = convert_channels(image, p.num_channels)
        if p.resize_to is not None:
            image = image.resize((p.resize_to[1], p.resize_to[0]), resample=p.resample)
        elif p.resize_shortest_edge is not None:
            image = image.resize(
                _shortest_edge_size(*image.size, p.resize_shortest_edge), resample=p.resample
            )
        if p.center_crop:
            height, width = p.output_size
            left, top = (image.width - width) // 2, (image.height - height) // 2
            image = image.crop((left, top, left + width, top + height))
        return to_normalized_tensor(image, p)


def _uniform(low: float, high: float, generator: torch.Generator | None) -> float:
    return low + (high - low) * torch.rand(1, generator=generator).item()


def sample_crop_box(
    width: int,
    height: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    generator: torch.Generator | None = None,
) -> tuple[int, int, int, int]:
    """A random (left, top, crop_width, crop_height) covering ``scale`` of the area at aspect ``ratio``.

    The Inception-style crop: ten tries at a random area and log-uniform aspect ratio; if none fits
    inside the image, the largest centered crop whose aspect ratio lies within ``ratio``.
    """
    area = width * height
    log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target_area = area * _uniform(scale[0], scale[1], generator)
        aspect = math.exp(_uniform(log_low, log_high, generator))
        crop_width = round(math.sqrt(target_area * aspect))
        crop_height = round(math.sqrt(target_area / aspect))
        if 0 < crop_width <= width and 0 < crop_height <= height:
            left = int(torch.randint(0, width - crop_width + 1, (1,), generator=generator).item())
            top = int(torch.randint(0, height - crop_height + 1, (1,), generator=generator).item())
            return left, top, crop_width, crop_height
    image_ratio = width / height
    if image_ratio < ratio[0]:
        crop_width, crop_height = width, max(1, round(width / ratio[0]))
    elif image_ratio > ratio[1]:
        crop_width, crop_height = max(1, round(height * ratio[1])), height
    else:
        crop_width, crop_height = width, height
    return (width - crop_width) // 2, (height - crop_height) // 2, crop_width, crop_height


@dataclass(frozen=True)
class TrainImageTransform:
    """Random-resized crop to the processor's output size, random horizontal flip, rescale, normalize.

    With a ``generator`` the augmentation is reproducible. Leave it ``None`` when a ``DataLoader``
    uses several workers: each worker would get a copy of the same generator, hence the same crops,
    whereas torch's global RNG is seeded differently per worker.
    """

    preprocessing: ImagePreprocessing
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_probability: float = 0.5
    generator: torch.Generator | None = None

    def __post_init__(self) -> None:
        if not 0.0 < self.scale[0] <= self.scale[1] <= 1.0:
            raise ValueError(f"scale must satisfy 0 < low <= high <= 1, got {self.scale}.")
        if not 0.0 < self.ratio[0] <= self.ratio[1]:
            raise ValueError(f"ratio must satisfy 0 < low <= high, got {self.ratio}.")
        if not 0.0 <= self.flip_probability <= 1.0:
            raise ValueError(f"flip_probability must lie in [0, 1], got {self.flip_probability}.")

    def __call__(self, image: PILImage.Image) -> torch.Tensor:
        p = self.preprocessing
        image = convert_channels(image, p.num_channels)
        left, top, width, height = sample_crop_box(
            image.width, image.height, self.scale, self.ratio, self.generator
        )
        out_height, out_width = p.output_size
        image = image.resize(
            (out_width, out_height), resample=p.resample, box=(left, top, left + width, top + height)
        )
        if torch.rand(1, generator=self.generator).item() < self.flip_probability:
            image = image.transpose(PILImage.Transpose.FLIP_LEFT_RIGHT)
        return to_normalized_tensor(image, p)


def build_image_transforms(
    image_processor: Any,
    train: bool,
    num_channels: int = 3,
    *,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    flip_probability: float = 0.5,
    generator: torch.Generator | None = None,
) -> ImageTransform:
    """The train (augmenting) or eval (deterministic) transform for a model's image processor.

    ``image_processor`` may also be an `ImagePreprocessing` already read from one.
    ``num_channels`` is the model's (``config.num_channels``): images are converted to match.
    """
    preprocessing = (
        image_processor
        if isinstance(image_processor, ImagePreprocessing)
        else ImagePreprocessing.from_image_processor(image_processor, num_channels)
    )
    if not train:
        return EvalImageTransform(preprocessing)
    return TrainImageTransform(preprocessing, tuple(scale), tuple(ratio), flip_probability, generator)


@dataclass(frozen=True)
class ImageClassificationTransform:
    """The ``with_transform`` function: a batch of rows to ``pixel_values`` tensors and ``labels``."""

    image_transform: ImageTransform
    image_column: str = "image"
    label_column: str = "label"

    def __call__(self, batch: Mapping[str, Sequence[Any]]) -> dict[str, list[Any]]:
        output: dict[str, list[Any]] = {
            "pixel_values": [self.image_transform(decode_image(value)) for value in batch[self.image_column]]
        }
        if self.label_column in batch:
            output["labels"] = [int(label) for label in batch[self.label_column]]
        return output


def with_image_transforms(
    dataset: DatasetDict,
    image_processor: Any,
    num_channels: int = 3,
    *,
    train_split: str = "train",
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    flip_probability: float = 0.5,
    generator: torch.Generator | None = None,
    image_column: str = "image",
    label_column: str = "label",
) -> DatasetDict:
    """Attach the train transform to ``train_split`` and the eval transform to every other split, lazily.

    Rows then read as ``{"pixel_values": C×H×W float tensor, "labels": int}``. Images are decoded by
    `decode_image`, so a corrupt one raises `CorruptImageError` naming its file. With the
    ``Trainer`` pass ``TrainingArguments(remove_unused_columns=False)`` (otherwise it drops the
    ``image`` column before the transform sees it) and ``data_collator=collate_fn``.
    """
    preprocessing = (
        image_processor
        if isinstance(image_processor, ImagePreprocessing)
        else ImagePreprocessing.from_image_processor(image_processor, num_channels)
    )
    transformed = {}
    for split, split_dataset in dataset.items():
        image_transform = build_image_transforms(
            preprocessing,
            train=split == train_split,
            scale=scale,
            ratio=ratio,
            flip_probability=flip_probability,
            generator=generator,
        )
        undecoded = split_dataset.cast_column(image_column, Image(decode=False))
        transformed[split] = undecoded.with_transform(
            ImageClassificationTransform(image_transform, image_column, label_column)
        )
    return DatasetDict(transformed)


def collate_fn(examples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
    """Stack transformed rows into ``pixel_values`` (B×C×H×W) and ``labels`` (B, int64) for the Trainer."""
    batch = {"pixel_values": torch.stack([example["pixel_values"] for example in examples])}
    if "labels" in examples[0]:
        batch["labels"] = torch.tensor([int(example["labels"]) for example in examples], dtype=torch.long)
    return batch


IMAGE_PROCESSOR_BACKEND = "pil"
"""Which transformers image-processor backend hf-cd loads: the PIL one, on every machine.

Why not torchvision (transformers' default where it is installed): it is a speed path for the same
preprocessing, but a different resize implementation, so numbers would depend on whether a machine
has torchvision; the package pins a torchvision build to one torch build (CPU vs CUDA), which makes
it a fragile dependency; and hf-cd's own training transforms are PIL + torch already. Asking for
the PIL backend by name also silences transformers' "requires torchvision … falling back" warning.
"""


def load_image_processor(name_or_path: Any, **kwargs: Any):
    """``AutoImageProcessor.from_pretrained`` with the PIL backend (`IMAGE_PROCESSOR_BACKEND`)."""
    from transformers import AutoImageProcessor

    return AutoImageProcessor.from_pretrained(name_or_path, backend=IMAGE_PROCESSOR_BACKEND, **kwargs)
