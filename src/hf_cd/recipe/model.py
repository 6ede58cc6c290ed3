"""The model the recipe trains: a from-scratch ViT preset or a checkpoint, its image processor, LoRA."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from transformers import (
    AutoConfig,
    AutoModelForImageClassification,
    PreTrainedModel,
    ViTConfig,
    ViTForImageClassification,
)

from hf_cd.data.statistics import ChannelStatistics, channel_statistics
from hf_cd.data.transforms import load_image_processor
from hf_cd.extras import require
from hf_cd.recipe.arguments import (
    MODEL_PRESETS,
    ModelArguments,
    RecipeArgumentError,
)
from hf_cd.resolution import adapt_to_resolution


def _image_processor_class():
    """The PIL ``ViTImageProcessor`` on every machine (why: `hf_cd.data.transforms.IMAGE_PROCESSOR_BACKEND`)."""
    from transformers import ViTImageProcessorPil

    return ViTImageProcessorPil


def preset_normalization(model_args: ModelArguments, train_split, seed: int) -> ChannelStatistics | None:
    """The training split's own pixel mean / std for a preset that was not given ``--image_mean`` / ``--image_std``.

    ``None`` for a checkpoint (its image processor brings the statistics it was trained with) and
    for a preset given both. Why not 0.5 or another dataset's numbers: see `hf_cd.data.statistics`.
    """
    if not model_args.model_preset or (model_args.image_mean and model_args.image_std):
        return None
    return channel_statistics(train_split, model_args.num_channels or 3, seed=seed)


def describe_normalization(
    image_processor: Any, model_args: ModelArguments, normalization: ChannelStatistics | None
) -> dict[str, Any]:
    """The mean / std the model's inputs are normalized with, and where they came from (for results.json)."""
    if model_args.model_name_or_path:
        source = "the checkpoint's image processor"
    elif normalization is None:
        source = "--image_mean / --image_std"
    else:
        source = f"computed from {normalization.num_images:,} training images"
    return {
        "mean": [float(v) for v in image_processor.image_mean],
        "std": [float(v) for v in image_processor.image_std],
        "source": source,
    }


def checkpoint_config(model_args: ModelArguments, **overrides: Any):
    """The checkpoint's config, or a one-line error saying why it cannot be had.

    `run_recipe` calls it before loading any data, so a Hub id that does not exist (or a Hub that
    cannot be reached) fails in seconds, not after the dataset has loaded.
    """
    name = model_args.model_name_or_path
    try:
        return AutoConfig.from_pretrained(
            name, revision=model_args.model_revision, cache_dir=model_args.cache_dir, **overrides
        )
    except (OSError, ValueError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise RecipeArgumentError(
            f"--model_name_or_path {name!r}: no local directory of that name, and it cannot be loaded as a Hub "
            f"id ({reason}). Check the spelling, the network (or HF_HUB_OFFLINE), or give a local checkpoint."
        ) from error


def build_model(
    model_args: ModelArguments, labels: Mapping[str, Any], normalization: ChannelStatistics | None = None
) -> tuple[PreTrainedModel, Any]:
    """The model (new classifier for ``labels``) and its image processor, from a preset or a checkpoint.

    ``labels`` is `hf_cd.data.label_mapping` of the dataset: ``num_labels``, ``id2label``, ``label2id``.
    ``normalization`` (a preset's mean / std, see `preset_normalization`) fills in whichever of
    ``--image_mean`` / ``--image_std`` was not given; without it, they default to 0.5.
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
        mean = model_args.image_mean or (list(normalization.mean) if normalization else [0.5] * num_channels)
        std = model_args.image_std or (list(normalization.std) if normalization else [0.5] * num_channels)
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
    config = checkpoint_config(model_args, **labels, **overrides)
    model = AutoModelForImageClassification.from_pretrained(
        model_args.model_name_or_path,
        config=config,
        ignore_mismatched_sizes=model_args.ignore_mismatched_sizes,
        **hub,
    )
    image_processor = load_image_processor(model_args.model_name_or_path, **hub)
    if model_args.image_size is not None:
        try:
            adapt_to_resolution(model, image_processor, model_args.image_size)
        except ValueError as error:
            raise RecipeArgumentError(f"--image_size {model_args.image_size}: {error}") from error
    return model, image_processor


def add_lora(model: PreTrainedModel, model_args: ModelArguments):
    """Wrap ``model`` in LoRA adapters on the chosen encoder linears (the head trains in full)."""
    peft = require("peft", "LoRA fine-tuning (--use_lora)")
    LoraConfig, get_peft_model = peft.LoraConfig, peft.get_peft_model

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
