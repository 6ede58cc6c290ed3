"""What a model card says, gathered from a run: its ``results.json``, a quantized table, or a live trainer.

Why apart from the card's text: the same facts feed the metadata (`hf_cd.hub.card_metadata`) and the
markdown (`hf_cd.hub.card_render`), so they are checked, normalized (accuracies in [0, 1]) and
stripped of local paths once, here.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from transformers.utils import CONFIG_NAME, SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME

from hf_cd._version import __version__
from hf_cd.hub.errors import ModelCardError
from hf_cd.quant.config import DEFAULT_PROTOCOL
from hf_cd.quant.results import ACCURACY_UNIT, FULL_PRECISION, rows_as_fractions

logger = logging.getLogger(__name__)

RESULTS_FILE = "results.json"  # what hf_cd.recipe writes; named here so that hub never imports the recipe

# The model's shape as the card records it, from a config.json dict or a live config alike.
MODEL_SHAPE_KEYS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "image_size",
    "patch_size",
    "num_channels",
)


_NUMBER = (int, float)
RESULTS_SHAPE: dict[str, Any] = {
    "hf_cd_version": str,
    "dataset": {"name": str, "label": str, "num_labels": int, "train_samples": int, "validation_samples": int,
                "test_samples": int},
    "model": {"source": str, "architecture": str, "model_type": str, "num_parameters": int, "lora": dict},
    "training": {"global_step": int, "max_steps": int, "epochs": _NUMBER, "learning_rate": _NUMBER,
                 "per_device_train_batch_size": int, "world_size": int, "seed": int, "train_loss": _NUMBER,
                 "train_loss_steps": int, "resume_changes": list},
    "cd_settings": dict,
    "test": {"accuracy": _NUMBER, "loss": _NUMBER},
    "validation": {"accuracy": _NUMBER, "loss": _NUMBER, "epoch": _NUMBER},
    "quantized": {"status": str, "rows": list, "reason": str},
    "diagnostics": {"num_images": int, "before": {"alignment": dict, "outliers": dict},
                    "after": {"alignment": dict, "outliers": dict}},
}  # fmt: skip
"""The types of the ``results.json`` keys a card reads (``None`` is always allowed: "not recorded")."""

ROW_SHAPE: dict[str, Any] = {
    "pipeline": str, "w_bits": int, "a_bits": int, "accuracy": _NUMBER, "accuracy_drop": _NUMBER,
    "embedding_bits": int, "classifier_bits": int, "num_calibration": int, "num_eval": int, "seed": int,
    "runtime": str, "protocol": str, "activation_mode": str,
}  # fmt: skip


def _type_name(expected: Any) -> str:
    if expected is _NUMBER:
        return "a number"
    if isinstance(expected, Mapping) or expected is dict:
        return "a mapping"
    return {str: "text", int: "an integer", list: "a list"}.get(expected, getattr(expected, "__name__", "?"))


def _check_shape(value: Any, expected: Any, where: str) -> None:
    if value is None:
        return
    kind = dict if isinstance(expected, Mapping) else expected
    ok = isinstance(value, Mapping) if kind is dict else isinstance(value, kind)
    if isinstance(value, bool) and kind in (int, _NUMBER):
        ok = False
    if not ok:
        raise ModelCardError(
            f"results.json: `{where}` must be {_type_name(expected)}, got {type(value).__name__} {value!r:.60}; "
            "fix that key or write results.json again with the recipe."
        )
    if isinstance(expected, Mapping):
        for key, item_type in expected.items():
            _check_shape(value.get(key), item_type, f"{where}.{key}")


def check_results_shape(results: Mapping[str, Any]) -> None:
    """Raise `ModelCardError` naming the first ``results.json`` key a card reads whose type is wrong."""
    _check_shape(results, RESULTS_SHAPE, "results")
    for index, row in enumerate((results.get("quantized") or {}).get("rows") or []):
        _check_shape(row, ROW_SHAPE, f"results.quantized.rows[{index}]")


def results_from_table(
    table: Iterable[Mapping[str, Any]], output_dir: str | os.PathLike | None = None
) -> dict[str, Any]:
    """A ``results.json``-shaped dict around the table `hf_cd.quant.evaluate_quantized` returns.

    Why: in a notebook the natural call is ``write_model_card(output_dir, table)`` right after
    evaluating. The rows become the card's quantized section; the CD settings and the model's shape
    come from ``output_dir/config.json`` when the model was saved there (`CDTrainer` records its
    settings in ``config.hf_cd``).
    """
    rows = table.to_dicts() if hasattr(table, "to_dicts") else list(table)
    if not all(isinstance(row, Mapping) for row in rows):
        raise TypeError(
            "write_model_card takes a results dict (results.json) or a sequence of row dicts, as "
            f"hf_cd.quant.evaluate_quantized returns; got rows of type {type(rows[0]).__name__}."
        )
    rows = rows_as_fractions(rows)  # the table's rows are in percent; results.json's are fractions
    measured = [row for row in rows if not is_full_precision(row)]
    results: dict[str, Any] = {
        "accuracy_unit": ACCURACY_UNIT,
        "quantized": {
            "status": "done",
            "rows": rows,
            "eval_samples": next((row.get("num_eval") for row in rows if row.get("num_eval")), None),
            "num_calibration": next(
                (row.get("num_calibration") for row in measured if row.get("num_calibration")), None
            ),
        },
    }
    config_path = Path(output_dir) / CONFIG_NAME if output_dir is not None else None
    if config_path is not None and config_path.is_file():
        config = json.loads(config_path.read_text(encoding="utf-8"))
        if isinstance(config.get("hf_cd"), Mapping):
            results["cd_settings"] = dict(config["hf_cd"])
        results["model"] = {
            "architecture": (config.get("architectures") or [None])[0],
            "model_type": config.get("model_type"),
            "source": config.get("_name_or_path") or None,
            **{key: config.get(key) for key in MODEL_SHAPE_KEYS},
        }
    return results


def trainer_results(trainer, dataset: str | None = None, finetuned_from: str | None = None) -> dict[str, Any]:
    """What a `CDTrainer`'s card says: this run's ``results.json`` if ``output_dir`` holds it, else what the trainer knows.

    A ``results.json`` counts only if it records the trainer's step count and is not older than the
    weights. A rerun in the same ``output_dir`` must not publish the numbers of an earlier run.
    """
    folder = Path(trainer.args.output_dir)
    saved = fresh_results(folder, trainer.state.global_step)
    if saved is not None:
        return saved
    from hf_cd.architectures import unwrap_model

    model = unwrap_model(trainer.model)
    if hasattr(model, "get_base_model"):  # a PeftModel: describe the model underneath
        model = model.get_base_model()
    config = model.config
    args, state = trainer.args, trainer.state
    source = finetuned_from or getattr(config, "_name_or_path", None) or None
    return {
        "hf_cd_version": __version__,
        "dataset": {"name": dataset, "num_labels": getattr(config, "num_labels", None)} if dataset else None,
        "model": {
            "source": source,
            "architecture": type(model).__name__,
            "model_type": getattr(config, "model_type", None),
            "num_parameters": sum(p.numel() for p in model.parameters()),
            **{key: getattr(config, key, None) for key in MODEL_SHAPE_KEYS},
        },
        "training": {
            "global_step": state.global_step,
            "max_steps": state.max_steps,
            "epochs": state.epoch,
            "learning_rate": args.learning_rate,
            "per_device_train_batch_size": args.per_device_train_batch_size,
            "world_size": args.world_size,
            "seed": args.seed,
        },
        "cd_settings": trainer.cd_settings,
    }


def fresh_results(folder: Path, global_step: int | None = None) -> dict[str, Any] | None:
    """``folder``'s results.json if it describes the weights beside it, else None (with a warning).

    It must not be older than the weights, and it must record ``global_step`` when that is given.
    Otherwise it belongs to an earlier run in the same folder, and its numbers must not be published.
    """
    path = folder / RESULTS_FILE
    if not path.is_file():
        return None
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
        recorded_step = (results.get("training") or {}).get("global_step")
    except (OSError, ValueError, AttributeError) as error:
        logger.warning("%s does not parse (%s); the card leaves it out.", path, error)
        return None
    weights = [
        folder / name for name in (SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME) if (folder / name).is_file()
    ]
    older = any(path.stat().st_mtime_ns < weight.stat().st_mtime_ns for weight in weights)
    other_step = global_step is not None and recorded_step != global_step
    if older or other_step:
        reason = (
            "it is older than the weights" if older else f"it is from step {recorded_step}, not {global_step}"
        )
        logger.warning("%s belongs to an earlier run (%s); the card leaves it out.", path, reason)
        return None
    return results


def _plain(results: Mapping[str, Any]) -> dict[str, Any]:
    """A JSON round trip: numpy / torch scalars become Python numbers, so YAML and Jinja see plain data."""

    def default(value: Any) -> Any:
        if hasattr(value, "item"):
            return value.item()
        if hasattr(value, "tolist"):
            return value.tolist()
        return str(value)

    return json.loads(json.dumps(dict(results), default=default))


def _is_local_path(text: str) -> bool:
    return text.startswith(("/", "./", "../", "~")) or Path(text).expanduser().exists()


def _hub_repo_id(text: str | None) -> str | None:
    """``text`` if it names a Hub repository (not a preset and not a local path), else None."""
    if not text or text.startswith("preset ") or _is_local_path(text):
        return None
    try:
        validate_repo_id(text)
    except HFValidationError:
        return None
    return text


def _public_name(text: str) -> str:
    """A local path is reduced to its last component: a public card must not reveal the trainer's file system."""
    return Path(text).name if _is_local_path(text) else text


def _dataset_facts(dataset: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if not dataset or not dataset.get("name"):
        return None
    from hf_cd.data.registry import DATASETS

    name = str(dataset["name"])
    spec = DATASETS.get(name)
    hub_id = spec.repo_id if spec else _hub_repo_id(name)  # a Hub dataset id given as --dataset_name
    return {
        "name": _public_name(name),
        "display": _public_name(name) + ("" if spec or hub_id else " (a local dataset)"),
        "hub_id": hub_id,
        "config": spec.config if spec else dataset.get("config_name"),
        "label": dataset.get("label"),
        "num_labels": dataset.get("num_labels"),
        "train_samples": dataset.get("train_samples"),
        "validation_samples": dataset.get("validation_samples"),
        "test_samples": dataset.get("test_samples"),
    }


def _model_facts(model: Mapping[str, Any]) -> dict[str, Any]:
    source = model.get("source")
    base_model = _hub_repo_id(source)
    if not source:
        origin = None
    elif str(source).startswith("preset "):
        origin = f"trained from scratch ({source})"
    elif base_model:
        origin = f"fine-tuned from `{base_model}`"
    else:
        origin = f"fine-tuned from a local checkpoint ({_public_name(str(source))})"
    shape = []
    if model.get("hidden_size"):
        shape.append(f"width {model['hidden_size']}")
    if model.get("num_hidden_layers"):
        shape.append(f"{model['num_hidden_layers']} blocks")
    if model.get("num_attention_heads"):
        shape.append(f"{model['num_attention_heads']} heads")
    if model.get("image_size") and model.get("patch_size"):
        shape.append(f"{model['image_size']} px images in {model['patch_size']} px patches")
    if model.get("num_channels"):
        shape.append(f"{model['num_channels']} channel{'s' if model['num_channels'] != 1 else ''}")
    if model.get("num_parameters"):
        shape.append(f"{model['num_parameters'] / 1e6:.2f} M parameters")
    return {
        **{key: value for key, value in model.items() if key != "source"},
        "architecture": model.get("architecture") or "image classifier",
        "source": None if source is None else _public_name(str(source)),
        "origin": origin,
        "base_model": base_model,
        "shape": ", ".join(shape),
    }


def is_full_precision(row: Mapping[str, Any]) -> bool:
    """The quantized evaluation's reference row."""
    return row.get("pipeline") == FULL_PRECISION


def _measured_rows(results: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The quantized evaluation's rows (its own full-precision row first), or none when it did not run."""
    quantized = results.get("quantized") or {}
    if quantized.get("status") != "done":
        return []
    rows = [dict(row) for row in quantized.get("rows") or []]
    for index, row in enumerate(rows):
        missing = [key for key in ("pipeline", "w_bits", "a_bits", "accuracy") if row.get(key) is None]
        if missing:
            raise ValueError(
                f"results['quantized']['rows'][{index}] lacks {', '.join(missing)}: a row needs at least "
                "pipeline, w_bits, a_bits and accuracy (the format of hf_cd.quant.results)."
            )
    return sorted(rows, key=lambda row: not is_full_precision(row))  # stable: keeps the pipelines' order


def row_protocol(row: Mapping[str, Any]) -> str | None:
    """The bit protocol of a quantized row (``None`` for full precision).

    Rows written before the ``protocol`` key existed were all measured under ``deploy``, the only
    protocol there was.
    """
    if is_full_precision(row):
        return None
    return row.get("protocol") or DEFAULT_PROTOCOL


def cd_enabled(results: Mapping[str, Any]) -> bool:
    """Whether the run used CD: a positive ``cd_settings.strength`` (0 or missing: a baseline)."""
    strength = (results.get("cd_settings") or {}).get("strength")
    return isinstance(strength, (int, float)) and not isinstance(strength, bool) and strength > 0


def _in_fractions(results: dict[str, Any]) -> dict[str, Any]:
    """``results`` with accuracies in [0, 1]; a results.json from before ``accuracy_unit`` held percent."""
    if results.get("accuracy_unit") == ACCURACY_UNIT:
        return results
    results = dict(results, accuracy_unit=ACCURACY_UNIT)
    for key in ("test", "validation"):
        if isinstance(results.get(key), Mapping) and isinstance(results[key].get("accuracy"), (int, float)):
            results[key] = dict(results[key], accuracy=results[key]["accuracy"] / 100)
    quantized = results.get("quantized")
    if isinstance(quantized, Mapping) and quantized.get("rows"):
        results["quantized"] = dict(quantized, rows=rows_as_fractions(quantized["rows"]))
    return results


class CardFacts(NamedTuple):
    """A run's facts as the card states them (see `gather_card_facts`)."""

    results: dict[str, Any]
    """The whole ``results.json``: plain Python values, shape-checked, accuracies in [0, 1]."""
    dataset: dict[str, Any] | None
    """Name, Hub id, label column and split sizes; a local path reduced to its last component."""
    model: dict[str, Any]
    """Architecture, origin (``fine-tuned from ...``), base model and shape."""
    rows: list[dict[str, Any]]
    """The quantized evaluation's rows, its full-precision row first; none when it did not run."""


def gather_card_facts(results: Mapping[str, Any]) -> CardFacts:
    """``results`` (the shape of the recipe's ``results.json``) checked and normalized for a card.

    Raises `ModelCardError` naming the first key of the wrong type, before anything is written.
    """
    results = _plain(results)
    check_results_shape(results)
    results = _in_fractions(results)
    return CardFacts(
        results=results,
        dataset=_dataset_facts(results.get("dataset")),
        model=_model_facts(results.get("model") or {}),
        rows=_measured_rows(results),
    )
