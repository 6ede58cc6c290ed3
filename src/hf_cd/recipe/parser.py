"""The recipe's command line: `parse_recipe_args` reads the option dataclasses from flags and a YAML ``--config``.

Why apart from the dataclasses (`hf_cd.recipe.arguments`): this is argparse machinery (the grouped
``--help``, YAML values layered under the flags with exact type checks, deprecated names, one-line
errors), while the dataclasses are what a script or test builds directly.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import logging
import math
import os
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from transformers import HfArgumentParser

from hf_cd.data import UnknownDatasetError
from hf_cd.deprecation import rename_deprecated_flags, rename_deprecated_keys
from hf_cd.errors import DEBUG_FLAG, one_line, one_line_parser_errors, split_debug_flag
from hf_cd.recipe.arguments import (
    DEFAULT_QUANT_BITS,
    DEFAULT_QUANT_PIPELINES,
    PRESET_ONLY_OPTIONS,
    DataArguments,
    ModelArguments,
    QuantArguments,
    RecipeArgumentError,
    RecipeArguments,
)
from hf_cd.training.config import CDConfig

logger = logging.getLogger(__name__)

PROG = "hf-cd train"
"""How the recipe is run (``recipes/finetune.py`` and ``python -m hf_cd.cli train`` are the same command)."""
RECIPE_DATACLASSES = (ModelArguments, DataArguments, CDConfig, QuantArguments)
"""The option dataclasses in the order `parse_recipe_args` fills `RecipeArguments`."""


# --- the grouped --help --------------------------------------------------------------------------


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
        RECIPE_DATACLASSES,
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


# --- YAML --config, layered under the flags ------------------------------------------------------


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
    return {
        name
        for cls in RECIPE_DATACLASSES
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


# --- deprecated option names ---------------------------------------------------------------------


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


# --- parsing -------------------------------------------------------------------------------------


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
    _refuse_non_finite(outputs[: len(RECIPE_DATACLASSES)])
    return RecipeArguments(*outputs[: len(RECIPE_DATACLASSES)])


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
