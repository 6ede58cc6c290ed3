"""Decoding images ourselves, so an undecodable one is reported by file or row, never anonymously.

`datasets` decodes an ``Image`` column inside its formatter, where a failure says neither which
file nor which row broke. The loader and the transforms therefore read the undecoded
``{"bytes", "path"}`` entries and decode them here.
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from datasets import Dataset, Image
from PIL import Image as PILImage
from tqdm.auto import tqdm

from hf_cd.data.errors import CorruptImageError

_DECODE_ERRORS = (OSError, SyntaxError, ValueError)
"""What PIL raises for unreadable, truncated or unidentified files (UnidentifiedImageError is an OSError)."""

_SKIP_HINT = (
    "Pass skip_corrupt_images=True to hf_cd.data.load_image_dataset to drop undecodable images, "
    "or call hf_cd.data.find_corrupt_images(dataset) to list them."
)


@dataclass(frozen=True)
class CorruptImage:
    """One image that failed to decode: which split and row, its file if it has one, and why."""

    split: str | None
    index: int
    path: str | None
    reason: str

    def describe(self) -> str:
        where = f"file {self.path!r}" if self.path else "an embedded image (no file path)"
        split = f"split {self.split!r}, " if self.split else ""
        return f"{where} ({split}row {self.index}): {self.reason}"


def _describe_entry(path: str | None, data: bytes | None) -> str:
    if path:
        return f"file {path!r}"
    size = "no data" if data is None else f"{len(data)} bytes"
    return f"an embedded image ({size}, no file path)"


def decode_image(value: Any) -> PILImage.Image:
    """Decode a PIL image, a numpy array, a file path, or a ``datasets.Image(decode=False)`` entry.

    Raises `CorruptImageError` naming the file (or saying it is embedded bytes) when PIL cannot read it.
    """
    if isinstance(value, PILImage.Image):
        return value
    if value is None:
        raise CorruptImageError(f"An image is missing (null entry). {_SKIP_HINT}")
    if isinstance(value, np.ndarray):
        return PILImage.fromarray(value)
    if isinstance(value, (str, os.PathLike)):
        path, data = os.fspath(value), None
    elif isinstance(value, Mapping):
        path, data = value.get("path"), value.get("bytes")
    else:
        raise TypeError(
            f"Cannot decode an image from {type(value).__name__}; expected a PIL image, an array, a path, "
            "or a datasets.Image entry {'bytes': ..., 'path': ...}."
        )
    if data is None and not path:
        raise CorruptImageError(f"An image entry has neither bytes nor a path. {_SKIP_HINT}")
    try:
        with PILImage.open(io.BytesIO(data) if data is not None else path) as image:
            image.load()  # force the full decode now: a truncated file fails here, not mid-batch later
    except _DECODE_ERRORS as exc:
        raise CorruptImageError(f"Cannot decode {_describe_entry(path, data)}: {exc}. {_SKIP_HINT}") from exc
    return image


def find_corrupt_images(
    dataset: Dataset, image_column: str = "image", *, split: str | None = None, batch_size: int = 256
) -> list[CorruptImage]:
    """Decode every image of ``dataset`` once and return those that fail, by row index (and file).

    A full pass costs one decode per image (seconds for Fashion-MNIST, minutes for large JPEG sets),
    which is why the loader runs it only when asked (``skip_corrupt_images=True``).
    """
    undecoded = dataset.select_columns([image_column]).cast_column(image_column, Image(decode=False))
    corrupt = []
    description = f"Checking images ({split})" if split else "Checking images"
    with tqdm(total=undecoded.num_rows, desc=description, unit="img") as progress:
        for start, batch in zip(
            range(0, undecoded.num_rows, batch_size), undecoded.iter(batch_size=batch_size), strict=True
        ):
            for offset, entry in enumerate(batch[image_column]):
                try:
                    decode_image(entry)
                except CorruptImageError as exc:
                    reason = str(exc.__cause__ or exc)
                    corrupt.append(CorruptImage(split, start + offset, (entry or {}).get("path"), reason))
            progress.update(len(batch[image_column]))
    return corrupt
