"""Transforms from image processors (no torchvision): shapes, normalization, channels, determinism."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image
from PIL import Image as PILImage

from conftest import tiny_vit_config
from hf_cd.data import (
    ImagePreprocessing,
    build_image_transforms,
    collate_fn,
    label_mapping,
    set_label_mapping,
    with_image_transforms,
)
from hf_cd.data.transforms import sample_crop_box

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from transformers import BitImageProcessor, DeiTImageProcessor, ViTImageProcessor


def _vit(size: int = 16) -> ViTImageProcessor:
    return ViTImageProcessor(size={"height": size, "width": size})


def _dinov2_style() -> BitImageProcessor:
    """Dinov2's processor shape: resize the shortest edge, then center crop, ImageNet statistics."""
    return BitImageProcessor(
        size={"shortest_edge": 20},
        crop_size={"height": 16, "width": 16},
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
    )


def _deit() -> DeiTImageProcessor:
    return DeiTImageProcessor(size={"height": 20, "width": 20}, crop_size={"height": 16, "width": 16})


def _photo(width: int = 30, height: int = 22, mode: str = "RGB", seed: int = 0) -> PILImage.Image:
    rng = np.random.default_rng(seed)
    channels = {"RGB": (height, width, 3), "L": (height, width)}[mode]
    return PILImage.fromarray(rng.integers(0, 256, size=channels, dtype=np.uint8), mode=mode)


@pytest.mark.parametrize("make_processor", [_vit, _dinov2_style, _deit], ids=["vit", "dinov2", "deit"])
def test_eval_transform_reproduces_the_image_processor(make_processor):
    processor = make_processor()
    image = _photo()
    ours = build_image_transforms(processor, train=False)(image)
    theirs = torch.as_tensor(np.asarray(processor(images=image)["pixel_values"][0]))
    assert ours.dtype == torch.float32
    assert ours.shape == theirs.shape == (3, *ImagePreprocessing.from_image_processor(processor).output_size)
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_normalization_uses_the_processor_mean_and_std():
    processor = _dinov2_style()
    value = 200
    flat = PILImage.new("RGB", (25, 25), (value, value, value))
    pixels = build_image_transforms(processor, train=False)(flat)
    expected = (value / 255 - torch.tensor(processor.image_mean)) / torch.tensor(processor.image_std)
    assert torch.allclose(pixels.mean(dim=(1, 2)), expected.float(), atol=1e-6)
    assert torch.allclose(pixels.std(dim=(1, 2)), torch.zeros(3), atol=1e-6)


def test_grayscale_becomes_rgb_for_a_three_channel_model():
    gray = _photo(mode="L")
    pixels = build_image_transforms(_vit(), train=False, num_channels=3)(gray)
    assert pixels.shape == (3, 16, 16)
    assert torch.equal(pixels[0], pixels[1]) and torch.equal(pixels[1], pixels[2])


def test_rgb_becomes_grayscale_for_a_one_channel_model():
    preprocessing = ImagePreprocessing.from_image_processor(_dinov2_style(), num_channels=1)
    assert preprocessing.mean == (pytest.approx(np.mean([0.485, 0.456, 0.406])),)
    pixels = build_image_transforms(preprocessing, train=False)(_photo())
    assert pixels.shape == (1, 16, 16)
    gray = build_image_transforms(preprocessing, train=False)(_photo().convert("L"))
    assert torch.equal(pixels, gray)


def test_eval_transform_is_deterministic_and_train_transform_is_seeded():
    image = _photo()
    evaluate = build_image_transforms(_dinov2_style(), train=False)
    assert torch.equal(evaluate(image), evaluate(image))

    def augmented(seed: int) -> list[torch.Tensor]:
        train = build_image_transforms(
            _dinov2_style(), train=True, generator=torch.Generator().manual_seed(seed)
        )
        return [train(image) for _ in range(4)]

    first, again, other = augmented(0), augmented(0), augmented(1)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not all(torch.equal(a, b) for a, b in zip(first, other))
    assert not torch.equal(first[0], first[1])  # it does augment
    assert all(pixels.shape == (3, 16, 16) for pixels in first)


def test_train_crop_of_the_whole_image_then_flip_is_the_mirrored_eval_image():
    image = _photo(width=16, height=16)
    processor = _vit()
    whole_and_flipped = build_image_transforms(
        processor, train=True, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_probability=1.0
    )
    assert torch.equal(
        whole_and_flipped(image), build_image_transforms(processor, train=False)(image).flip(-1)
    )


def test_crop_boxes_stay_inside_the_image_and_respect_the_scale():
    generator = torch.Generator().manual_seed(0)
    width, height = 40, 30
    for _ in range(200):
        left, top, crop_width, crop_height = sample_crop_box(
            width, height, (0.3, 0.6), (3 / 4, 4 / 3), generator
        )
        assert left >= 0 and left + crop_width <= width and top >= 0 and top + crop_height <= height
        assert 0.3 * 0.9 <= crop_width * crop_height / (width * height) <= 0.6 * 1.1  # rounding to pixels
    # An aspect ratio the image cannot hold falls back to the largest centered crop within `ratio`.
    assert sample_crop_box(100, 10, (0.9, 1.0), (1.0, 1.0), generator) == (45, 0, 10, 10)


def test_bad_augmentation_arguments_are_rejected():
    with pytest.raises(ValueError, match="scale"):
        build_image_transforms(_vit(), train=True, scale=(0.5, 0.2))
    with pytest.raises(ValueError, match="num_channels"):
        build_image_transforms(_vit(), train=False, num_channels=4)


def _tiny_dataset() -> DatasetDict:
    features = Features({"image": Image(), "label": ClassLabel(names=["dark", "light"])})
    images = [_photo(12, 12, "L", seed) for seed in range(4)]
    split = Dataset.from_dict({"image": images, "label": [0, 1, 0, 1]}, features=features)
    return DatasetDict(train=split, validation=split, test=split)


def test_with_image_transforms_and_collate_fn_feed_a_model():
    config = tiny_vit_config(image_size=16, patch_size=8, num_channels=3)
    transformed = with_image_transforms(_tiny_dataset(), _vit(), num_channels=config.num_channels)
    row = transformed["train"][0]
    assert set(row) == {"pixel_values", "labels"}
    assert row["pixel_values"].shape == (3, 16, 16) and row["labels"] == 0
    # Validation is not augmented: reading it twice gives the same tensors.
    assert torch.equal(
        transformed["validation"][1]["pixel_values"], transformed["validation"][1]["pixel_values"]
    )

    batch = collate_fn([transformed["validation"][i] for i in range(4)])
    assert batch["pixel_values"].shape == (4, 3, 16, 16) and batch["pixel_values"].dtype == torch.float32
    assert batch["labels"].tolist() == [0, 1, 0, 1] and batch["labels"].dtype == torch.long

    from transformers import ViTForImageClassification

    set_label_mapping(config, transformed["train"])
    model = ViTForImageClassification(config)
    assert model(**batch).logits.shape == (4, 2)


def test_label_mapping_comes_from_the_class_label():
    dataset = _tiny_dataset()
    mapping = label_mapping(dataset)
    assert mapping == {
        "num_labels": 2,
        "id2label": {0: "dark", 1: "light"},
        "label2id": {"dark": 0, "light": 1},
    }
    config = set_label_mapping(tiny_vit_config(), dataset["train"])
    assert config.num_labels == 2 and config.id2label == {0: "dark", 1: "light"}
    with pytest.raises(ValueError, match="not a ClassLabel"):
        label_mapping(dataset["train"], label_column="image")


def test_dinov2_processors_load_with_the_pil_backend_and_no_torchvision_warning(tmp_path):
    """transformers' "BitImageProcessor requires torchvision ... falling back" greeted DINOv2 runs.

    In a fresh process each time: transformers prints it once per process.
    """
    import subprocess
    import sys

    def stderr_of(code: str) -> str:
        done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stderr

    assert "requires torchvision" in stderr_of("from transformers import BitImageProcessor")  # what users saw
    ours = stderr_of(
        "import sys\n"
        "from hf_cd.pretrained import dinov2_image_processor\n"
        "from hf_cd.data.transforms import load_image_processor\n"
        "dinov2_image_processor().save_pretrained(sys.argv[1])\n"
        "assert type(load_image_processor(sys.argv[1])).__name__ == 'BitImageProcessorPil'\n"
    )
    assert "torchvision" not in ours
    assert (
        '"image_processor_type": "BitImageProcessor"' in (tmp_path / "preprocessor_config.json").read_text()
    )
