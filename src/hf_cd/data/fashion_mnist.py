"""Offline Fashion-MNIST from the IDX files of Debian's `dataset-fashion-mnist` package.

Why: the Hub is not always reachable (CI, air-gapped clusters); the Debian package is the
project's embedded real dataset.

`load_fashion_mnist_dataset` turns the arrays into a `datasets.DatasetDict` with an `Image`
column. Each 28×28 image is stored as a binary PGM ("P5" Netpbm: a 13-byte header followed by
the raw pixels), which PIL decodes losslessly. Measured on two busy CPU cores for the 60,000
train images: PGM bytes 0.08 s, hand-built PNG 2.5 s, PIL PNG 6.5 s, `Image()` from numpy
arrays ≈ 14 s. With PGM all 70,000 images load in about a second, so no on-disk cache is needed.
"""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image

DEBIAN_FASHION_MNIST_DIR = Path(
    os.environ.get("HF_CD_FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist")
)
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
_IDX_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
_IDX_DTYPES = {
    0x08: np.uint8,
    0x09: np.int8,
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one IDX file (gzipped or not) into an array, validating the header against the payload."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        data = handle.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path} is not an IDX file (bad magic number); re-install dataset-fashion-mnist.")
    type_code, ndim = data[2], data[3]
    if type_code not in _IDX_DTYPES:
        raise ValueError(f"{path}: unknown IDX element type 0x{type_code:02x}.")
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    dtype = np.dtype(_IDX_DTYPES[type_code])
    payload = data[4 + 4 * ndim :]
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(payload) != expected:
        raise ValueError(
            f"{path} is truncated or corrupt: header says {shape} ({expected} bytes), "
            f"found {len(payload)} bytes."
        )
    return np.frombuffer(payload, dtype=dtype).reshape(shape)


def fashion_mnist_available(root: str | os.PathLike = DEBIAN_FASHION_MNIST_DIR) -> bool:
    """Whether all four IDX files are present, so the offline path can be taken."""
    root = Path(root)
    return all((root / name).is_file() for pair in _IDX_FILES.values() for name in pair)


def load_fashion_mnist_arrays(
    root: str | os.PathLike = DEBIAN_FASHION_MNIST_DIR,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Return ``{"train": (images, labels), "test": (images, labels)}``; images are uint8 N×28×28."""
    root = Path(root)
    if not fashion_mnist_available(root):
        raise FileNotFoundError(
            f"Fashion-MNIST IDX files not found under {root}. Install them with "
            "`apt-get install dataset-fashion-mnist` (or run `make setup`), or set HF_CD_FASHION_MNIST_DIR."
        )
    arrays = {}
    for split, (images_name, labels_name) in _IDX_FILES.items():
        images, labels = read_idx(root / images_name), read_idx(root / labels_name)
        if images.shape[0] != labels.shape[0]:
            raise ValueError(f"Fashion-MNIST {split}: {images.shape[0]} images but {labels.shape[0]} labels.")
        arrays[split] = (images, labels.astype(np.int64))
    return arrays


def encode_pgm(image: np.ndarray) -> bytes:
    """Encode one uint8 H×W grayscale array as binary PGM bytes (lossless, no compression)."""
    if image.dtype != np.uint8 or image.ndim != 2:
        raise ValueError(f"encode_pgm needs a 2-D uint8 array, got {image.dtype} with shape {image.shape}.")
    height, width = image.shape
    return b"P5\n%d %d\n255\n" % (width, height) + image.tobytes()


def fashion_mnist_features() -> Features:
    """The schema of the offline dataset: an `Image` column and a `ClassLabel` with the real names."""
    return Features({"image": Image(), "label": ClassLabel(names=list(FASHION_MNIST_CLASSES))})


def load_fashion_mnist_dataset(root: str | os.PathLike | None = None) -> DatasetDict:
    """Fashion-MNIST as ``DatasetDict(train=60,000, test=10,000)`` built in memory from the IDX files.

    ``root`` defaults to `DEBIAN_FASHION_MNIST_DIR`, read at call time (so tests can point it elsewhere).
    """
    root = DEBIAN_FASHION_MNIST_DIR if root is None else Path(root)
    features = fashion_mnist_features()
    splits = {}
    for split, (images, labels) in load_fashion_mnist_arrays(root).items():
        encoded = [{"bytes": encode_pgm(image), "path": None} for image in images]
        splits[split] = Dataset.from_dict({"image": encoded, "label": labels}, features=features)
    return DatasetDict(splits)
