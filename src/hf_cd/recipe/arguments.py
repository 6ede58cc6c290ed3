"""The recipe's options: model, data, CD (`CDConfig`) and quantization dataclasses, and their parser.

Why dataclasses: HfArgumentParser turns them into flags and YAML keys alike, so a config file and the
command line are one vocabulary, and tests / benchmarks build the same objects without a CLI.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import logging
import math
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
from hf_cd.data.loading import check_dataset_source
from hf_cd.deprecation import rename_deprecated_flags, rename_deprecated_keys
from hf_cd.errors import DEBUG_FLAG, one_line, one_line_parser_errors, split_debug_flag
from hf_cd.extras import has_extra_package

logger = logging.getLogger(__name__)

PROG = "hf-cd train"
"""How the recipe is run (``recipes/finetune.py`` and ``python -m hf_cd.cli train`` are the same command)."""

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


PRESET_ONLY_OPTIONS: tuple[str, ...] = (
    "patch_size",
    "num_channels",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "image_mean",
    "image_std",
)
"""Options that shape a model trained from scratch; a checkpoint brings its own."""

UNSET_VALUES = ("", "none", "null")


def _none_if_unset(value: str | None) -> str | None:
    return None if value is None or str(value).strip().lower() in UNSET_VALUES else value


def _looks_like_a_path(name: str) -> bool:
    """``./x``, ``../x``, ``/x``, ``~/x``, ``x/`` or ``a/b/c``: a Hub id is ``name`` or ``namespace/name``."""
    return name.startswith((".", "/", "~")) or name.endswith("/") or name.count("/") > 1 or "\\" in name


def check_model_source(name: str, flag: str = "--model_name_or_path") -> None:
    """Refuse a ``--model_name_or_path`` that is neither a checkpoint directory nor a Hub id, before any data loads.

    Why here: transformers would say "Repo id must be in the form 'repo_name' or 'namespace/repo_name'"
    about a mistyped directory, and only after the whole dataset has loaded.
    """
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise RecipeArgumentError(
                f"{flag} {name!r} is a directory without a config.json, so not a transformers "
                "checkpoint: give the folder that save_pretrained() wrote (config.json + model.safetensors)."
            )
        return
    if path.exists():
        raise RecipeArgumentError(
            f"{flag} {name!r} is a file: give the checkpoint's directory (the one holding "
            "config.json) or a Hub id."
        )
    if _looks_like_a_path(name):
        raise RecipeArgumentError(
            f"{flag} {name!r}: no such directory ({path.resolve()}). Check the path, or give a "
            "Hub id such as facebook/dinov2-small."
        )
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError as error:
        raise RecipeArgumentError(
            f"{flag} {name!r} is not a Hub id (namespace/name, letters, digits, '-', '_', '.') and "
            f"no such directory exists ({path.resolve()}): {str(error).splitlines()[0]}"
        ) from None


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
        metadata={
            "help": "Preset only: per-channel normalization mean of the saved image processor. By default "
            "it is computed from the training split (up to 2,000 images); a checkpoint uses its own processor's."
        },
    )
    image_std: list[float] | None = field(
        default=None,
        metadata={
            "help": "Preset only: per-channel normalization std. By default computed from the training split."
        },
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
        # `--model_preset none` (or null, '') on the command line clears a source that a config file set
        self.model_name_or_path = _none_if_unset(self.model_name_or_path)
        self.model_preset = _none_if_unset(self.model_preset)
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
        if self.model_name_or_path:
            check_model_source(self.model_name_or_path)
        preset_only = [name for name in PRESET_ONLY_OPTIONS if getattr(self, name) is not None]
        if self.model_name_or_path and preset_only:
            raise RecipeArgumentError(
                f"{', '.join(preset_only)} shape a model trained from scratch and apply only with --model_preset; "
                f"{self.model_name_or_path!r} brings its own config and image processor."
            )
        if self.use_lora and not has_extra_package("peft"):
            raise RecipeArgumentError(
                "--use_lora needs peft, which hf-cd installs only on request: pip install 'hf-cd[peft]'"
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
            "help": "Anything datasets.load_dataset reads: a Hub dataset id (e.g. beans), or a local folder (an "
            "imagefolder tree, parquet / arrow / csv files, a save_to_disk output). Registered names get special "
            f"handling ({', '.join(sorted(DATASETS))}: offline copy, pinned revision, label choices)."
        },
    )
    dataset_config_name: str | None = field(
        default=None, metadata={"help": "The Hub dataset's configuration (subset) name, if it has several."}
    )
    dataset_revision: str | None = field(
        default=None, metadata={"help": "Branch, tag or commit of a Hub --dataset_name (default: main)."}
    )
    image_column_name: str | None = field(
        default=None,
        metadata={
            "help": "The dataset column holding the images (or image file paths). Default: image (a registered "
            "dataset: its own, e.g. image_lt for smallnorb)."
        },
    )
    label_column_name: str | None = field(
        default=None,
        metadata={
            "help": "The dataset column holding the labels. Default: label (for fgvc_aircraft: variant; also "
            "family, manufacturer)."
        },
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
        default=0.0,
        metadata={
            "help": "Probability of a horizontal flip during training (default 0: off). 0.5 suits classes that "
            "look the same mirrored (clothes, scenes, aircraft); digits and text do not."
        },
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
        check_dataset_source(self.dataset_name)  # a Hub id is checked for its form here, loaded later
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
    quant_extra: dict[str, Any] | str | None = field(
        default=None,
        metadata={
            "help": "Pipeline options (hf_cd.quant's QuantConfig.extra) for every quantized row: a JSON object on "
            'the command line, e.g. \'{"rotate_activations": "dynamic_per_token"}\' or '
            '\'{"onnxruntime": {"calibration_method": "percentile"}}\', a mapping in a YAML config. Each '
            "pipeline reads its own keys; a misspelt one is refused before training."
        },
    )

    def __post_init__(self) -> None:
        if isinstance(self.quant_pipelines, str):
            self.quant_pipelines = [self.quant_pipelines]
        if isinstance(self.quant_bits, str):
            self.quant_bits = [self.quant_bits]
        self.quant_extra = parse_quant_extra(self.quant_extra)
        self.quant_bits = [f"W{w}A{a}" for w, a in self.bit_pairs()]  # validates; one spelling in results
        for name in ("quant_num_calibration", "quant_batch_size"):
            if getattr(self, name) < 1:
                raise RecipeArgumentError(f"{name} must be a positive integer, got {getattr(self, name)}.")

    def bit_pairs(self) -> list[tuple[int, int]]:
        """``["W8A8", "W4A8"]`` → ``[(8, 8), (4, 8)]``."""
        from hf_cd.quant.config import parse_bits

        pairs = []
        for label in self.quant_bits:
            try:
                pairs.append(parse_bits(str(label)))
            except (TypeError, ValueError) as error:
                raise RecipeArgumentError(f"quant_bits: {error}") from None
        return pairs


QUANT_EXTRA_EXAMPLE = '\'{"rotate_activations": "dynamic_per_token"}\''


def parse_quant_extra(value: Mapping[str, Any] | str | None) -> dict[str, Any]:
    """``--quant_extra``'s JSON text (command line) or mapping (YAML) as a dict; unset is ``{}``.

    Why a string field: HfArgumentParser cannot type a flag as a dict, so the command line gives JSON text,
    while a YAML config's mapping arrives as it is (it becomes the parser's default, which argparse keeps).
    """
    if value is None:
        return {}
    if isinstance(value, str):
        if value.strip().lower() in UNSET_VALUES:
            return {}
        try:
            value = json.loads(value)
        except json.JSONDecodeError as error:
            raise RecipeArgumentError(
                f"--quant_extra is not valid JSON ({error}): give a JSON object of pipeline options, e.g. "
                f"{QUANT_EXTRA_EXAMPLE}."
            ) from None
    if not isinstance(value, Mapping):
        raise RecipeArgumentError(
            f"--quant_extra must be a JSON object (a mapping in YAML) of pipeline options, got "
            f"{type(value).__name__} {value!r}; e.g. {QUANT_EXTRA_EXAMPLE}."
        )
    keys = [key for key in value if not isinstance(key, str)]
    if keys:
        raise RecipeArgumentError(f"--quant_extra's option names are strings, got {keys!r}.")
    return dict(value)


class RecipeArguments(NamedTuple):
    model: ModelArguments
    data: DataArguments
    training: CDConfig
    quant: QuantArguments


def _escape_percent(help_text: str) -> str:
    """argparse %-formats help texts: a bare ``%`` (e.g. "within 1%") would crash ``--help``."""
    return re.sub(r"%%|%\(|%", lambda m: m.group(0) if m.group(0) != "%" else "%%", help_text)


USAGE = "%(prog)s [-h] [--config FILE.yaml] [--debug] [--OPTION VALUE ...]"
DESCRIPTION = """\
Train a ViT / DeiT / Dinov2 with Colinearity Decay (from a preset or a checkpoint), evaluate it at full
precision and quantized, and save the model, results.json, plots and a model card. A YAML --config sets
any option below (without its dashes); flags on the command line override it."""
EPILOG = """examples:
  # Fashion-MNIST, a small ViT from scratch on 2 CPU cores (what `make run` does)
  hf-cd train --config recipes/configs/fashion_mnist_vit_tiny_cpu.yaml

  # any dataset datasets.load_dataset reads, with transformers' column flags
  hf-cd train --config recipes/configs/imagefolder_vit_tiny_cpu.yaml --dataset_name beans \\
      --image_column_name image --label_column_name labels

  # your own images: one sub-folder per class (add train/ and test/ levels to fix the splits)
  hf-cd train --config recipes/configs/imagefolder_vit_tiny_cpu.yaml \\
      --dataset_name path/to/folder --output_dir outputs/my_run --num_train_epochs 30
"""

OPTION_GROUPS: tuple[tuple[str, str], ...] = (
    ("Model", "What to train: a preset from scratch or a checkpoint to fine-tune (one of the two)."),
    ("Data", "Which images, how many, and how they are augmented."),
    ("Colinearity Decay", "The decoupled update that keeps weight pairs from aligning (hf_cd.CDConfig)."),
    ("Quantized evaluation", "The post-training quantized copies measured after training (hf_cd.quant)."),
    ("Trainer arguments", "transformers.TrainingArguments, as the Trainer documents them."),
)


class RecipeHelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keep the epilog's line breaks, and add "(default: …)" only where the help does not already say it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (
            "default" in text.lower()
            or action.default in (None, "", argparse.SUPPRESS)
            or any(option.startswith(("--no_", "--no-")) for option in action.option_strings)
        ):
            return text
        return text + " (default: %(default)s)"


def _group_of(dest: str) -> str:
    fields_of = {
        cls: {f.name for f in dataclasses.fields(cls)}
        for cls in (ModelArguments, DataArguments, QuantArguments)
    }
    if dest in fields_of[ModelArguments]:
        return "Model"
    if dest in fields_of[DataArguments]:
        return "Data"
    if dest in fields_of[QuantArguments]:
        return "Quantized evaluation"
    if dest in _cd_options():
        return "Colinearity Decay"
    return "Trainer arguments"


def _cd_options() -> set[str]:
    from transformers import TrainingArguments

    trainer = {f.name for f in dataclasses.fields(TrainingArguments)}
    return {f.name for f in dataclasses.fields(CDConfig) if f.name not in trainer}


def _quant_help() -> dict[str, str]:
    """Help that names what `hf_cd.quant` offers now, so a newly registered pipeline is listed by itself."""
    from hf_cd import quant
    from hf_cd.quant.algorithms.quantizers import FLOAT_BITS, MAX_BITS, MIN_BITS

    return {
        "quant_pipelines": (
            f"Quantization pipelines to compare, any of: {', '.join(quant.available_pipelines())} "
            f"(default: {' '.join(DEFAULT_QUANT_PIPELINES)})."
        ),
        "quant_bits": (
            "Encoder bit widths as WxAy (x bits for weights, y for activations), e.g. W8A8 W4A4 W4A8; each "
            f"{MIN_BITS}..{MAX_BITS} to quantize, or ≥ {FLOAT_BITS} to leave that tensor in floating point "
            f"(W4A{FLOAT_BITS}: weights only). Default: {' '.join(DEFAULT_QUANT_BITS)}."
        ),
    }


def recipe_argument_parser(prog: str = PROG) -> HfArgumentParser:
    """Every recipe option as a flag, in groups: model, data, CD, quantization, then the Trainer's own."""
    parser = HfArgumentParser(
        (ModelArguments, DataArguments, CDConfig, QuantArguments),
        prog=prog,
        usage=USAGE,
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=RecipeHelpFormatter,
    )
    quant_help = _quant_help()
    for action in parser._actions:
        if action.dest in quant_help:
            action.help = quant_help[action.dest]
        if DEBUG_FLAG in action.option_strings:  # TrainingArguments.debug takes values; bare, it is ours
            action.help = (
                "Alone: show the traceback of an option, data or model error instead of one line and exit "
                "status 2 (HF_CD_DEBUG=1 does the same). With values: the Trainer's debug features "
                "(underflow_overflow, tpu_metrics_debug)."
            )
        if action.help:
            action.help = _escape_percent(action.help)
    parser.add_argument(
        "--config",
        default=None,
        metavar="FILE.yaml",
        help="YAML file of recipe options (any other flag, without its dashes); flags on the command line "
        "override it.",
    )
    groups = {title: parser.add_argument_group(title, description) for title, description in OPTION_GROUPS}
    general = parser._optionals
    for action in list(general._group_actions):
        if action.dest == "debug":  # after --config, with -h: it concerns the command line itself
            action.metavar = "FEATURE"
            general._group_actions.remove(action)
            general._group_actions.append(action)
        if action.dest in ("help", "config", "debug"):
            continue
        title = _group_of(action.dest)
        general._group_actions.remove(action)
        groups[title]._group_actions.append(action)
    return one_line_parser_errors(parser)


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key given twice is an error (PyYAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise RecipeArgumentError(
                    f"{self.name}: {key!r} is set twice (lines {seen[key] + 1} and {key_node.start_mark.line + 1}); "
                    "keep one."
                )
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def _dict_fields() -> set[str]:
    """Options whose dataclass type takes a mapping (``quant_extra``, ``lr_scheduler_kwargs``, ...)."""
    import typing

    def takes_mapping(annotation: Any) -> bool:
        if annotation is dict or typing.get_origin(annotation) is dict:
            return True
        return any(takes_mapping(arg) for arg in typing.get_args(annotation))

    # The annotations, not dataclasses.fields(): HfArgumentParser rewrites a field's type in place
    # (dict | str becomes str).
    classes = (ModelArguments, DataArguments, CDConfig, QuantArguments)
    return {
        name
        for cls in classes
        for name, annotation in typing.get_type_hints(cls).items()
        if takes_mapping(annotation)
    }


def _typed_config_value(action: argparse.Action, value: Any, where: str, dict_fields: set[str]) -> Any:
    """A YAML value as the option's type, or a `RecipeArgumentError` naming it: never a silent conversion.

    Why: YAML values become parser defaults, which argparse does not convert, so ``cd_every: 2.5``
    would reach the dataclass as a float and a list where a number belongs would fail deep inside.
    The command line's conversions apply instead, with exact checks (``2.5`` is not an int).
    """
    if value is None:
        return None
    if isinstance(value, Mapping):
        if action.dest in dict_fields:
            return dict(value)
        raise RecipeArgumentError(f"{where} takes a single value, got a mapping {dict(value)!r}.")
    if isinstance(value, (list, tuple)):
        if action.nargs not in ("+", "*"):
            raise RecipeArgumentError(f"{where} takes a single value, got a list {list(value)!r}.")
        return [_typed_scalar(action, item, where) for item in value]
    return _typed_scalar(action, value, where)


def _typed_scalar(action: argparse.Action, value: Any, where: str) -> Any:
    from transformers.hf_argparser import string_to_bool

    kind = action.type
    expected = {int: "an integer", float: "a number", string_to_bool: "true or false"}.get(kind)
    if isinstance(value, (list, tuple, Mapping)):
        raise RecipeArgumentError(f"{where} takes {expected or 'a single value'} per entry, got {value!r}.")
    try:
        if kind is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            converted: Any = int(value) if isinstance(value, (int, float)) else int(str(value))
        elif kind is float:
            if isinstance(value, bool):
                raise ValueError
            converted = float(value)
        elif kind is string_to_bool:
            if not isinstance(value, (bool, str)):
                raise ValueError
            converted = value if isinstance(value, bool) else string_to_bool(value)
        elif kind is str:
            converted = str(value).lower() if isinstance(value, bool) else str(value)
        elif kind is not None and action.choices is not None and isinstance(value, str):
            converted = kind(value)
        else:
            return value  # the Trainer's own special types check themselves
    except (TypeError, ValueError, argparse.ArgumentTypeError):
        raise RecipeArgumentError(f"{where} must be {expected or 'text'}, got {value!r}.") from None
    if action.choices is not None and converted not in action.choices:
        raise RecipeArgumentError(
            f"{where} must be one of {', '.join(map(str, action.choices))}, got {value!r}."
        )
    return converted


def load_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """Read a recipe YAML file into a flat ``{option: value}`` dict."""
    path = Path(path)
    if not path.is_file():
        raise RecipeArgumentError(f"--config {str(path)!r}: no such file.")
    try:
        with path.open(encoding="utf-8") as stream:
            values = yaml.load(stream, Loader=_UniqueKeyLoader) or {}
    except yaml.YAMLError as error:
        raise RecipeArgumentError(f"{path}: not valid YAML ({one_line(error)}).") from None
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
            f"{source}: unknown option(s) {', '.join(hints)}. `hf-cd train --help` lists them all."
        )
    dict_fields = _dict_fields()
    typed = {}
    for action in parser._actions:
        if action.dest in values and action.dest not in typed and action.option_strings:
            where = f"{source}: {action.dest}"
            typed[action.dest] = _typed_config_value(action, values[action.dest], where, dict_fields)
    for action in parser._actions:
        if action.dest in values:
            action.required = False
    parser.set_defaults(**{**values, **typed})


def _given_on_command_line(argv: Sequence[str], name: str) -> bool:
    """Whether ``--name`` (or HfArgumentParser's ``--name-with-dashes`` alias) is among ``argv``."""
    flags = {f"--{name}", f"--{name.replace('_', '-')}"}
    return any(arg.split("=", 1)[0] in flags for arg in argv)


def _command_line_model_source_wins(
    values: Mapping[str, Any], argv: Sequence[str], source: str
) -> dict[str, Any]:
    """A model source given as a flag replaces the config file's other source (and a preset's shape options).

    Why: ``--config tiny_cpu.yaml --model_name_or_path my-vit`` means "this recipe, that checkpoint";
    the file's ``model_preset`` and its patch / width / normalization options describe a model that
    is no longer trained. ``image_size`` applies to both kinds of source and is kept.
    """
    values = dict(values)
    dropped = []
    if _given_on_command_line(argv, "model_name_or_path") and "model_preset" in values:
        dropped = ["model_preset"] + [
            name for name in PRESET_ONLY_OPTIONS if name in values and not _given_on_command_line(argv, name)
        ]
    elif _given_on_command_line(argv, "model_preset") and "model_name_or_path" in values:
        dropped = ["model_name_or_path"]
    for name in dropped:
        values.pop(name)
    if dropped:
        logger.info("The command line's model source replaces %s's %s.", source, ", ".join(dropped))
    return values


DEPRECATED_OPTIONS: dict[str, str] = {
    "dataset_label": "label_column_name",
    "image_column": "image_column_name",
}
"""Earlier names of recipe options (flags and YAML keys) → today's, transformers' example's spelling."""


def deprecated_flags(options: Mapping[str, str]) -> dict[str, str]:
    """``{"old": "new"}`` option names as flags, in both spellings HfArgumentParser accepts."""
    flags = {}
    for old, new in options.items():
        flags[f"--{old}"] = f"--{new}"
        flags[f"--{old.replace('_', '-')}"] = f"--{new}"
    return flags


def parse_recipe_args(argv: Sequence[str] | None = None, prog: str = PROG) -> RecipeArguments:
    """Parse ``--config file.yaml`` plus command-line flags (which override the file) into the four dataclasses."""
    argv = list(sys.argv[1:] if argv is None else argv)
    _, argv = split_debug_flag(argv)  # hf_cd.recipe.cli reads it
    argv = rename_deprecated_flags(argv, deprecated_flags(DEPRECATED_OPTIONS), prog)
    pre = one_line_parser_errors(argparse.ArgumentParser(prog=prog, add_help=False))
    pre.add_argument("--config", default=None)
    known, rest = pre.parse_known_args(argv)
    parser = recipe_argument_parser(prog)
    if known.config:
        try:
            values = rename_deprecated_keys(load_config_file(known.config), DEPRECATED_OPTIONS, known.config)
        except ValueError as error:
            raise RecipeArgumentError(str(error)) from None
        values = _command_line_model_source_wins(values, rest, known.config)
        _apply_config_defaults(parser, values, known.config)
    _, unknown = parser.parse_known_args(rest)
    if unknown:
        raise RecipeArgumentError(unknown_arguments_message(parser, unknown))
    try:
        outputs = parser.parse_args_into_dataclasses(args=rest, look_for_args_file=False)
    except (RecipeArgumentError, UnknownDatasetError):
        raise
    except ValueError as error:  # TrainingArguments' own checks: the message names the option
        raise RecipeArgumentError(str(error)) from error
    _refuse_non_finite(outputs[:4])
    return RecipeArguments(*outputs[:4])


def _refuse_non_finite(arguments: Sequence[Any]) -> None:
    """Non-finite numbers are errors: ``--learning_rate nan`` or ``cd_strength: .inf`` would train nothing sane."""
    for options in arguments:
        for item in dataclasses.fields(options):
            value = getattr(options, item.name, None)
            values = value if isinstance(value, (list, tuple)) else [value]
            if any(isinstance(v, float) and not math.isfinite(v) for v in values):
                raise RecipeArgumentError(f"{item.name} must be a finite number, got {value!r}.")


def unknown_arguments_message(parser: argparse.ArgumentParser, unknown: Sequence[str]) -> str:
    """Name each unknown flag with the closest real one, as the YAML path does for unknown keys."""
    flags = [option for action in parser._actions for option in action.option_strings]
    hints = []
    for argument in unknown:
        if not argument.startswith("-"):
            continue  # the value of an unknown flag, or a stray word: named below if nothing else is
        name = argument.split("=", 1)[0]
        close = difflib.get_close_matches(name, flags, n=1, cutoff=0.75)
        hints.append(name + (f" (did you mean {close[0]}?)" if close else ""))
    if not hints:
        return (
            f"Unexpected argument(s) {' '.join(unknown)!r}: every option is a --flag value pair "
            "(`hf-cd train --help` lists them)."
        )
    return f"Unknown option(s) {', '.join(hints)}. `hf-cd train --help` lists them all."
