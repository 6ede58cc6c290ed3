"""The fine-tuning recipe behind ``recipes/finetune.py`` and ``make run``, as reusable parts.

Why a module and not just a script: the argument dataclasses, model presets, results writer and
summary printer are what tests, benchmarks and other scripts reuse; the script only parses and
calls `run_recipe`. One run does: load data → build (or download) the model → measure alignment and
outliers → train with `CDTrainer` → evaluate on test → quantized evaluation (when `hf_cd.quant` is
installed) → measure again → save model, image processor, ``results.json`` and plots.
"""

from __future__ import annotations

import argparse
import difflib
import json
import logging
import math
import os
import re
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import yaml
from datasets import DatasetDict, Image
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForImageClassification,
    EvalPrediction,
    HfArgumentParser,
    PreTrainedModel,
    TrainerCallback,
    ViTConfig,
    ViTForImageClassification,
    set_seed,
)
from transformers.trainer_utils import get_last_checkpoint

from hf_cd import __version__, hub, quant
from hf_cd.config import CDConfig
from hf_cd.data import (
    DATASETS,
    ImagePreprocessing,
    UnknownDatasetError,
    collate_fn,
    decode_image,
    label_mapping,
    load_image_dataset,
    with_image_transforms,
)
from hf_cd.data.loading import subsample_stratified
from hf_cd.data.transforms import TrainImageTransform
from hf_cd.diagnostics import (
    activation_stats,
    alignment_summary,
    measure_alignment,
    outlier_summary,
    plot_activation_stats,
    plot_alignment,
)
from hf_cd.pretrained import adapt_to_resolution
from hf_cd.table import Table
from hf_cd.trainer import CDTrainer

logger = logging.getLogger(__name__)

RESULTS_FILE = "results.json"
ALIGNMENT_PLOT = "alignment.png"
ACTIVATION_PLOT = "activation_max.png"
RESUME_LATEST = ("latest", "last", "true")
"""Values of ``--resume_from_checkpoint`` that mean "the newest checkpoint-* in output_dir"."""

DEFAULT_QUANT_PIPELINES = ("minmax", "percentile", "repq", "per_tensor")
DEFAULT_QUANT_BITS = ("W8A8", "W6A6", "W4A4")


# --- model presets -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelPreset:
    """The shape of a from-scratch ViT; the MLP is 4× wide, as in the ViT / DeiT papers."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int

    @property
    def intermediate_size(self) -> int:
        return 4 * self.hidden_size


MODEL_PRESETS: dict[str, ModelPreset] = {
    "vit_tiny": ModelPreset(hidden_size=192, num_hidden_layers=12, num_attention_heads=3),
    "vit_small": ModelPreset(hidden_size=384, num_hidden_layers=12, num_attention_heads=6),
    "vit_base": ModelPreset(hidden_size=768, num_hidden_layers=12, num_attention_heads=12),
}
"""DeiT-Ti / DeiT-S / ViT-B widths, depths and heads."""


LORA_ADAPTER_DIR = "adapter"
LORA_TARGETS: tuple[str, ...] = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "fc1",
    "fc2",
    "gate_proj",
    "up_proj",
    "down_proj",
)
"""Every encoder linear of ViT / DeiT / Dinov2 (GELU and SwiGLU); names a model lacks are ignored."""


class RecipeArgumentError(ValueError):
    """A recipe option (or combination of options) that cannot work; the message says how to fix it."""


# --- arguments -----------------------------------------------------------------------------------


@dataclass
class ModelArguments:
    """Which model to train: a Hub id / local directory to fine-tune, or a preset to train from scratch."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Hub id (e.g. google/vit-base-patch16-224-in21k, facebook/dinov2-base) or local directory "
            "of a ViT / DeiT / Dinov2 checkpoint to fine-tune; its classifier is replaced to fit the dataset's "
            "labels. Give this or --model_preset."
        },
    )
    model_preset: str | None = field(
        default=None,
        metadata={
            "help": f"Train a ViT from scratch with this shape: {', '.join(MODEL_PRESETS)} "
            "(width/depth/heads 192/12/3, 384/12/6, 768/12/12). Give this or --model_name_or_path."
        },
    )
    image_size: int | None = field(
        default=None,
        metadata={
            "help": "Input resolution in pixels. Presets: default 224. Checkpoints: default the checkpoint's "
            "own; given, the position embeddings are resampled once (bicubic) and images are resized to "
            "exactly this size without a center crop."
        },
    )
    patch_size: int | None = field(default=None, metadata={"help": "Preset only: patch size (default 16)."})
    num_channels: int | None = field(
        default=None,
        metadata={"help": "Preset only: 1 (grayscale) or 3 (RGB, default); images are converted to match."},
    )
    hidden_size: int | None = field(
        default=None, metadata={"help": "Preset only: override the preset's width (e.g. for a CPU budget)."}
    )
    num_hidden_layers: int | None = field(
        default=None, metadata={"help": "Preset only: override the preset's depth."}
    )
    num_attention_heads: int | None = field(
        default=None, metadata={"help": "Preset only: override the preset's number of heads."}
    )
    image_mean: list[float] | None = field(
        default=None,
        metadata={"help": "Preset only: per-channel normalization mean of the saved image processor (0.5)."},
    )
    image_std: list[float] | None = field(
        default=None,
        metadata={"help": "Preset only: per-channel normalization std of the saved image processor (0.5)."},
    )
    hidden_dropout_prob: float | None = field(
        default=None,
        metadata={"help": "Dropout on hidden states (presets default to 0; else the checkpoint's)."},
    )
    attention_probs_dropout_prob: float | None = field(
        default=None, metadata={"help": "Dropout on attention probabilities (presets default to 0)."}
    )
    model_revision: str = field(
        default="main", metadata={"help": "Branch, tag or commit of --model_name_or_path on the Hub."}
    )
    cache_dir: str | None = field(default=None, metadata={"help": "Where downloaded models are cached."})
    use_lora: bool = field(
        default=False,
        metadata={
            "help": "Fine-tune LoRA adapters (peft) instead of every weight. CD then acts on the effective "
            "weights W0 + s·B·A; the merged model is saved to output_dir and the adapter to output_dir/adapter."
        },
    )
    lora_r: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_alpha: float = field(default=16.0, metadata={"help": "LoRA alpha (the adapter scale is alpha / r)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA branch."})
    lora_target: list[str] = field(
        default_factory=lambda: list(LORA_TARGETS),
        metadata={"help": "Module names that get adapters (suffix match, as peft's target_modules)."},
    )
    lora_modules_to_save: list[str] = field(
        default_factory=lambda: ["classifier"],
        metadata={
            "help": "Modules trained in full and saved with the adapter (the new classification head)."
        },
    )
    ignore_mismatched_sizes: bool = field(
        default=True,
        metadata={
            "help": "Replace a pretrained classifier whose size differs from the dataset's number of labels "
            "(the usual case when fine-tuning)."
        },
    )

    def __post_init__(self) -> None:
        if bool(self.model_name_or_path) == bool(self.model_preset):
            given = "both" if self.model_name_or_path else "neither"
            raise RecipeArgumentError(
                f"Give exactly one model source, got {given}: --model_name_or_path <Hub id or local directory> "
                f"to fine-tune, or --model_preset {{{', '.join(MODEL_PRESETS)}}} to train from scratch."
            )
        if self.model_preset is not None and self.model_preset not in MODEL_PRESETS:
            close = difflib.get_close_matches(self.model_preset, MODEL_PRESETS, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise RecipeArgumentError(
                f"Unknown model_preset {self.model_preset!r}; choose one of {', '.join(MODEL_PRESETS)}.{hint}"
            )
        preset_only = [
            name
            for name in (
                "patch_size",
                "num_channels",
                "hidden_size",
                "num_hidden_layers",
                "num_attention_heads",
                "image_mean",
                "image_std",
            )
            if getattr(self, name) is not None
        ]
        if self.model_name_or_path and preset_only:
            raise RecipeArgumentError(
                f"{', '.join(preset_only)} shape a model trained from scratch and apply only with --model_preset; "
                f"{self.model_name_or_path!r} brings its own config and image processor."
            )
        if self.use_lora and (self.lora_r < 1 or not self.lora_target):
            raise RecipeArgumentError(f"LoRA needs lora_r ≥ 1 and a lora_target, got r={self.lora_r}.")
        if self.num_channels not in (None, 1, 3):
            raise RecipeArgumentError(f"num_channels must be 1 or 3, got {self.num_channels}.")

    @property
    def source(self) -> str:
        """How the model was made, for results and summaries."""
        return f"preset {self.model_preset}" if self.model_preset else str(self.model_name_or_path)


@dataclass
class DataArguments:
    """Which images to train and evaluate on, how many, and how to augment them."""

    dataset_name: str = field(
        default="fashion_mnist",
        metadata={
            "help": f"A registered dataset ({', '.join(sorted(DATASETS))}) or a local directory (an imagefolder "
            "tree or a save_to_disk output)."
        },
    )
    dataset_label: str | None = field(
        default=None,
        metadata={
            "help": "Label column to classify: for fgvc_aircraft one of variant (default, 100 classes), family, "
            "manufacturer; for a local dataset any column (default label)."
        },
    )
    image_column: str | None = field(
        default=None, metadata={"help": "Image column, when not the dataset's default (e.g. image_rt)."}
    )
    validation_fraction: float = field(
        default=0.1,
        metadata={"help": "Share of train held out (stratified) when the dataset has no validation split."},
    )
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Train on a stratified subset of at most this many images."}
    )
    max_eval_samples: int | None = field(
        default=None,
        metadata={
            "help": "Validate on a stratified subset of at most this many images (faster evaluations)."
        },
    )
    max_test_samples: int | None = field(
        default=None,
        metadata={
            "help": "Test on a stratified subset of at most this many images (default: the whole split)."
        },
    )
    crop_scale: list[float] = field(
        default_factory=lambda: [0.08, 1.0],
        metadata={
            "help": "Random-resized-crop area range (low high) for training; 0.08 1 is ImageNet's, 0.8 1 "
            "suits small images such as Fashion-MNIST."
        },
    )
    crop_ratio: list[float] = field(
        default_factory=lambda: [3 / 4, 4 / 3],
        metadata={"help": "Random-resized-crop aspect-ratio range (low high)."},
    )
    flip_probability: float = field(
        default=0.5, metadata={"help": "Probability of a horizontal flip during training (0 disables)."}
    )
    diagnostics_samples: int = field(
        default=64,
        metadata={"help": "Validation images in the batch that measures activation outliers before/after."},
    )
    dataset_cache_dir: str | None = field(
        default=None, metadata={"help": "Where downloaded datasets are cached (datasets' cache_dir)."}
    )

    def __post_init__(self) -> None:
        if self.dataset_name not in DATASETS and not Path(self.dataset_name).expanduser().is_dir():
            close = difflib.get_close_matches(self.dataset_name, DATASETS, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise UnknownDatasetError(
                f"Unknown dataset_name {self.dataset_name!r}: it is neither a registered dataset "
                f"({', '.join(sorted(DATASETS))}) nor an existing local directory.{hint}"
            )
        for name in ("crop_scale", "crop_ratio"):
            value = getattr(self, name)
            if isinstance(value, (int, float)) or len(value) != 2:
                raise RecipeArgumentError(f"{name} takes two numbers (low high), got {value!r}.")
            setattr(self, name, [float(v) for v in value])
        if not 0.0 < self.crop_scale[0] <= self.crop_scale[1] <= 1.0:
            raise RecipeArgumentError(f"crop_scale must satisfy 0 < low <= high <= 1, got {self.crop_scale}.")
        for name in ("max_train_samples", "max_eval_samples", "max_test_samples", "diagnostics_samples"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise RecipeArgumentError(f"{name} must be a positive integer, got {value}.")


@dataclass
class QuantArguments:
    """The post-training quantized evaluation that follows training (run when `hf_cd.quant` is installed)."""

    quant_eval: bool = field(
        default=True,
        metadata={
            "help": "Evaluate quantized copies of the trained model on the test split (--no_quant_eval skips)."
        },
    )
    quant_pipelines: list[str] = field(
        default_factory=lambda: list(DEFAULT_QUANT_PIPELINES),
        metadata={
            "help": f"Quantization pipelines to compare (default: {' '.join(DEFAULT_QUANT_PIPELINES)})."
        },
    )
    quant_bits: list[str] = field(
        default_factory=lambda: list(DEFAULT_QUANT_BITS),
        metadata={"help": "Encoder bit widths as WxAy (weights x bits, activations y bits), e.g. W8A8 W4A4."},
    )
    quant_num_calibration: int = field(
        default=32, metadata={"help": "Calibration images, drawn from the train split (eval transform)."}
    )
    quant_max_eval_samples: int | None = field(
        default=None,
        metadata={
            "help": "Evaluate the quantized models on a stratified subset of at most this many test images "
            "(the full-precision row is measured on the same subset)."
        },
    )
    quant_batch_size: int = field(default=64, metadata={"help": "Images per forward pass while quantizing."})

    def __post_init__(self) -> None:
        if isinstance(self.quant_pipelines, str):
            self.quant_pipelines = [self.quant_pipelines]
        if isinstance(self.quant_bits, str):
            self.quant_bits = [self.quant_bits]
        self.bit_pairs()  # validates
        for name in ("quant_num_calibration", "quant_batch_size"):
            if getattr(self, name) < 1:
                raise RecipeArgumentError(f"{name} must be a positive integer, got {getattr(self, name)}.")

    def bit_pairs(self) -> list[tuple[int, int]]:
        """``["W8A8", "W4A8"]`` → ``[(8, 8), (4, 8)]``."""
        pairs = []
        for label in self.quant_bits:
            match = re.fullmatch(r"[Ww](\d+)[Aa](\d+)", str(label).strip())
            if not match:
                raise RecipeArgumentError(
                    f"quant_bits entry {label!r} is not of the form WxAy (e.g. W8A8, W4A4, W4A8)."
                )
            pairs.append((int(match.group(1)), int(match.group(2))))
        return pairs


class RecipeArguments(NamedTuple):
    model: ModelArguments
    data: DataArguments
    training: CDConfig
    quant: QuantArguments


def _escape_percent(help_text: str) -> str:
    """argparse %-formats help texts: a bare ``%`` (e.g. "within 1%") would crash ``--help``."""
    return re.sub(r"%%|%\(|%", lambda m: m.group(0) if m.group(0) != "%" else "%%", help_text)


def recipe_argument_parser() -> HfArgumentParser:
    parser = HfArgumentParser((ModelArguments, DataArguments, CDConfig, QuantArguments))
    for action in parser._actions:
        if action.help:
            action.help = _escape_percent(action.help)
    parser.add_argument(
        "--config",
        default=None,
        help="YAML file of recipe options (any other flag, without its dashes); flags on the command line "
        "override it.",
    )
    return parser


def load_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """Read a recipe YAML file into a flat ``{option: value}`` dict."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Recipe config {str(path)!r} does not exist.")
    values = yaml.safe_load(path.read_text()) or {}
    if not isinstance(values, Mapping):
        raise RecipeArgumentError(
            f"{path}: a recipe config is a mapping of option: value, got {type(values).__name__}."
        )
    return dict(values)


def _apply_config_defaults(parser: HfArgumentParser, values: Mapping[str, Any], source: str) -> None:
    """Make the YAML values the parser's defaults, so any flag given on the command line wins."""
    actions = {action.dest: action for action in parser._actions if action.dest not in ("help", "config")}
    unknown = [key for key in values if key not in actions]
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, actions, n=1)
            hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise RecipeArgumentError(
            f"{source}: unknown option(s) {', '.join(hints)}. `python recipes/finetune.py --help` lists them all."
        )
    for action in parser._actions:
        if action.dest in values:
            action.required = False
    parser.set_defaults(**values)


def parse_recipe_args(argv: Sequence[str] | None = None) -> RecipeArguments:
    """Parse ``--config file.yaml`` plus command-line flags (which override the file) into the four dataclasses."""
    argv = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    known, rest = pre.parse_known_args(argv)
    parser = recipe_argument_parser()
    if known.config:
        _apply_config_defaults(parser, load_config_file(known.config), known.config)
    outputs = parser.parse_args_into_dataclasses(args=rest, look_for_args_file=False)
    return RecipeArguments(*outputs[:4])


# --- model ---------------------------------------------------------------------------------------


def _image_processor_class():
    """``ViTImageProcessor`` needs torchvision; without it, its PIL twin (same config, same output)."""
    from transformers.utils import is_torchvision_available

    if is_torchvision_available():
        from transformers import ViTImageProcessor

        return ViTImageProcessor
    from transformers import ViTImageProcessorPil

    return ViTImageProcessorPil


def build_model(model_args: ModelArguments, labels: Mapping[str, Any]) -> tuple[PreTrainedModel, Any]:
    """The model (new classifier for ``labels``) and its image processor, from a preset or a checkpoint.

    ``labels`` is `hf_cd.data.label_mapping` of the dataset: ``num_labels``, ``id2label``, ``label2id``.
    """
    if model_args.model_preset:
        preset = MODEL_PRESETS[model_args.model_preset]
        hidden_size = model_args.hidden_size or preset.hidden_size
        num_channels = model_args.num_channels or 3
        image_size = model_args.image_size or 224
        patch_size = model_args.patch_size or 16
        if image_size % patch_size:
            raise RecipeArgumentError(
                f"image_size {image_size} is not a multiple of patch_size {patch_size}."
            )
        heads = model_args.num_attention_heads or preset.num_attention_heads
        if hidden_size % heads:
            raise RecipeArgumentError(
                f"hidden_size {hidden_size} is not divisible by {heads} attention heads."
            )
        config = ViTConfig(
            hidden_size=hidden_size,
            num_hidden_layers=model_args.num_hidden_layers or preset.num_hidden_layers,
            num_attention_heads=heads,
            intermediate_size=4 * hidden_size,
            image_size=image_size,
            patch_size=patch_size,
            num_channels=num_channels,
            hidden_dropout_prob=model_args.hidden_dropout_prob or 0.0,
            attention_probs_dropout_prob=model_args.attention_probs_dropout_prob or 0.0,
            **labels,
        )
        model = ViTForImageClassification(config)
        mean = model_args.image_mean or [0.5] * num_channels
        std = model_args.image_std or [0.5] * num_channels
        for name, values in (("image_mean", mean), ("image_std", std)):
            if len(values) not in (1, num_channels):
                raise RecipeArgumentError(
                    f"{name} has {len(values)} values but the model has {num_channels} channels."
                )
        image_processor = _image_processor_class()(
            size={"height": image_size, "width": image_size},
            image_mean=list(mean),
            image_std=list(std),
            do_resize=True,
            do_rescale=True,
            do_normalize=True,
        )
        return model, image_processor

    hub = {"revision": model_args.model_revision, "cache_dir": model_args.cache_dir}
    overrides = {
        key: value
        for key in ("hidden_dropout_prob", "attention_probs_dropout_prob")
        if (value := getattr(model_args, key)) is not None
    }
    config = AutoConfig.from_pretrained(model_args.model_name_or_path, **hub, **labels, **overrides)
    model = AutoModelForImageClassification.from_pretrained(
        model_args.model_name_or_path,
        config=config,
        ignore_mismatched_sizes=model_args.ignore_mismatched_sizes,
        **hub,
    )
    image_processor = AutoImageProcessor.from_pretrained(model_args.model_name_or_path, **hub)
    if model_args.image_size is not None:
        try:
            adapt_to_resolution(model, image_processor, model_args.image_size)
        except ValueError as error:
            raise RecipeArgumentError(f"--image_size {model_args.image_size}: {error}") from error
    return model, image_processor


def add_lora(model: PreTrainedModel, model_args: ModelArguments):
    """Wrap ``model`` in LoRA adapters on the chosen encoder linears (the head trains in full)."""
    from peft import LoraConfig, get_peft_model

    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    targets = [name for name in model_args.lora_target if name in present]
    if not targets:
        raise RecipeArgumentError(
            f"None of lora_target {model_args.lora_target} names a module of {type(model).__name__}; "
            f"its linears include {sorted(n for n in present if n.endswith(('proj', 'fc1', 'fc2')))}."
        )
    config = LoraConfig(
        r=model_args.lora_r,
        lora_alpha=model_args.lora_alpha,
        lora_dropout=model_args.lora_dropout,
        target_modules=targets,
        modules_to_save=list(model_args.lora_modules_to_save),
    )
    return get_peft_model(model, config)


def describe_model(model: PreTrainedModel, model_args: ModelArguments) -> dict[str, Any]:
    config = model.config
    lora = (
        {"r": model_args.lora_r, "alpha": model_args.lora_alpha, "target": list(model_args.lora_target)}
        if model_args.use_lora
        else None
    )
    return {
        "lora": lora,
        "source": model_args.source,
        "architecture": type(model).__name__,
        "model_type": config.model_type,
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "hidden_size": getattr(config, "hidden_size", None),
        "num_hidden_layers": getattr(config, "num_hidden_layers", None),
        "num_attention_heads": getattr(config, "num_attention_heads", None),
        "image_size": getattr(config, "image_size", None),
        "patch_size": getattr(config, "patch_size", None),
        "num_channels": getattr(config, "num_channels", None),
    }


# --- data ----------------------------------------------------------------------------------------


def load_recipe_data(data_args: DataArguments, seed: int) -> DatasetDict:
    """Raw train / validation / test splits (``image``, ``label``) as `DataArguments` asks."""
    raw = load_image_dataset(
        data_args.dataset_name,
        label=data_args.dataset_label,
        image_column=data_args.image_column,
        validation_fraction=data_args.validation_fraction,
        seed=seed,
        max_train_samples=data_args.max_train_samples,
        cache_dir=data_args.dataset_cache_dir,
    )
    raw["validation"] = subsample_stratified(raw["validation"], data_args.max_eval_samples, seed)
    raw["test"] = subsample_stratified(raw["test"], data_args.max_test_samples, seed)
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


def _eval_transformed(dataset, image_processor, num_channels: int):
    """A split with the deterministic (evaluation) transform, whatever its name."""
    return with_image_transforms(
        DatasetDict({"split": dataset}), image_processor, num_channels, train_split="__none__"
    )["split"]


def first_batch(dataset, size: int) -> dict[str, torch.Tensor]:
    """The first ``size`` rows of a transformed split, collated (a fixed batch for before/after diagnostics)."""
    return collate_fn([dataset[i] for i in range(min(size, len(dataset)))])


def predictions_from_logits(logits, labels):
    """Keep the argmax only, so evaluation does not hold every logit (SUN397 has 397 classes)."""
    if isinstance(logits, (tuple, list)):  # DeiT with teacher: (logits, cls_logits, distillation_logits)
        logits = logits[0]
    return logits.argmax(dim=-1)


def accuracy_metric(prediction: EvalPrediction) -> dict[str, float]:
    predictions = np.asarray(prediction.predictions)
    labels = np.asarray(prediction.label_ids)
    return {"accuracy": 100.0 * float((predictions == labels).mean())}  # percent, as hf_cd.quant rows


# --- diagnostics, quantization -------------------------------------------------------------------


@dataclass
class Diagnostics:
    """Pair alignment and activation outliers of one model state (before or after training)."""

    alignment: Table
    activations: Table

    def summary(self) -> dict[str, Any]:
        return {
            "alignment": alignment_summary(self.alignment),
            "outliers": outlier_summary(self.activations),
        }


def measure_diagnostics(
    model: torch.nn.Module, batch: Mapping[str, torch.Tensor], training_args: CDConfig
) -> Diagnostics:
    """The pairs CD decays (the same kinds / explicit pairs / layer-scale folding) and the outliers on ``batch``."""
    alignment = measure_alignment(
        model,
        training_args.cd_kinds,
        pairs=training_args.cd_pairs,
        fold_layer_scale=training_args.cd_fold_layer_scale,
        fold_norm=training_args.cd_fold_norm,
    )
    return Diagnostics(alignment, activation_stats(model, batch))


def check_quant_arguments(quant_args: QuantArguments, seed: int) -> None:
    """Fail before training, not after it, on an unknown pipeline or unsupported bit width."""
    if not quant_args.quant_eval:
        return
    for pipeline in quant_args.quant_pipelines:
        for w_bits, a_bits in quant_args.bit_pairs():
            quant.QuantConfig(
                w_bits=w_bits,
                a_bits=a_bits,
                pipeline=pipeline,
                num_calibration=quant_args.quant_num_calibration,
                batch_size=quant_args.quant_batch_size,
                seed=seed,
            )


def run_quantized_evaluation(
    model: torch.nn.Module,
    eval_dataset,
    calibration_dataset,
    quant_args: QuantArguments,
    seed: int,
    progress: bool = True,
) -> dict[str, Any]:
    """Quantize the trained model with each pipeline and bit width and evaluate it; a record for results.json.

    ``calibration_dataset`` is the (eval-transformed) train split: `hf_cd.quant` draws
    ``quant_num_calibration`` images from it with ``seed``. Accuracies in the rows are percentages.
    """
    record: dict[str, Any] = {
        "pipelines": list(quant_args.quant_pipelines),
        "bits": list(quant_args.quant_bits),
        "num_calibration": min(quant_args.quant_num_calibration, len(calibration_dataset)),
        "eval_samples": len(eval_dataset),
        "protocol": quant.DEFAULT_PROTOCOL,  # the bit protocol of every row: what a runtime would deploy
        "rows": [],
    }
    if not quant_args.quant_eval:
        return {**record, "status": "skipped", "reason": "--no_quant_eval"}
    config = quant.QuantConfig(
        num_calibration=quant_args.quant_num_calibration,
        batch_size=quant_args.quant_batch_size,
        seed=seed,
        progress=progress,
    )
    logger.info(
        "Quantized evaluation: %d pipelines × %d bit widths on %d test images.",
        len(quant_args.quant_pipelines),
        len(quant_args.quant_bits),
        len(eval_dataset),
    )
    table = quant.evaluate_quantized(
        model,
        eval_dataset,
        calibration_dataset,
        pipelines=list(quant_args.quant_pipelines),
        bits=quant_args.bit_pairs(),
        config=config,
    )
    return {**record, "status": "done", "reason": None, "rows": table.to_dicts()}


# --- the run -------------------------------------------------------------------------------------


def resolve_checkpoint(training_args: CDConfig) -> str | None:
    """The checkpoint to resume from: an explicit path, or ``latest`` → newest ``checkpoint-*`` in output_dir."""
    requested = training_args.resume_from_checkpoint
    output_dir = training_args.output_dir
    if requested is None or str(requested).lower() in ("", "false", "none"):
        if os.path.isdir(output_dir) and get_last_checkpoint(output_dir):
            logger.warning(
                "%s holds checkpoints of an earlier run; this run starts over. Pass --resume_from_checkpoint "
                "latest to continue that run instead.",
                output_dir,
            )
        return None
    if str(requested).lower() in RESUME_LATEST:
        last = get_last_checkpoint(output_dir) if os.path.isdir(output_dir) else None
        if last is None:
            raise RecipeArgumentError(
                f"--resume_from_checkpoint {requested}: {output_dir!r} holds no checkpoint-* directory. "
                "Give a checkpoint path, or the output_dir of the run to continue."
            )
        return last
    if not os.path.isdir(requested):
        raise RecipeArgumentError(f"--resume_from_checkpoint {requested!r} is not a directory.")
    return str(requested)


def write_json_atomic(path: Path, payload: Mapping[str, Any]) -> Path:
    """Write JSON through a temporary file, so an interrupted run never leaves a half-written results.json."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=_json_default) + "\n")
    os.replace(tmp, path)
    return path


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def write_model_card(output_dir: Path, results: Mapping[str, Any]) -> Path:
    """Write ``README.md``: the card with the quantized accuracy, CD settings and diagnostics (`hf_cd.hub`)."""
    return hub.write_model_card(output_dir, results)


@dataclass
class RecipeRun:
    """What `run_recipe` leaves behind: the trainer (with the trained model) and, on the main process, results."""

    trainer: CDTrainer
    results: dict[str, Any] | None


def run_recipe(args: RecipeArguments) -> RecipeRun:
    """Train, evaluate, quantize, diagnose and save as ``args`` say (see the module docstring)."""
    started = time.perf_counter()
    model_args, data_args, training_args, quant_args = args
    output_dir = Path(training_args.output_dir)
    checkpoint = resolve_checkpoint(training_args)
    is_main = training_args.process_index == 0
    data_seed = training_args.data_seed if training_args.data_seed is not None else training_args.seed
    check_quant_arguments(quant_args, data_seed)
    check_resumable_augmentation(training_args)

    raw = load_recipe_data(data_args, data_seed)
    labels = label_mapping(raw)
    logger.info(
        "Data: %s with %d classes; %s images.",
        data_args.dataset_name,
        labels["num_labels"],
        " / ".join(f"{split} {len(raw[split]):,}" for split in raw),
    )
    set_seed(training_args.seed)  # the same initial weights on every rank and on resume
    model, image_processor = build_model(model_args, labels)
    num_channels = model.config.num_channels
    evaluation = with_image_transforms(
        DatasetDict({"validation": raw["validation"], "test": raw["test"]}), image_processor, num_channels
    )
    train_dataset = SeededAugmentation(
        raw["train"],
        ImagePreprocessing.from_image_processor(image_processor, num_channels),
        scale=tuple(data_args.crop_scale),
        ratio=tuple(data_args.crop_ratio),
        flip_probability=data_args.flip_probability,
        seed=data_seed,
    )
    diagnostics_batch = first_batch(evaluation["validation"], data_args.diagnostics_samples)
    before = measure_diagnostics(model, diagnostics_batch, training_args) if is_main else None
    described_model = describe_model(model, model_args)
    trained = add_lora(model, model_args) if model_args.use_lora else model

    trainer = CDTrainer(
        model=trained,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=evaluation["validation"],
        data_collator=collate_fn,
        processing_class=image_processor,
        compute_metrics=accuracy_metric,
        preprocess_logits_for_metrics=predictions_from_logits,
        callbacks=[SeededAugmentation.EpochCallback(train_dataset)],
    )
    logger.info("Model: %s, %.2f M parameters.", model_args.source, model.num_parameters() / 1e6)
    train_started = time.perf_counter()
    train_output = trainer.train(resume_from_checkpoint=checkpoint)
    train_seconds = time.perf_counter() - train_started
    if model_args.use_lora:  # the adapter alone; the merged, deployable model follows after the test
        trainer.save_model(str(output_dir / LORA_ADAPTER_DIR))
    else:
        trainer.save_model(str(output_dir))
    trainer.save_state()

    test_started = time.perf_counter()
    test_metrics = trainer.evaluate(evaluation["test"], metric_key_prefix="test")
    test_seconds = time.perf_counter() - test_started
    if not is_main:
        return RecipeRun(trainer, None)
    if model_args.use_lora:
        # What deploys is the merged model: it is quantized, diagnosed and saved like any other.
        model = trainer.model.merge_and_unload()
        model.save_pretrained(output_dir)
        image_processor.save_pretrained(output_dir)

    state = trainer.state
    results: dict[str, Any] = {
        "hf_cd_version": __version__,
        "dataset": {
            "name": data_args.dataset_name,
            "label": data_args.dataset_label,
            "num_labels": labels["num_labels"],
            "train_samples": len(raw["train"]),
            "validation_samples": len(raw["validation"]),
            "test_samples": len(raw["test"]),
        },
        "model": described_model,
        "training": {
            "global_step": state.global_step,
            "max_steps": state.max_steps,
            "epochs": state.epoch,
            "train_loss": train_output.training_loss,
            "learning_rate": training_args.learning_rate,
            "per_device_train_batch_size": training_args.per_device_train_batch_size,
            "world_size": training_args.world_size,
            "resumed_from": checkpoint,
            "seed": training_args.seed,
        },
        "cd_settings": trainer.cd_settings,
        "test": {"accuracy": test_metrics["test_accuracy"], "loss": test_metrics["test_loss"]},
        "validation": _last_validation(state.log_history),
        "quantized": {"status": "pending"},
        "diagnostics": {"num_images": len(diagnostics_batch["pixel_values"]), "before": before.summary()},
        "output_dir": str(output_dir),
        "model_card": None,
        "wall_time_s": {"train": train_seconds, "test_eval": test_seconds},
    }
    results_path = output_dir / RESULTS_FILE
    write_json_atomic(results_path, results)  # full-precision results survive an interrupted quantization

    logger.info("Test accuracy %.2f%%; results so far in %s.", results["test"]["accuracy"], results_path)
    model.eval()
    quant_started = time.perf_counter()
    eval_subset = subsample_stratified(raw["test"], quant_args.quant_max_eval_samples, data_seed)
    results["quantized"] = run_quantized_evaluation(
        model,
        _eval_transformed(eval_subset, image_processor, num_channels),
        _eval_transformed(raw["train"], image_processor, num_channels),
        quant_args,
        data_seed,
        progress=not training_args.disable_tqdm,
    )
    results["wall_time_s"]["quant_eval"] = time.perf_counter() - quant_started

    after = measure_diagnostics(model, diagnostics_batch, training_args)
    results["diagnostics"]["after"] = after.summary()
    results["plots"] = {
        "alignment": str(
            plot_alignment(
                {"before": before.alignment, "after": after.alignment}, output_dir / ALIGNMENT_PLOT
            )
        ),
        "activation_max": str(
            plot_activation_stats(
                {"before": before.activations, "after": after.activations}, output_dir / ACTIVATION_PLOT
            )
        ),
    }
    card = write_model_card(output_dir, results)
    results["model_card"] = None if card is None else str(card)
    results["wall_time_s"]["total"] = time.perf_counter() - started
    write_json_atomic(results_path, results)
    if training_args.push_to_hub:
        # The Trainer pushed at save time, before the test and quantized numbers existed: push the
        # finished card, weights and results.json (and nothing else) now.
        hub.push_cd_model(
            output_dir,
            trainer.hub_model_id,
            private=bool(training_args.hub_private_repo),
            token=training_args.hub_token,
        )
    return RecipeRun(trainer, results)


def _last_validation(log_history: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    for entry in reversed(log_history):
        if "eval_accuracy" in entry:
            return {
                "accuracy": entry["eval_accuracy"],
                "loss": entry.get("eval_loss"),
                "epoch": entry.get("epoch"),
            }
    return None


# --- the summary ---------------------------------------------------------------------------------


def _percent(value: float | None) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.2f}%"


def _is_full_precision(row: Mapping[str, Any]) -> bool:
    return row.get("pipeline") == "full_precision" or row.get("runtime") == "float"


def quantized_accuracy_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Pipelines down, bit widths across (accuracy in %, drop from full precision in points)."""
    full_precision = [row for row in rows if _is_full_precision(row)]
    quantized = [row for row in rows if not _is_full_precision(row)]
    labels = list(dict.fromkeys(f"W{row['w_bits']}A{row['a_bits']}" for row in quantized))
    pipelines = list(dict.fromkeys(row["pipeline"] for row in quantized))
    cells = {(row["pipeline"], f"W{row['w_bits']}A{row['a_bits']}"): row for row in quantized}
    lines = ["| pipeline | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
    for pipeline in pipelines:
        values = [_quant_cell(cells.get((pipeline, label))) for label in labels]
        lines.append(f"| {pipeline} | " + " | ".join(values) + " |")
    if full_precision:
        lines.append(f"full precision on the same images: {full_precision[0]['accuracy']:.2f}%")
    return "\n".join(lines)


def _quant_cell(row: Mapping[str, Any] | None) -> str:
    if row is None:
        return "—"
    drop = row.get("accuracy_drop")
    return f"{row['accuracy']:.2f}%" + ("" if drop is None else f" ({0.0 - drop:+.2f})")


def _change(before: float, after: float) -> str:
    ratio = before / after if after else float("inf")
    direction = f"÷{ratio:.1f}" if ratio >= 1 else f"×{1 / ratio:.1f}"
    return f"{before:.4g} → {after:.4g}  ({direction})"


def format_summary(results: Mapping[str, Any]) -> str:
    """The end-of-run report: data, model, steps, accuracy, quantized accuracy, what CD changed, where files went."""
    dataset, model, training, cd = (
        results["dataset"],
        results["model"],
        results["training"],
        results["cd_settings"],
    )
    lines = ["", "═" * 78, f" hf-cd recipe: {dataset['name']} · {model['source']}", "═" * 78]
    lines.append(
        f"dataset    {dataset['name']}: {dataset['num_labels']} classes; train {dataset['train_samples']:,} · "
        f"validation {dataset['validation_samples']:,} · test {dataset['test_samples']:,} images"
    )
    lines.append(
        f"model      {model['architecture']} ({model['source']}): width {model['hidden_size']}, "
        f"{model['num_hidden_layers']} blocks, {model['num_attention_heads']} heads, {model['image_size']} px / "
        f"patch {model['patch_size']}, {model['num_parameters'] / 1e6:.2f} M parameters"
    )
    mode = f", {cd['mode']} mode" if cd.get("mode") not in (None, "plain") else ""
    cd_text = (
        f"CD λ={cd['strength']:g} on {', '.join(cd.get('kinds') or [])}{mode}"
        if cd.get("strength")
        else "CD off"
    )
    resumed = f", resumed from {training['resumed_from']}" if training.get("resumed_from") else ""
    lines.append(
        f"training   {training['global_step']:,} steps ({training['epochs']:.2f} epochs, "
        f"{training['world_size']} process(es)), {results['wall_time_s']['train'] / 60:.1f} min; {cd_text}{resumed}"
    )
    validation = results.get("validation")
    val_text = f" (validation {_percent(validation['accuracy'])})" if validation else ""
    lines.append(f"accuracy   test {_percent(results['test']['accuracy'])} full precision{val_text}")

    quantized = results.get("quantized", {})
    lines.append("")
    if quantized.get("status") == "done" and quantized.get("rows"):
        protocols = " / ".join(
            dict.fromkeys(str(r.get("protocol")) for r in quantized["rows"] if r.get("protocol"))
        )
        lines.append(
            f"quantized accuracy ({quantized['eval_samples']:,} test images, "
            f"{quantized['num_calibration']} calibration images from train, "
            f"{protocols or 'unrecorded'} bit protocol):"
        )
        lines.append(quantized_accuracy_table(quantized["rows"]))
    else:
        lines.append(
            f"quantized accuracy: not measured ({quantized.get('reason') or quantized.get('status')})"
        )

    diagnostics = results.get("diagnostics", {})
    if "before" in diagnostics and "after" in diagnostics:
        before, after = diagnostics["before"], diagnostics["after"]
        lines.append("")
        lines.append(
            f"alignment and outliers, before → after training ({diagnostics['num_images']} validation images):"
        )
        for kind, values in after["alignment"].items():
            if kind in before["alignment"]:
                lines.append(
                    f"  {kind + ' alignment (mean)':<34}{_change(before['alignment'][kind]['mean'], values['mean'])}"
                )
        names = {
            "residual_max": "residual max |x|",
            "residual_max_last_block": "residual max |x|, last block",
            "linear_input_max": "linear-input max |x|",
            "residual_kurtosis_max": "residual kurtosis (max)",
        }
        for key, name in names.items():
            if key in after["outliers"] and key in before["outliers"]:
                lines.append(f"  {name:<34}{_change(before['outliers'][key], after['outliers'][key])}")

    lines.append("")
    out = results["output_dir"]
    lines.append(f"model      {out}  (safetensors + image processor)")
    lines.append(f"results    {os.path.join(out, RESULTS_FILE)}")
    plots = results.get("plots") or {}
    if plots:
        lines.append(f"plots      {', '.join(plots.values())}")
    if results.get("model_card"):
        lines.append(f"card       {results['model_card']}")
    total = results["wall_time_s"].get("total")
    if total is not None:
        lines.append(f"wall time  {total / 60:.1f} min")
    lines.append("═" * 78)
    return "\n".join(lines)
