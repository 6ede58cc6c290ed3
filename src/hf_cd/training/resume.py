"""An honest resume: a resumed run compares its settings with those its checkpoint was trained with.

Why: the Trainer restores the optimizer and the learning-rate scheduler from a checkpoint, so a
new ``--learning_rate`` on resume is silently ignored while ``results.json`` and the card record
it. Settings that shape the run itself (model, schedule, CD pairs) cannot change mid-run: a resume
that changes them is refused, naming them. Settings that can change between two steps (CD
strength, cadence, TWEO weight) are applied, warned about, and recorded as a change at a step.

The settings travel inside each checkpoint's ``trainer_state.json`` (`RunSettings` is an
`ExportableState` callback), so they are exactly as whole as the checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from typing import Any

from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from hf_cd.cd.settings import CDSettings
from hf_cd.training.config import CD_ARGUMENT_PREFIX

logger = logging.getLogger(__name__)

FIXED_ON_RESUME: tuple[str, ...] = (
    "learning_rate",
    "lr_scheduler_type",
    "lr_scheduler_kwargs",
    "warmup_steps",
    "warmup_ratio",
    "weight_decay",
    "optim",
    "adam_beta1",
    "adam_beta2",
    "adam_epsilon",
    "max_steps",
    "num_train_epochs",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "seed",
    *(CD_ARGUMENT_PREFIX + name for name in CDSettings.names(mid_run=False)),
    "qat_bits",
    "qat_init",
    "qat_step_lr",
    "qat_distill",
)
"""Training settings that define the run: the optimizer and schedule restored from the checkpoint,
the steps, and which matrices CD pairs (`CDSettings` fields with ``mid_run=False``). Changing one on
resume is refused."""

ADJUSTABLE_ON_RESUME: tuple[str, ...] = (
    *(CD_ARGUMENT_PREFIX + name for name in CDSettings.names(mid_run=True)),
    "tweo_weight",
    "tweo_tau",
    "tweo_p",
)
"""Settings read afresh at every step (`CDSettings` fields with ``mid_run=True``, and TWEO's): a resume
applies the new value from its first step on."""

MODEL_SHAPE_KEYS: tuple[str, ...] = (
    "model_type",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "mlp_ratio",
    "image_size",
    "patch_size",
    "num_channels",
    "num_labels",
)
"""The model's shape: a checkpoint of another shape is another run."""


class ResumeSettingsError(ValueError):
    """A resumed run changes settings that cannot change mid-run; the message names them."""


def _plain(value: Any) -> Any:
    """JSON's view of a value, so that settings read back from a checkpoint compare equal to live ones."""
    return json.loads(json.dumps(value, default=str))


def run_settings(args: Any, model: Any) -> dict[str, Any]:
    """The settings a checkpoint records: `FIXED_ON_RESUME`, `ADJUSTABLE_ON_RESUME` and ``model.<shape>``."""
    values = {name: getattr(args, name, None) for name in (*FIXED_ON_RESUME, *ADJUSTABLE_ON_RESUME)}
    if (getattr(args, "max_steps", -1) or -1) > 0:
        values["num_train_epochs"] = None  # max_steps decides the schedule; the epoch count plays no part
    config = getattr(model, "config", None)
    for key in MODEL_SHAPE_KEYS:
        if config is not None and hasattr(config, key):
            values[f"model.{key}"] = getattr(config, key)
    return _plain(values)


class RunSettings(TrainerCallback, ExportableState):
    """Carries the run's settings and the changes made on earlier resumes through ``trainer_state.json``."""

    def __init__(self, settings: Mapping[str, Any] | None = None, changes: list | None = None):
        self.settings = dict(settings or {})
        self.changes = list(changes or [])

    def state(self) -> dict:
        return {"args": {}, "attributes": {"settings": self.settings, "changes": self.changes}}


def stored_run_settings(checkpoint: str | os.PathLike) -> tuple[dict[str, Any], list] | None:
    """``(settings, changes)`` recorded in ``checkpoint``'s trainer_state.json, or None when it has none."""
    try:
        with open(os.path.join(checkpoint, "trainer_state.json"), encoding="utf-8") as handle:
            stored = (json.load(handle).get("stateful_callbacks") or {}).get(RunSettings.__name__)
    except (OSError, ValueError, AttributeError):
        return None
    if isinstance(stored, list):
        stored = stored[-1] if stored else None
    attributes = (stored or {}).get("attributes") if isinstance(stored, Mapping) else None
    if not isinstance(attributes, Mapping) or not isinstance(attributes.get("settings"), Mapping):
        return None
    return dict(attributes["settings"]), list(attributes.get("changes") or [])


def compare_on_resume(
    checkpoint: str | os.PathLike, current: Mapping[str, Any], step: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``(earlier changes, new changes)`` of a resume from ``checkpoint`` at ``step``.

    Raises `ResumeSettingsError` naming every setting that cannot change mid-run and did. New
    changes are dicts ``{"step", "setting", "from", "to"}``, each also logged as a warning.
    """
    stored = stored_run_settings(checkpoint)
    if stored is None:
        logger.info(
            "%s records no run settings (an older hf-cd wrote it): they are not compared.", checkpoint
        )
        return [], []
    before, earlier = stored
    differ = [key for key in current if key in before and before[key] != current[key]]
    fixed = [key for key in differ if key not in ADJUSTABLE_ON_RESUME]
    if fixed:
        listed = ", ".join(f"{key} {before[key]!r} → {current[key]!r}" for key in fixed)
        raise ResumeSettingsError(
            f"Resuming from {checkpoint} with settings that cannot change mid-run: {listed}. The checkpoint's "
            "optimizer, schedule and model were made with the old values. Resume with the old values, or start "
            "a new run in another output_dir."
        )
    changes = [{"step": step, "setting": key, "from": before[key], "to": current[key]} for key in differ]
    for change in changes:
        logger.warning(
            "Resuming at step %d with %s %r instead of the checkpoint's %r: applied from this step on, and "
            "recorded in results.json (training.resume_changes).",
            step,
            change["setting"],
            change["to"],
            change["from"],
        )
    return earlier, changes
