"""Read calibration and evaluation data in every form a user has it, one batch at a time.

Accepted: a ``pixel_values`` tensor (calibration) or ``(pixel_values, labels)`` tensors; a dict batch
(``pixel_values`` / ``labels``, what a Trainer ``collate_fn`` gives); an iterable of such batches
(a ``DataLoader``, a list); or a map-style dataset of rows (a `datasets.Dataset` already transformed
to ``pixel_values`` / ``labels``, or a torch ``Dataset``), read through a ``DataLoader``.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from hf_cd.data.loading import warn_if_capped


class CalibrationDataError(ValueError):
    """Calibration or evaluation data that cannot be used; the message says what was expected."""


def _as_tensor(value: Any, what: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    try:
        return torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError) as error:
        raise CalibrationDataError(
            f"{what} is a {type(value).__name__}, not something torch.as_tensor reads."
        ) from error


def split_batch(batch: Any, need_labels: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(pixel_values, labels)`` of one batch given as a dict, a tuple / list or a tensor."""
    if isinstance(batch, Mapping):
        if "pixel_values" not in batch:
            raise CalibrationDataError(
                f"A batch dict has no 'pixel_values' (keys: {sorted(batch)}); transform the dataset first, e.g. "
                "hf_cd.data.with_image_transforms(dataset, image_processor)."
            )
        pixel_values = batch["pixel_values"]
        labels = batch.get("labels", batch.get("label"))
    elif isinstance(batch, (tuple, list)) and batch and not isinstance(batch[0], (int, float)):
        pixel_values = batch[0]
        labels = batch[1] if len(batch) > 1 else None
    else:
        pixel_values, labels = batch, None
    pixel_values = _as_tensor(pixel_values, "pixel_values")
    if pixel_values.ndim == 3:
        pixel_values = pixel_values.unsqueeze(0)
    if pixel_values.ndim != 4:
        raise CalibrationDataError(
            f"pixel_values must be images of shape (batch, channels, height, width), got shape {tuple(pixel_values.shape)}."
        )
    if labels is not None:
        labels = _as_tensor(labels, "labels").reshape(-1)
        if labels.shape[0] != pixel_values.shape[0]:
            raise CalibrationDataError(
                f"{pixel_values.shape[0]} images but {labels.shape[0]} labels in a batch."
            )
    elif need_labels:
        raise CalibrationDataError(
            "Evaluation data needs labels: pass (pixel_values, labels) tensors, batches with a 'labels' key, "
            "or a dataset whose rows have 'labels'."
        )
    return pixel_values, labels


def collate_rows(rows: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
    """Stack dataset rows (``pixel_values``, ``labels`` or ``label``) into a batch."""
    first = rows[0]
    if not isinstance(first, Mapping) or "pixel_values" not in first:
        what = sorted(first) if isinstance(first, Mapping) else type(first).__name__
        raise CalibrationDataError(
            f"Dataset rows must be dicts with 'pixel_values' (got {what}); apply the image transform first, "
            "e.g. hf_cd.data.with_image_transforms(dataset, image_processor)."
        )
    batch = {"pixel_values": torch.stack([_as_tensor(row["pixel_values"], "pixel_values") for row in rows])}
    key = "labels" if "labels" in first else "label" if "label" in first else None
    if key is not None:
        batch["labels"] = torch.tensor([int(row[key]) for row in rows], dtype=torch.long)
    return batch


def _is_row_dataset(data: Any) -> bool:
    """A map-style dataset of rows (as opposed to a DataLoader or a list of batches)."""
    try:
        import datasets

        if isinstance(data, datasets.DatasetDict):
            raise CalibrationDataError(
                f"Got a DatasetDict with splits {list(data)}; pass one split, e.g. dataset['test']."
            )
        if isinstance(data, datasets.Dataset):
            return True
    except ImportError:  # pragma: no cover - datasets is a dependency
        pass
    return isinstance(data, torch.utils.data.Dataset) and not isinstance(
        data, torch.utils.data.IterableDataset
    )


def _is_tensor_pair(data: Any) -> bool:
    return (
        isinstance(data, (tuple, list))
        and len(data) == 2
        and all(isinstance(part, torch.Tensor) for part in data)
        and data[0].ndim == 4
    )


def iterate_batches(
    data: Any, batch_size: int, need_labels: bool
) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """Yield ``(pixel_values, labels)`` batches of ``data`` (on the device they were given)."""
    if isinstance(data, torch.Tensor):
        pixel_values, _ = split_batch(data, need_labels)
        for start in range(0, pixel_values.shape[0], batch_size):
            yield pixel_values[start : start + batch_size], None
    elif _is_tensor_pair(data):
        pixel_values, labels = split_batch(tuple(data), need_labels)
        for start in range(0, pixel_values.shape[0], batch_size):
            yield pixel_values[start : start + batch_size], labels[start : start + batch_size]
    elif isinstance(data, Mapping):
        pixel_values, labels = split_batch(data, need_labels)
        yield from iterate_batches(
            pixel_values if labels is None else (pixel_values, labels), batch_size, need_labels
        )
    elif _is_row_dataset(data):
        loader = DataLoader(data, batch_size=batch_size, shuffle=False, collate_fn=collate_rows)
        for batch in loader:
            yield split_batch(batch, need_labels)
    elif isinstance(data, Iterable):
        for batch in data:
            yield split_batch(batch, need_labels)
    else:
        raise CalibrationDataError(
            f"Cannot read images from a {type(data).__name__}: pass a pixel_values tensor, (pixel_values, labels) "
            "tensors, a DataLoader / list of batches, or a datasets.Dataset with pixel_values and labels."
        )


def num_batches(data: Any, batch_size: int) -> int | None:
    """How many batches `iterate_batches` will yield, where that is known up front (for the progress bar)."""
    if isinstance(data, torch.Tensor):
        return -(-data.shape[0] // batch_size)
    if _is_tensor_pair(data):
        return -(-data[0].shape[0] // batch_size)
    if isinstance(data, Mapping):
        return (
            num_batches(_as_tensor(data.get("pixel_values"), "pixel_values"), batch_size)
            if "pixel_values" in data
            else None
        )
    if _is_row_dataset(data):
        return -(-len(data) // batch_size)
    try:
        return len(data)
    except TypeError:
        return None


def check_reiterable(data: Any, what: str) -> None:
    """Refuse one-shot iterators where the data is read more than once (once per result row)."""
    if isinstance(data, Iterator):
        raise CalibrationDataError(
            f"{what} is a one-shot iterator ({type(data).__name__}) but is read once per result row; pass a "
            "DataLoader, a list of batches, tensors or a dataset instead."
        )


def select_calibration_images(data: Any, num_images: int, seed: int, batch_size: int = 256) -> torch.Tensor:
    """``num_images`` calibration images as one CPU tensor, the same for the same ``data`` and ``seed``.

    Tensors and datasets are sampled at random (without replacement) with ``seed``; an iterable of
    batches gives its first ``num_images`` images (shuffle a DataLoader with a seeded generator to
    draw them at random). Fewer images than asked are used as they are; none is an error.
    """
    if data is None:
        raise CalibrationDataError("No calibration data: pass calibration images to quantize activations.")
    if isinstance(data, torch.Tensor) or _is_tensor_pair(data) or isinstance(data, Mapping):
        pixel_values = split_batch(data, need_labels=False)[0]
        count = pixel_values.shape[0]
        if count:
            generator = torch.Generator().manual_seed(seed)
            index = torch.randperm(count, generator=generator)[:num_images].to(pixel_values.device)
            pixel_values = pixel_values[index]
        images = [pixel_values]
    elif _is_row_dataset(data):
        count = len(data)
        generator = torch.Generator().manual_seed(seed)
        index = torch.randperm(count, generator=generator)[:num_images].tolist()
        images = (
            [batch[0] for batch in iterate_batches(Subset(data, index), batch_size, False)] if index else []
        )
    else:
        images, taken = [], 0
        for pixel_values, _ in iterate_batches(data, batch_size, need_labels=False):
            images.append(pixel_values[: num_images - taken])
            taken += images[-1].shape[0]
            if taken >= num_images:
                break
    images = [image.detach().cpu() for image in images if image.shape[0]]
    if images:
        warn_if_capped("calibration images", num_images, sum(image.shape[0] for image in images))
    if not images:
        raise CalibrationDataError(
            "The calibration data is empty: no images to calibrate activation ranges on. Pass at least one image "
            "(RepQ-ViT uses 32 from the training split)."
        )
    return torch.cat(images)


NORMALIZED_ABS_LIMIT = 20.0
"""A pixel normalized as image processors do, ``(p − mean) / std`` with ``p`` in [0, 1], stays well
inside ±20 for any usual mean and std (ImageNet's: −2.1 … 2.6; 0.5 / 0.5: −1 … 1). Raw 0–255 pixels
reach 255."""


class UnnormalizedImagesWarning(UserWarning):
    """Images whose values look like raw or merely rescaled pixels rather than an image processor's output."""


_PROCESSOR_HINT = (
    "Use the model's image processor (transformers.AutoImageProcessor: rescale to [0, 1], then normalize "
    "with its image_mean / image_std), e.g. hf_cd.data.with_image_transforms(dataset, image_processor)."
)


def expected_image_shape(model: nn.Module) -> tuple[int | None, int | None]:
    """``(num_channels, image_size)`` the model's config asks for; the size is ``None`` when the model
    resamples its position embeddings to any input size (`BlockLayout.interpolates_position_embeddings`)."""
    from hf_cd.architectures import ARCHITECTURES, unwrap_model

    config = getattr(unwrap_model(model), "config", None)
    channels = getattr(config, "num_channels", None)
    size = getattr(config, "image_size", None)
    layout = ARCHITECTURES.get(getattr(config, "model_type", None))
    if layout is not None and layout.interpolates_position_embeddings:
        size = None
    return channels, size


def check_pixel_values(
    pixel_values: torch.Tensor, model: nn.Module, what: str, value_range: bool = True
) -> None:
    """Refuse images the model cannot read as its image processor would give them, saying what to do.

    Integer pixels are an error (calibrating on 0–255 values fits every range to the wrong scale;
    the quantized model then disagrees with the float one on almost every image); so is a layout or
    shape other than ``(batch, num_channels, image_size, image_size)``. Float values far outside a
    normalized range only warn (``value_range``), since a model may have been trained that way.
    """
    channels, size = expected_image_shape(model)
    layout = (
        f"(batch, {channels if channels else 'channels'}, {size if size else 'height'}, "
        f"{size if size else 'width'})"
    )
    if not pixel_values.is_floating_point():
        raise CalibrationDataError(
            f"{what} are {str(pixel_values.dtype).replace('torch.', '')} pixels (raw image values); the model "
            f"reads floats of shape {layout}, rescaled and normalized. {_PROCESSOR_HINT}"
        )
    shape = tuple(pixel_values.shape)
    if channels and shape[1] != channels:
        if shape[-1] == channels and (size is None or shape[1:3] == (size, size)):
            fix = "they look channels-last (NHWC): pass pixel_values.permute(0, 3, 1, 2)"
        else:
            fix = (
                f"convert the images to {'grayscale' if channels == 1 else f'{channels} channels'} first "
                "(hf_cd.data.with_image_transforms(..., num_channels=...) does)"
            )
        raise CalibrationDataError(
            f"{what} have shape {shape}, but the model expects channels-first images {layout} "
            f"(config.num_channels={channels}); {fix}."
        )
    if size and shape[2:] != (size, size):
        raise CalibrationDataError(
            f"{what} have shape {shape}, but the model expects {layout} (config.image_size={size}); resize "
            "them with the model's image processor."
        )
    if value_range and pixel_values.numel():
        low, high = float(pixel_values.min()), float(pixel_values.max())
        if max(abs(low), abs(high)) > NORMALIZED_ABS_LIMIT:
            warnings.warn(
                f"{what} range from {low:.4g} to {high:.4g}, far outside what an image processor's normalization "
                f"gives (within about ±{NORMALIZED_ABS_LIMIT:g}): are they 0–255 pixels? Ranges fitted to them will "
                f"not match real inputs. {_PROCESSOR_HINT}",
                UnnormalizedImagesWarning,
                stacklevel=3,
            )
        elif low >= 0.0 and high <= 1.0 and pixel_values.shape[0] > 1:
            warnings.warn(
                f"{what} all lie in [0, 1] ({low:.3g} … {high:.3g}): rescaled but not normalized? Most image "
                f"processors normalize to values around 0 (ignore this if yours has do_normalize=False). "
                f"{_PROCESSOR_HINT}",
                UnnormalizedImagesWarning,
                stacklevel=3,
            )
