"""Old spellings of command-line options and YAML keys, kept for one release with a warning.

Why one module: every ``hf-cd`` subcommand spells an option the way ``HfArgumentParser`` does
(``--model_name_or_path``, ``--quant_num_calibration``); the dashed and differently named flags of
earlier releases (``--model``, ``--num-calibration``) still work, are rewritten to the new name
before parsing, and say so once, so a script that used them keeps running while its author updates it.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any


def rename_deprecated_flags(argv: Sequence[str], aliases: Mapping[str, str], command: str) -> list[str]:
    """``argv`` with each old flag (``--old`` or ``--old=value``) replaced by its new name, warning once per flag.

    ``aliases`` maps old flags to new ones, dashes included (``{"--model": "--model_name_or_path"}``).
    Values are left alone: only arguments that start with ``--`` are looked up.
    """
    renamed = []
    for argument in argv:
        flag, sep, value = argument.partition("=")
        if argument.startswith("--") and flag in aliases:
            warn_deprecated(flag, aliases[flag], command)
            argument = aliases[flag] + sep + value
        renamed.append(argument)
    return renamed


def rename_deprecated_keys(
    values: Mapping[str, Any], aliases: Mapping[str, str], source: str
) -> dict[str, Any]:
    """A YAML config's ``{option: value}`` with old keys renamed (``{"dataset_label": "label_column_name"}``)."""
    renamed: dict[str, Any] = {}
    for key, value in values.items():
        if key in aliases:
            new = aliases[key]
            if new in values:
                raise ValueError(f"{source} sets both {key!r} and its new name {new!r}: keep only {new!r}.")
            warn_deprecated(key, new, source)
            key = new
        renamed[key] = value
    return renamed


def warn_deprecated(old: str, new: str, where: str) -> None:
    """One `FutureWarning` (shown to users by default, unlike `DeprecationWarning`) naming the replacement."""
    warnings.warn(
        f"{where}: {old} is deprecated and will be removed in the next release; use {new} instead.",
        FutureWarning,
        stacklevel=3,
    )
