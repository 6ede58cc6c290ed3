"""The recipe's options: model, data, CD (`CDConfig`) and quantization dataclasses, and their parser.

Why dataclasses: HfArgumentParser turns them into flags and YAML keys alike, so a config file and the
command line are one vocabulary, and tests / benchmarks build the same objects without a CLI.
"""

from __future__ import annotations

import argparse
import difflib
import os
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import yaml
from transformers import HfArgumentParser

from hf_cd.config import CDConfig
from hf_cd.data import (
    DATASETS,
    UnknownDatasetError,
)

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
    skip_corrupt_images: bool = field(
        default=False,
        metadata={
            "help": "Decode every image once before training and drop those that fail (they are logged and "
            "counted in results.json), instead of stopping at the first corrupt one, possibly hours in."
        },
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
