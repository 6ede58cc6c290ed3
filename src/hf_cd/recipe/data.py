"""The recipe's data: the raw splits, the seeded (resumable) train augmentation and the fixed diagnostics batch."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from datasets import DatasetDict, Image
from transformers import TrainerCallback

from hf_cd.data import (
    ImagePreprocessing,
    collate_fn,
    decode_image,
    load_image_dataset,
    with_image_transforms,
)
from hf_cd.data.loading import subsample_stratified
from hf_cd.data.transforms import TrainImageTransform
from hf_cd.recipe.arguments import (
    DataArguments,
    RecipeArgumentError,
)
from hf_cd.training.config import CDConfig


def load_recipe_data(data_args: DataArguments, seed: int) -> DatasetDict:
    """Raw train / validation / test splits (``image``, ``label``) as `DataArguments` asks."""
    raw = load_image_dataset(
        data_args.dataset_name,
        label=data_args.label_column_name,
        image_column=data_args.image_column_name,
        config_name=data_args.dataset_config_name,
        revision=data_args.dataset_revision,
        validation_fraction=data_args.validation_fraction,
        seed=seed,
        max_train_samples=data_args.max_train_samples,
        cache_dir=data_args.dataset_cache_dir,
        skip_corrupt_images=data_args.skip_corrupt_images,
    )
    corrupt_images = getattr(raw, "corrupt_images", {})
    raw["validation"] = subsample_stratified(raw["validation"], data_args.max_eval_samples, seed)
    raw["test"] = subsample_stratified(raw["test"], data_args.max_test_samples, seed)
    raw.corrupt_images = corrupt_images  # {split: (CorruptImage, ...)} dropped by skip_corrupt_images
    return raw


class SeededAugmentation(torch.utils.data.Dataset):
    """The train split with random crops and flips that are a pure function of (seed, epoch, row).

    Why not `with_image_transforms`' train transform: it draws from the global RNG, and the data
    loader has already fetched (and augmented) the next batch when a checkpoint stores that RNG, so a
    resumed run would see other crops than the uninterrupted one. Seeding each row makes resuming
    exact. `EpochCallback` advances the epoch; each DataLoader worker receives it when the epoch's
    iterator starts, which is why persistent workers are refused (`check_resumable_augmentation`).
    """

    def __init__(
        self,
        dataset,
        preprocessing: ImagePreprocessing,
        scale: tuple[float, float],
        ratio: tuple[float, float],
        flip_probability: float,
        seed: int,
    ):
        self.dataset = dataset.cast_column("image", Image(decode=False))
        self.preprocessing = preprocessing
        self.scale, self.ratio, self.flip_probability = tuple(scale), tuple(ratio), flip_probability
        self.seed = seed
        self.epoch = 0
        TrainImageTransform(preprocessing, self.scale, self.ratio, flip_probability)  # validates the ranges

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        row = self.dataset[int(index)]
        row_seed = int(np.random.SeedSequence([self.seed, self.epoch, int(index)]).generate_state(1)[0])
        transform = TrainImageTransform(
            self.preprocessing,
            self.scale,
            self.ratio,
            self.flip_probability,
            torch.Generator().manual_seed(row_seed),
        )
        return {"pixel_values": transform(decode_image(row["image"])), "labels": int(row["label"])}

    class EpochCallback(TrainerCallback):
        """Tell the dataset which epoch starts (also right after resuming in the middle of one)."""

        def __init__(self, dataset: SeededAugmentation):
            self.dataset = dataset

        def on_epoch_begin(self, args, state, control, **kwargs):
            self.dataset.set_epoch(math.floor(state.epoch + 1e-6) if state.epoch else 0)


def check_resumable_augmentation(training_args: CDConfig) -> None:
    if training_args.dataloader_persistent_workers and training_args.dataloader_num_workers > 0:
        raise RecipeArgumentError(
            "dataloader_persistent_workers keeps each worker's copy of the train set from the first epoch, so "
            "every epoch would repeat the same random crops and flips. Drop it (workers restart each epoch)."
        )


def eval_transformed(dataset, image_processor, num_channels: int):
    """A split with the deterministic (evaluation) transform, whatever its name."""
    return with_image_transforms(
        DatasetDict({"split": dataset}), image_processor, num_channels, train_split="__none__"
    )["split"]


def first_batch(dataset, size: int) -> dict[str, torch.Tensor]:
    """The first ``size`` rows of a transformed split, collated (a fixed batch for before/after diagnostics)."""
    return collate_fn([dataset[i] for i in range(min(size, len(dataset)))])
