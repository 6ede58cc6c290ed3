"""The embedded Fashion-MNIST: the IDX reader against facts of the real files, and the offline dataset."""

from __future__ import annotations

import gzip
import io
import struct

import numpy as np
import pytest
from PIL import Image as PILImage

from conftest import requires_fashion_mnist
from hf_cd.data import (
    FASHION_MNIST_CLASSES,
    SPLITS,
    load_fashion_mnist_arrays,
    load_fashion_mnist_dataset,
    load_image_dataset,
    read_idx,
)
from hf_cd.data.fashion_mnist import encode_pgm


@requires_fashion_mnist
def test_idx_files_hold_the_published_fashion_mnist():
    arrays = load_fashion_mnist_arrays()
    train_images, train_labels = arrays["train"]
    test_images, test_labels = arrays["test"]
    # The dataset paper: 60,000 training and 10,000 test images, 28×28 grayscale, 10 classes.
    assert train_images.shape == (60_000, 28, 28) and test_images.shape == (10_000, 28, 28)
    assert train_images.dtype == np.uint8
    assert (
        set(np.unique(train_labels)) == set(range(len(FASHION_MNIST_CLASSES))) == set(np.unique(test_labels))
    )
    per_class = np.bincount(train_labels)
    balanced = train_labels.size / len(FASHION_MNIST_CLASSES)
    assert np.all(np.abs(per_class - balanced) <= 0.05 * balanced)  # roughly 6,000 each
    assert 0 < train_images.mean() < 255  # real pictures, not an all-black or all-white payload


@requires_fashion_mnist
def test_offline_dataset_matches_the_idx_arrays():
    arrays = load_fashion_mnist_arrays()
    dataset = load_fashion_mnist_dataset()
    for split, (images, labels) in arrays.items():
        assert dataset[split].num_rows == images.shape[0]
        assert dataset[split].features["label"].names == list(FASHION_MNIST_CLASSES)
        for index in (0, images.shape[0] // 2, images.shape[0] - 1):
            row = dataset[split][index]
            assert np.array_equal(np.asarray(row["image"]), images[index])
            assert row["label"] == labels[index]


@requires_fashion_mnist
def test_load_image_dataset_defaults_to_offline_fashion_mnist(monkeypatch):
    import hf_cd.data.loading as loading

    def no_hub(*args, **kwargs):
        raise AssertionError("the Hub must not be contacted when the Debian files are installed")

    monkeypatch.setattr(loading, "load_dataset", no_hub)
    dataset = load_image_dataset(validation_fraction=0.1, seed=0)
    train_labels = load_fashion_mnist_arrays()["train"][1]
    assert list(dataset) == list(SPLITS)
    assert dataset["validation"].num_rows == round(0.1 * train_labels.size)
    assert dataset["train"].num_rows + dataset["validation"].num_rows == train_labels.size
    validation_counts = np.bincount(dataset["validation"].with_format("numpy")[:]["label"])
    assert np.all(np.abs(validation_counts - 0.1 * np.bincount(train_labels)) < 1.0)  # stratified


def test_without_debian_files_or_hub_the_error_says_how_to_install(monkeypatch, tmp_path):
    import hf_cd.data.fashion_mnist as fashion_mnist_module
    import hf_cd.data.loading as loading

    def unreachable_hub(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'zalando-datasets/fashion_mnist' on the Hub")

    monkeypatch.setattr(fashion_mnist_module, "DEBIAN_FASHION_MNIST_DIR", tmp_path)
    monkeypatch.setattr(loading, "load_dataset", unreachable_hub)
    with pytest.raises(ConnectionError, match=r"no offline copy.*apt-get install dataset-fashion-mnist"):
        load_image_dataset("fashion_mnist")


def test_pgm_encoding_is_lossless():
    image = np.random.default_rng(0).integers(0, 256, size=(5, 7), dtype=np.uint8)
    decoded = PILImage.open(io.BytesIO(encode_pgm(image)))
    assert decoded.mode == "L" and decoded.size == (7, 5)
    assert np.array_equal(np.asarray(decoded), image)
    with pytest.raises(ValueError, match="2-D uint8"):
        encode_pgm(image.astype(np.int16))


def _write_idx(path, array: np.ndarray, type_code: int = 0x08, truncate: int = 0) -> None:
    header = bytes([0, 0, type_code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = array.astype(">u1").tobytes()
    with gzip.open(path, "wb") as handle:
        handle.write(header + payload[: len(payload) - truncate])


def test_idx_reader_round_trip_and_bad_files(tmp_path):
    array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    _write_idx(tmp_path / "ok.gz", array)
    assert np.array_equal(read_idx(tmp_path / "ok.gz"), array)

    _write_idx(tmp_path / "short.gz", array, truncate=5)
    with pytest.raises(ValueError, match="truncated or corrupt"):
        read_idx(tmp_path / "short.gz")

    (tmp_path / "bad").write_bytes(b"\x01\x02\x08\x01\x00\x00\x00\x01\x07")
    with pytest.raises(ValueError, match="bad magic"):
        read_idx(tmp_path / "bad")


def test_missing_idx_files_say_how_to_install(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist_dataset(tmp_path)
