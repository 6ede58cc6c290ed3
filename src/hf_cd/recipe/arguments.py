"""The recipe's options: model, data and quantization dataclasses (CD and Trainer options are `CDConfig`).

Why dataclasses: HfArgumentParser turns them into flags and YAML keys alike, so a config file and the
command line are one vocabulary, and tests / benchmarks build the same objects without a CLI. Each
checks its values in ``__post_init__``, before any data loads; `hf_cd.recipe.parser` reads them from
the command line and a YAML ``--config``.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from hf_cd.data import DATASETS
from hf_cd.data.loading import check_dataset_source
from hf_cd.extras import has_extra_package
from hf_cd.training.config import CDConfig

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
    compare_with: str | None = field(
        default=None,
        metadata={
            "help": "An earlier run's results.json (or its output_dir), e.g. the same config with "
            "--cd_strength 0: the summary and results.json show this run's test and quantized accuracy "
            "beside it, with the difference. Both runs must have measured the same images (dataset, "
            "--max_test_samples, --quant_max_eval_samples, --quant_num_calibration); checked before training."
        },
    )
    quant_extra: dict[str, Any] | str | None = field(
        default=None,
        metadata={
            "help": "Options for every quantized row's method, keyed as NAME:key=value spells them (the "
            "method config's spec keys: rotate_activations is RotateConfig.activations, repq_weights "
            "RepQConfig.weights, calibration_method OnnxRuntimeInt8Config.calibration_method): a JSON "
            'object on the command line, e.g. \'{"rotate_activations": "dynamic_per_token"}\', a mapping '
            "in a YAML config. Each method takes its own keys and leaves the others; a misspelt one is "
            "refused before training. Options of one method alone follow its name in --quant_pipelines "
            "(rotate_gptaq:rotate_activations=dynamic_per_token)."
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
