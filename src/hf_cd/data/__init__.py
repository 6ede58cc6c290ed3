"""Datasets and transforms for fine-tuning Vision Transformers with Colinearity Decay.

``load_image_dataset`` turns a registered name (Fashion-MNIST offline by default, EuroSAT,
FGVC-Aircraft, SUN397, smallNORB) or a local directory into train / validation / test splits with
an ``image`` and a ``ClassLabel`` ``label`` column; ``with_image_transforms`` makes them model-ready
using the model's own image processor.
"""

from hf_cd.data.errors import CorruptImageError, DatasetSchemaError, EmptySplitError, UnknownDatasetError
from hf_cd.data.fashion_mnist import (
    DEBIAN_FASHION_MNIST_DIR,
    FASHION_MNIST_CLASSES,
    fashion_mnist_available,
    load_fashion_mnist_arrays,
    load_fashion_mnist_dataset,
    read_idx,
)
from hf_cd.data.images import CorruptImage, decode_image, find_corrupt_images
from hf_cd.data.labels import label_mapping, set_label_mapping
from hf_cd.data.loading import SPLITS, load_image_dataset, stratified_split_indices
from hf_cd.data.registry import DATASETS, ImageDatasetSpec, register_dataset
from hf_cd.data.statistics import ChannelStatistics, channel_statistics
from hf_cd.data.transforms import (
    ImageClassificationTransform,
    ImagePreprocessing,
    build_image_transforms,
    collate_fn,
    with_image_transforms,
)

__all__ = [
    "DATASETS",
    "DEBIAN_FASHION_MNIST_DIR",
    "FASHION_MNIST_CLASSES",
    "SPLITS",
    "ChannelStatistics",
    "CorruptImage",
    "CorruptImageError",
    "DatasetSchemaError",
    "EmptySplitError",
    "ImageClassificationTransform",
    "ImageDatasetSpec",
    "ImagePreprocessing",
    "UnknownDatasetError",
    "build_image_transforms",
    "channel_statistics",
    "collate_fn",
    "decode_image",
    "fashion_mnist_available",
    "find_corrupt_images",
    "label_mapping",
    "load_fashion_mnist_arrays",
    "load_fashion_mnist_dataset",
    "load_image_dataset",
    "read_idx",
    "register_dataset",
    "set_label_mapping",
    "stratified_split_indices",
    "with_image_transforms",
]
