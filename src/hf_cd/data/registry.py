"""The one table of per-dataset knowledge: where each named dataset lives and how its columns map.

`load_image_dataset` reads only this table, so supporting a new Hub dataset is one entry in
`DATASETS` (or a call to `register_dataset`), never an ``if`` branch in the loader.

Choices worth knowing:

* ``fashion_mnist`` is the embedded default: read offline from Debian's IDX files when they are
  installed, else from ``zalando-datasets/fashion_mnist``. The Hub copy spells the first class
  "T - shirt / top"; both sources are given `FASHION_MNIST_CLASSES` so a model's ``id2label``
  does not depend on where the data came from.
* ``fgvc_aircraft``: ``HuggingFaceM4/FGVC-Aircraft`` on ``main`` is still a loading script, which
  ``datasets`` >= 4 refuses to run. Its pull request #1 ("Convert dataset to Parquet",
  ``refs/pr/1``) holds the same data as ``data/{train,validation,test}-*.parquet`` with the
  script's schema (``image``, ``bbox``, ``family``, ``manufacturer``, ``variant``). We pin that
  PR's head commit rather than the ref, so the data cannot change under a finished run. The
  official train / validation / test split (about 3,333 images each) is kept; ``label=`` picks
  ``variant`` (default, the benchmark's 100-way task), ``family`` or ``manufacturer``.
* ``smallnorb`` (``Ramos-Ramos/smallnorb``) stores each sample as a stereo pair
  (``image_lt``, ``image_rt``) and its ``category`` as a plain ``int32``. We classify the left
  image, as TFDS/VTAB's ``smallnorb`` ``image`` does; pass ``image_column="image_rt"`` for the
  other camera. ``category`` becomes a `ClassLabel` with the five smallNORB categories.
* ``sun397`` (``tanganke/sun397``) and ``smallnorb`` ship only train / test: the loader carves a
  stratified validation split from train.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from datasets import DatasetDict

from hf_cd.data import fashion_mnist

SMALLNORB_CATEGORIES = ("animal", "human", "airplane", "truck", "car")
"""The ``-cat`` codes 0..4 of the smallNORB files, in order (NYU's dataset page)."""


@dataclass(frozen=True)
class ImageDatasetSpec:
    """Where one named image-classification dataset lives and how its columns map onto image/label."""

    repo_id: str
    """Hub dataset repository, e.g. ``timm/eurosat-rgb``."""
    config: str | None = None
    """Hub config (subset) name; ``None`` for the repository's default."""
    revision: str | None = None
    """Branch, tag or commit; pin a commit where ``main`` is unusable (FGVC-Aircraft)."""
    split_names: Mapping[str, str] = field(default_factory=lambda: {"train": "train", "test": "test"})
    """Our split name (``train`` / ``validation`` / ``test``) to the Hub's. A missing ``validation``
    is carved from train by the loader."""
    image_column: str = "image"
    label_columns: tuple[str, ...] = ("label",)
    """Label columns a user may choose with ``label=``; the first is the default."""
    class_names: tuple[str, ...] | None = None
    """Names for the label column: required when it is a plain integer (smallNORB), and used to
    rename a `ClassLabel` whose Hub names differ from ours (Fashion-MNIST). ``None``: the
    `ClassLabel`'s own names."""
    offline_loader: Callable[[], DatasetDict | None] | None = None
    """Returns the dataset (Hub split names, Hub columns) from local files, or ``None`` when those
    files are absent; tried before the Hub."""
    offline_hint: str = ""
    """How to install the offline copy; said when neither it nor the Hub is available."""

    def label_column(self, label: str | None) -> str:
        """The column for a ``label=`` choice, or the default; the error lists the valid choices."""
        if label is None:
            return self.label_columns[0]
        if label not in self.label_columns:
            raise ValueError(
                f"label={label!r} is not available for {self.repo_id}; "
                f"choose one of {list(self.label_columns)}."
            )
        return label


def _debian_fashion_mnist() -> DatasetDict | None:
    root = fashion_mnist.DEBIAN_FASHION_MNIST_DIR
    if not fashion_mnist.fashion_mnist_available(root):
        return None
    return fashion_mnist.load_fashion_mnist_dataset(root)


DATASETS: dict[str, ImageDatasetSpec] = {
    "fashion_mnist": ImageDatasetSpec(
        repo_id="zalando-datasets/fashion_mnist",
        config="fashion_mnist",
        class_names=fashion_mnist.FASHION_MNIST_CLASSES,
        offline_loader=_debian_fashion_mnist,
        offline_hint=(
            "Install the offline copy with `apt-get install dataset-fashion-mnist` (or `make setup`), "
            "or point HF_CD_FASHION_MNIST_DIR at a directory holding its four IDX files."
        ),
    ),
    "eurosat": ImageDatasetSpec(
        repo_id="timm/eurosat-rgb",
        split_names={"train": "train", "validation": "validation", "test": "test"},
    ),
    "fgvc_aircraft": ImageDatasetSpec(
        repo_id="HuggingFaceM4/FGVC-Aircraft",
        revision="e18a7c97147c90dc7f4a60d74a7f4258e9264e97",
        split_names={"train": "train", "validation": "validation", "test": "test"},
        label_columns=("variant", "family", "manufacturer"),
    ),
    "sun397": ImageDatasetSpec(repo_id="tanganke/sun397"),
    "smallnorb": ImageDatasetSpec(
        repo_id="Ramos-Ramos/smallnorb",
        image_column="image_lt",
        label_columns=("category",),
        class_names=SMALLNORB_CATEGORIES,
    ),
}


def register_dataset(name: str, spec: ImageDatasetSpec) -> None:
    """Teach `load_image_dataset` a new name (or replace one), e.g. a private Hub mirror."""
    DATASETS[name] = spec
