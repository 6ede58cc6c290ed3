"""Small local stand-ins for the Hub datasets `hf_cd.data` knows, with each one's exact schema.

Column names, feature types and split names are those of the Hub dataset cards (the number of
rows and classes is cut down). `FakeHub` replaces `datasets.load_dataset` inside the loader, so the
real mapping code runs on these fixtures, and it checks the repo / config / revision asked for.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image, Value
from PIL import Image as PILImage

from hf_cd.data.fashion_mnist import FASHION_MNIST_CLASSES


def png_bytes(mode: str, value: int, size: tuple[int, int] = (8, 8)) -> bytes:
    """A flat image of one gray level / color, PNG-encoded."""
    buffer = io.BytesIO()
    color = value if mode == "L" else (value, 255 - value, value // 2)
    PILImage.new(mode, size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def write_png(path: Path, mode: str = "RGB", value: int = 128, size: tuple[int, int] = (8, 8)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png_bytes(mode, value, size))
    return path


@dataclass(frozen=True)
class HubFixture:
    """What the loader should ask the Hub for, what it gets back, and what it should make of it."""

    repo_id: str
    config: str | None
    revision: str | None
    dataset: DatasetDict
    image_column: str
    label_column: str
    expected_names: tuple[str, ...]
    """Class names the loader must produce for ``label_column``."""
    image_value: int
    """Gray level of every image in ``image_column`` (other image columns use another value)."""
    image_mode: str


def _rows(split_sizes: dict[str, int], num_classes: int) -> dict[str, np.ndarray]:
    """Labels per split: classes cycled, so every class appears in every split."""
    return {split: np.arange(size) % num_classes for split, size in split_sizes.items()}


def _image_entries(mode: str, value: int, count: int) -> list[dict]:
    data = png_bytes(mode, value)
    return [{"bytes": data, "path": f"img_{i:05d}.png"} for i in range(count)]


# --- the five Hub datasets -------------------------------------------------------------------------

FASHION_MNIST_HUB_NAMES = (
    "T - shirt / top",
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
"""Names on zalando-datasets/fashion_mnist (spaced differently from the project's)."""

EUROSAT_NAMES = (
    "AnnualCrop",
    "Forest",
    "HerbaceousVegetation",
    "Highway",
    "Industrial",
    "Pasture",
    "PermanentCrop",
    "Residential",
    "River",
    "SeaLake",
)
SUN397_NAMES = ("abbey", "airplane_cabin", "airport_terminal", "alley", "amphitheater")
"""The first five of tanganke/sun397's 397 names."""
SMALLNORB_NAMES = ("animal", "human", "airplane", "truck", "car")
"""The -cat codes 0..4 of NYU's smallNORB files; the Hub copy stores only the integers."""
FGVC_VARIANTS = ("707-320", "727-200", "737-200", "737-300", "A300B4", "A310")
FGVC_FAMILIES = ("Boeing 707", "Boeing 727", "Boeing 737", "A300", "A310")
FGVC_MANUFACTURERS = ("Boeing", "Airbus")
FGVC_FAMILY_OF_VARIANT = (0, 1, 2, 2, 3, 4)
FGVC_MANUFACTURER_OF_FAMILY = (0, 0, 0, 1, 1)


def fashion_mnist_hub() -> HubFixture:
    features = Features({"image": Image(), "label": ClassLabel(names=list(FASHION_MNIST_HUB_NAMES))})
    labels = _rows({"train": 60, "test": 20}, 10)
    dataset = DatasetDict(
        {
            split: Dataset.from_dict(
                {"image": _image_entries("L", 30, len(y)), "label": y}, features=features
            )
            for split, y in labels.items()
        }
    )
    return HubFixture(
        "zalando-datasets/fashion_mnist",
        "fashion_mnist",
        None,
        dataset,
        "image",
        "label",
        FASHION_MNIST_CLASSES,
        30,
        "L",
    )


def eurosat_hub() -> HubFixture:
    features = Features(
        {"image": Image(), "label": ClassLabel(names=list(EUROSAT_NAMES)), "image_id": Value("string")}
    )
    labels = _rows({"train": 40, "validation": 20, "test": 20}, 10)
    dataset = DatasetDict(
        {
            split: Dataset.from_dict(
                {
                    "image": _image_entries("RGB", 70, len(y)),
                    "label": y,
                    "image_id": [f"{EUROSAT_NAMES[c]}_{i}" for i, c in enumerate(y)],
                },
                features=features,
            )
            for split, y in labels.items()
        }
    )
    return HubFixture("timm/eurosat-rgb", None, None, dataset, "image", "label", EUROSAT_NAMES, 70, "RGB")


def sun397_hub() -> HubFixture:
    features = Features({"image": Image(), "label": ClassLabel(names=list(SUN397_NAMES))})
    labels = _rows({"train": 50, "test": 25}, len(SUN397_NAMES))
    dataset = DatasetDict(
        {
            split: Dataset.from_dict(
                {"image": _image_entries("RGB", 90, len(y)), "label": y}, features=features
            )
            for split, y in labels.items()
        }
    )
    return HubFixture("tanganke/sun397", None, None, dataset, "image", "label", SUN397_NAMES, 90, "RGB")


def smallnorb_hub() -> HubFixture:
    int32 = Value("int32")
    features = Features(
        {
            "image_lt": Image(),
            "image_rt": Image(),
            "category": int32,
            "instance": int32,
            "elevation": int32,
            "azimuth": int32,
            "lighting": int32,
        }
    )
    labels = _rows({"train": 50, "test": 25}, 5)
    dataset = DatasetDict(
        {
            split: Dataset.from_dict(
                {
                    "image_lt": _image_entries("L", 10, len(y)),
                    "image_rt": _image_entries("L", 200, len(y)),
                    "category": y,
                    "instance": (np.arange(len(y)) % 10).astype(np.int32),
                    "elevation": (np.arange(len(y)) % 9).astype(np.int32),
                    "azimuth": (2 * (np.arange(len(y)) % 18)).astype(np.int32),
                    "lighting": (np.arange(len(y)) % 6).astype(np.int32),
                },
                features=features,
            )
            for split, y in labels.items()
        }
    )
    return HubFixture(
        "Ramos-Ramos/smallnorb", None, None, dataset, "image_lt", "category", SMALLNORB_NAMES, 10, "L"
    )


def fgvc_aircraft_hub(label: str = "variant") -> HubFixture:
    features = Features(
        {
            "image": Image(),
            "bbox": {
                "xmin": Value("int32"),
                "ymin": Value("int32"),
                "xmax": Value("int32"),
                "ymax": Value("int32"),
            },
            "family": ClassLabel(names=list(FGVC_FAMILIES)),
            "manufacturer": ClassLabel(names=list(FGVC_MANUFACTURERS)),
            "variant": ClassLabel(names=list(FGVC_VARIANTS)),
        }
    )
    variants = _rows({"train": 24, "validation": 12, "test": 12}, len(FGVC_VARIANTS))
    splits = {}
    for split, variant in variants.items():
        family = np.array(FGVC_FAMILY_OF_VARIANT)[variant]
        splits[split] = Dataset.from_dict(
            {
                "image": _image_entries("RGB", 120, len(variant)),
                "bbox": [{"xmin": 1, "ymin": 1, "xmax": 6, "ymax": 6}] * len(variant),
                "family": family,
                "manufacturer": np.array(FGVC_MANUFACTURER_OF_FAMILY)[family],
                "variant": variant,
            },
            features=features,
        )
    names = {"variant": FGVC_VARIANTS, "family": FGVC_FAMILIES, "manufacturer": FGVC_MANUFACTURERS}[label]
    return HubFixture(
        "HuggingFaceM4/FGVC-Aircraft",
        None,
        "e18a7c97147c90dc7f4a60d74a7f4258e9264e97",
        DatasetDict(splits),
        "image",
        label,
        names,
        120,
        "RGB",
    )


HUB_FIXTURES: dict[str, Callable[[], HubFixture]] = {
    "fashion_mnist": fashion_mnist_hub,
    "eurosat": eurosat_hub,
    "fgvc_aircraft": fgvc_aircraft_hub,
    "sun397": sun397_hub,
    "smallnorb": smallnorb_hub,
}


@dataclass
class FakeHub:
    """Stands in for `datasets.load_dataset`: serves one fixture and records what was asked."""

    fixture: HubFixture
    calls: list[tuple[str, str | None, str | None]] = field(default_factory=list)

    def __call__(
        self, path: str, name: str | None = None, *, revision: str | None = None, **kwargs
    ) -> DatasetDict:
        self.calls.append((path, name, revision))
        expected = (self.fixture.repo_id, self.fixture.config, self.fixture.revision)
        if (path, name, revision) != expected:
            raise AssertionError(f"loader asked the Hub for {(path, name, revision)}, expected {expected}")
        return self.fixture.dataset


def random_imagefolder(root: Path, counts: dict[str, int], labels: tuple[str, ...] = ("a", "b")) -> Path:
    """An imagefolder tree ``root/<split>/<label>/<i>.png`` of seeded random 28×28 grayscale images."""
    import torch

    generator = torch.Generator().manual_seed(0)
    for split, count in counts.items():
        for label in labels:
            (root / split / label).mkdir(parents=True)
            for i in range(count):
                pixels = (torch.rand(28, 28, generator=generator) * 255).to(torch.uint8).numpy()
                PILImage.fromarray(pixels).save(root / split / label / f"{i}.png")
    return root
