"""Write the model card of a CD-trained checkpoint: metadata, model-index and the rendered template."""

from __future__ import annotations

import html
import json
import logging
import math
import os
import shlex
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData, constants
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from transformers.utils import CONFIG_NAME, SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME

from hf_cd._version import __version__
from hf_cd.files import atomic_write_text
from hf_cd.hub.errors import ModelCardError
from hf_cd.quant.config import DEFAULT_PROTOCOL
from hf_cd.quant.qat import QAT_PIPELINE
from hf_cd.quant.results import ACCURACY_UNIT, FULL_PRECISION, RESULT_COLUMNS, rows_as_fractions

logger = logging.getLogger(__name__)

CARD_FILE = constants.REPOCARD_NAME  # README.md
RESULTS_FILE = "results.json"  # what hf_cd.recipe writes; named here so that hub never imports the recipe
TEMPLATE_RESOURCE = "templates/model_card.md"
PAPER = "arXiv 2605.01330"
CARD_TAGS: tuple[str, ...] = ("vision-transformer", "image-classification")
"""Every card's tags."""
CD_TAGS: tuple[str, ...] = ("colinearity-decay",)
"""Added only when the run used CD. No "quantization-friendly" tag: the records do not show that yet."""
RETIRED_TAGS: tuple[str, ...] = ("quantization-friendly",)
"""Tags earlier releases put on every card; dropped when a card is rewritten."""
EVIDENCE_URL = "https://github.com/hf-cd/hf-cd/blob/main/docs/method.md#evidence-so-far"
CD_EVIDENCE = (
    "Whether CD makes a model keep more of its accuracy when quantized is not demonstrated yet. In the "
    "project's recorded comparisons, at fine-tuning learning rates CD at strength 1 changes nothing "
    "measurable; on a pretrained DINOv2-S much stronger plain CD reduces activation outliers but has "
    "cost W4A4 accuracy, and no setting has beaten the baseline by more than the spread between seeds"
)
"""The benefit claim, phrased from the recorded evidence (`EVIDENCE_URL`); change it only when the records do."""
CARD_COLUMNS: tuple[str, ...] = tuple(c for c in RESULT_COLUMNS if not c.endswith("_seconds"))
"""The `hf_cd.quant.results` columns a card records. Timings are left out because they describe the
machine, not the model."""


# The model's shape as the card records it, from a config.json dict or a live config alike.
MODEL_SHAPE_KEYS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "image_size",
    "patch_size",
    "num_channels",
)


def card_template() -> str:
    """The Jinja template of the card, read from the installed package.

    ``model_cards/template.md`` is the canonical copy in the repository. A test keeps the two identical.
    """
    return resources.files("hf_cd").joinpath(TEMPLATE_RESOURCE).read_text(encoding="utf-8")


def build_model_card(
    results: Mapping[str, Any],
    model_id: str,
    *,
    license: str | None = None,
    language: str | list[str] | None = None,
    tags: Sequence[str] = (),
) -> ModelCard:
    """The card of a run, as a `huggingface_hub.ModelCard` rendered from `card_template`.

    ``results`` has the shape of the recipe's ``results.json``; every section except ``cd_settings``
    is optional. ``model_id`` is the Hub repo id (or the folder name) that the loading snippets name.
    ``license``, ``language`` and ``tags`` (added to the card's own tags) go into the metadata as given.
    """
    results = _plain(results)
    check_results_shape(results)
    results = _in_fractions(results)
    dataset = _dataset_facts(results.get("dataset"))
    model = _model_facts(results.get("model") or {})
    rows = _measured_rows(results)
    card_data = ModelCardData(
        library_name="transformers",
        pipeline_tag="image-classification",
        tags=_unique(
            [
                *CARD_TAGS,
                *(CD_TAGS if cd_enabled(results) else ()),
                *([model["model_type"]] if model.get("model_type") else []),
                *tags,
            ]
        ),
        license=license,
        language=language,
        datasets=[dataset["hub_id"]] if dataset and dataset["hub_id"] else None,
        base_model=model.get("base_model"),
        metrics=["accuracy"],
        model_name=model_id.rsplit("/", 1)[-1] if rows else None,
        eval_results=[_eval_result(row, dataset) for row in rows] or None,
        hf_cd={
            "version": results.get("hf_cd_version") or __version__,
            "accuracy_unit": ACCURACY_UNIT,  # model-index values are fractions in [0, 1]
            "paper": PAPER,
            "cd_settings": results.get("cd_settings") or {},
            "results": _results_summary(results, dataset, model),
        },
    )
    return ModelCard.from_template(
        card_data, template_str=card_template(), **_template_values(results, model_id)
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


def write_model_card(
    output_dir: str | os.PathLike,
    results: Mapping[str, Any] | Iterable[Mapping[str, Any]],
    *,
    repo_id: str | None = None,
    license: str | None = None,
    language: str | list[str] | None = None,
    tags: Sequence[str] = (),
) -> Path:
    """Write ``README.md`` beside the weights in ``output_dir`` and return its path.

    ``results`` is a recipe ``results.json`` dict, or the table `hf_cd.quant.evaluate_quantized`
    returns (see `results_from_table`).

    Without ``repo_id`` the loading snippets name the folder. `push_cd_model` rewrites the card with
    the repo id and keeps the ``license``, ``language`` and extra ``tags`` written here.
    """
    folder = Path(output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    if not isinstance(results, Mapping):
        results = results_from_table(results, folder)
    card = build_model_card(
        results, repo_id or folder.resolve().name, license=license, language=language, tags=tags
    )
    return write_card_file(folder / CARD_FILE, str(card))


def is_hf_cd_card(path: Path) -> bool:
    """Whether the card at ``path`` was written by hf-cd: its metadata has the ``hf_cd`` block (every hf-cd
    card has it; a tag alone is no proof, users tag their own cards ``vision-transformer`` too)."""
    try:
        data = ModelCard.load(path).data.to_dict()
    except Exception:  # unreadable, or no metadata: not a card hf-cd wrote
        return False
    return isinstance(data.get("hf_cd"), dict)


def check_card_replaceable(path: Path) -> None:
    """Refuse (`ModelCardError`) a README.md that exists and that hf-cd did not write."""
    if path.exists() and not is_hf_cd_card(path):
        raise ModelCardError(
            f"{path} exists and is not an hf-cd model card; it would be overwritten. Move it away, or write "
            "the card into the folder that holds the model the card describes."
        )


def write_card_file(path: Path, text: str) -> Path:
    """Write a card whole (temporary file + `os.replace`), never over a README.md that hf-cd did not write."""
    check_card_replaceable(path)
    return atomic_write_text(path, text)


def _unique(items: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(items))


def user_card_metadata(card_path: Path) -> dict[str, Any]:
    """The ``license``, ``language`` and extra ``tags`` a user put on an existing card, to keep on rewrite."""
    if not card_path.is_file():
        return {}
    try:
        data = ModelCard.load(card_path).data
    except Exception:  # an unreadable card has nothing to keep; the caller reports invalid cards
        return {}
    ours = (*CARD_TAGS, *CD_TAGS, *RETIRED_TAGS)  # the model type tag comes back deduplicated
    tags = [t for t in (data.tags or []) if t not in ours]
    return {"license": data.license, "language": data.language, "tags": tags}


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


# --- card contents ---------------------------------------------------------------------------------


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


DYNAMIC_ACTIVATIONS = "dynamic_per_token"
"""``activation_mode`` of rows whose encoder activations get per-token ranges at run time; the
others are static per-tensor (`hf_cd.quant.results`). Fake-quant rows in this mode are labelled apart."""


def row_protocol(row: Mapping[str, Any]) -> str | None:
    """The bit protocol of a quantized row (``None`` for full precision).

    Rows written before the ``protocol`` key existed were all measured under ``deploy``, the only
    protocol there was.
    """
    if is_full_precision(row):
        return None
    return row.get("protocol") or DEFAULT_PROTOCOL


def _row_label(row: Mapping[str, Any]) -> tuple[str, str]:
    """``("W4A4, repq", "w4a4-repq")``: the metric's name and config.

    A non-default runtime is appended, and so is a protocol other than ``deploy`` (``"W4A4, repq,
    repq_vit protocol"``), so that rows of two protocols never share a label or a table row.
    """
    if is_full_precision(row):
        name, config = "full precision", "full-precision"
    else:
        name = f"W{row['w_bits']}A{row['a_bits']}, {row['pipeline']}"
        config = f"w{row['w_bits']}a{row['a_bits']}-{row['pipeline']}"
    runtime = row.get("runtime")
    if runtime not in (None, "float", "fake_quant"):
        name, config = f"{name}, {runtime}", f"{config}-{runtime}"
    protocol = row_protocol(row)
    if protocol not in (None, DEFAULT_PROTOCOL):
        name, config = f"{name}, {protocol} protocol", f"{config}-{protocol}"
    if row.get("activation_mode") == DYNAMIC_ACTIVATIONS and runtime in (None, "float", "fake_quant"):
        name, config = f"{name}, dynamic per-token activations", f"{config}-{DYNAMIC_ACTIVATIONS}"
    return name, config


def _eval_result(row: Mapping[str, Any], dataset: Mapping[str, Any] | None) -> EvalResult:
    name, config = _row_label(row)
    dataset = dataset or {
        "name": "unknown",
        "display": "unknown",
        "hub_id": None,
        "config": None,
        "label": None,
    }
    args = {
        "pipeline": row["pipeline"],
        "w_bits": row["w_bits"],
        "a_bits": row["a_bits"],
        "calibration_images": row.get("num_calibration", 0),
        "seed": row.get("seed"),
        "embedding_bits": row.get("embedding_bits"),
        "classifier_bits": row.get("classifier_bits"),
        "protocol": row_protocol(row),
        "activation_mode": row.get("activation_mode"),
        "num_eval": row.get("num_eval"),
        "runtime": row.get("runtime"),
    }
    return EvalResult(
        task_type="image-classification",
        task_name="Image Classification",
        dataset_type=dataset["hub_id"] or dataset["name"],
        dataset_name=dataset["display"],
        dataset_config=dataset.get("config"),
        dataset_split="test",
        dataset_args={"label": dataset["label"]} if dataset.get("label") else None,
        metric_type="accuracy",
        metric_value=row["accuracy"],
        metric_name=f"top-1 ({name})",
        metric_config=config,
        metric_args={key: value for key, value in args.items() if value is not None},
    )


def _results_summary(
    results: Mapping[str, Any], dataset: Mapping[str, Any] | None, model: Mapping[str, Any]
) -> dict[str, Any]:
    """The ``results.json`` summary in the card's ``hf_cd`` block.

    The rows are left out because they are the model-index. Local paths are left out because they
    describe the trainer's disk.
    """
    summary: dict[str, Any] = {}
    if dataset:
        summary["dataset"] = {
            key: dataset[key]
            for key in (
                "name",
                "hub_id",
                "label",
                "num_labels",
                "train_samples",
                "validation_samples",
                "test_samples",
            )
        }
    if results.get("model"):
        summary["model"] = {
            key: value for key, value in model.items() if key not in ("origin", "shape", "base_model")
        }
    training = results.get("training")
    if training:
        summary["training"] = {key: value for key, value in training.items() if key != "resumed_from"}
        summary["training"]["resumed"] = bool(training.get("resumed_from"))
    for key in ("test", "validation"):
        if results.get(key):
            summary[key] = results[key]
    quantized = results.get("quantized")
    if quantized:
        summary["quantized"] = {key: value for key, value in quantized.items() if key != "rows"}
    if results.get("diagnostics"):
        summary["diagnostics"] = results["diagnostics"]
    return summary


def _percent(value: Any) -> str | None:
    """An accuracy in [0, 1] as a percentage, for the card's text and tables."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or math.isnan(value):
        return None
    return f"{100 * value:.2f}%"


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


def _format_value(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_format_value(v) for v in value) or "–"
    return str(value)


def _distinct(values: Sequence[Any]) -> str:
    """``"8"``, or ``"8 / 6"`` when rows differ; ``""`` when no row records the value."""
    return " / ".join(str(v) for v in dict.fromkeys(values) if v is not None)


def _accuracy_values(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    if not rows:
        return None
    quantized = [row for row in rows if not is_full_precision(row)]
    full_precision = next((row for row in rows if is_full_precision(row)), None)
    bit_labels = list(dict.fromkeys(f"W{row['w_bits']}A{row['a_bits']}" for row in quantized))
    cells: dict[tuple[str, str], str] = {}
    for row in quantized:
        drop = row.get("accuracy_drop")
        if drop is None and full_precision is not None:
            drop = full_precision["accuracy"] - row["accuracy"]
        cell = f"{100 * row['accuracy']:.2f}" + (
            "" if drop is None else f" ({0.0 - 100 * drop:+.2f})"  # 0 - 0.0 is +0.0
        )
        pipeline = card_text(_row_label(row)[0].split(", ", 1)[1])  # the pipeline, with a non-default runtime
        cells[(pipeline, f"W{row['w_bits']}A{row['a_bits']}")] = cell
    pipelines = list(dict.fromkeys(pipeline for pipeline, _ in cells))
    reference = full_precision or rows[0]
    deploy = [row for row in quantized if row_protocol(row) == DEFAULT_PROTOCOL]
    return {
        "bit_labels": bit_labels,
        "table": [(p, [cells.get((p, label), "—") for label in bit_labels]) for p in pipelines],
        "full_precision": _percent(full_precision["accuracy"]) if full_precision else "not measured",
        "num_eval": reference.get("num_eval"),
        "num_calibration": _distinct([row.get("num_calibration") for row in quantized]),
        "seed": _distinct([row.get("seed") for row in rows]),
        "embedding_bits": _distinct([row.get("embedding_bits") for row in deploy]),
        "classifier_bits": _distinct([row.get("classifier_bits") for row in deploy]) or "unrecorded",
        "protocols": list(dict.fromkeys(row_protocol(row) for row in quantized)),
        "activation_modes": list(dict.fromkeys(row.get("activation_mode") for row in quantized)),
        "real_runtimes": list(
            dict.fromkeys(
                card_text(row["runtime"])
                for row in quantized
                if row.get("runtime") not in (None, "fake_quant")
            )
        ),
    }


_OUTLIER_NAMES = {  # no "|x|": a pipe would split the markdown table cell
    "residual_max": "residual stream, largest magnitude",
    "residual_max_last_block": "residual stream, last block, largest magnitude",
    "linear_input_max": "linear-layer inputs, largest magnitude",
    "residual_kurtosis_max": "residual stream, largest kurtosis",
}


def _change(before: float, after: float) -> str:
    if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in (before, after)) or before <= 0:
        return "–"
    if after <= 0:
        return "→ 0"
    ratio = before / after
    return f"÷{ratio:.2f}" if ratio >= 1 else f"×{1 / ratio:.2f}"


def _diagnostics_values(diagnostics: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if not diagnostics or "before" not in diagnostics or "after" not in diagnostics:
        return None
    before, after = diagnostics["before"], diagnostics["after"]
    rows = []
    for kind, values in (after.get("alignment") or {}).items():
        earlier = (before.get("alignment") or {}).get(kind)
        if earlier:
            for statistic in ("mean", "max"):
                rows.append(
                    (
                        f"{kind} alignment ({statistic})",
                        f"{earlier[statistic]:.4g}",
                        f"{values[statistic]:.4g}",
                        _change(earlier[statistic], values[statistic]),
                    )
                )
    for key, name in _OUTLIER_NAMES.items():
        if key in (after.get("outliers") or {}) and key in (before.get("outliers") or {}):
            b, a = before["outliers"][key], after["outliers"][key]
            rows.append((name, f"{b:.4g}", f"{a:.4g}", _change(b, a)))
    return {"num_images": diagnostics.get("num_images"), "rows": rows} if rows else None


def _training_line(training: Mapping[str, Any] | None) -> str | None:
    if not training:
        return None
    parts = []
    if training.get("global_step") is not None:
        epochs = training.get("epochs")
        parts.append(
            f"{training['global_step']} optimizer steps"
            + (f" ({epochs:.2f} epochs)" if epochs is not None else "")
        )
    if training.get("learning_rate") is not None:
        parts.append(f"learning rate {training['learning_rate']:g}")
    if training.get("per_device_train_batch_size") is not None:
        parts.append(
            f"batch {training['per_device_train_batch_size']} per device × {training.get('world_size') or 1} process(es)"
        )
    if training.get("seed") is not None:
        parts.append(f"seed {training['seed']}")
    if (
        training.get("train_loss") is not None
    ):  # the Trainer's train_loss: a mean over steps, not a last value
        steps = training.get("train_loss_steps") or training.get("global_step")
        parts.append(
            f"mean train loss {training['train_loss']:.4f}" + (f" over {steps} steps" if steps else "")
        )
    return ", ".join(parts) or None


def _reproduce_command(
    model_id: str,
    dataset: Mapping[str, Any] | None,
    results: Mapping[str, Any],
    rows: Sequence[Mapping[str, Any]],
) -> str:
    """The ``hf-cd quantize`` call that measures the card's rows again (every argument shell-quoted)."""
    command = ["hf-cd quantize", f"--model_name_or_path {_shell_word(model_id)}"]
    command.append(f"--dataset_name {_shell_word(dataset['name']) if dataset else '<dataset>'}")
    if dataset and dataset.get("config_name"):
        command.append(f"--dataset_config_name {_shell_word(dataset['config_name'])}")
    # QAT rows come from training, not from `hf-cd quantize`: the command measures the PTQ rows
    quantized = [row for row in rows if not is_full_precision(row) and row["pipeline"] != QAT_PIPELINE]
    if quantized:
        pipelines = dict.fromkeys(_shell_word(row["pipeline"]) for row in quantized)
        command.append("--quant_pipelines " + " ".join(pipelines))
        command.append(
            "--quant_bits "
            + " ".join(dict.fromkeys(f"W{row['w_bits']}A{row['a_bits']}" for row in quantized))
        )
        protocol = row_protocol(quantized[0])
        flags = [("--quant_num_calibration", "num_calibration")]
        if protocol == DEFAULT_PROTOCOL:  # other protocols set the embedding and classifier bits themselves
            flags += [("--embedding_bits", "embedding_bits"), ("--classifier_bits", "classifier_bits")]
        else:
            command.append(f"--protocol {_shell_word(protocol)}")
        for flag, key in flags:
            if quantized[0].get(key) is not None:
                command.append(f"{flag} {quantized[0][key]}")
    seed = rows[0].get("seed") if rows else (results.get("training") or {}).get("seed")
    if seed is not None:
        command.append(f"--seed {seed}")
    num_eval = rows[0].get("num_eval") if rows else None
    test_samples = dataset.get("test_samples") if dataset else None
    if num_eval is not None and (test_samples is None or num_eval < test_samples):
        command.append(f"--quant_max_eval_samples {num_eval}")
    command.append("--output ptq.json")
    text = " \\\n    ".join(command)
    if dataset and dataset.get("label"):
        label = _single_line(str(dataset["label"]))
        text = f"# this model classifies the {label!r} label column; use the same one\n{text}"
    return text


def _cd_measured(diagnostics: Mapping[str, Any] | None) -> str | None:
    """What this run measured of CD's target, before → after training, in one sentence (None if nothing)."""
    values = _diagnostics_values(diagnostics)
    if not values:
        return None
    wanted = [
        row
        for row in values["rows"]
        if row[0].endswith("alignment (mean)") or row[0] in _OUTLIER_NAMES.values()
    ]
    parts = [f"{name} {before} → {after}" for name, before, after, _ in wanted[:3]]
    return "; ".join(parts) if parts else None


def _single_line(text: str) -> str:
    """``text`` with every control character (newlines included) replaced by a space."""
    return "".join(" " if unicodedata.category(c) in ("Cc", "Zl", "Zp") else c for c in text)


def _shell_word(text: Any) -> str:
    """One shell word for a command in a card: quoted, and on one line (a newline would end the command)."""
    return shlex.quote(_single_line(str(text)))


def card_text(text: Any) -> str:
    """A user-provided string (dataset name, label, path, pipeline) made inert in the card's markdown body.

    One line, HTML escaped, and without the characters that end a table cell (``|``) or a code span.
    """
    escaped = html.escape(_single_line(str(text)), quote=True)
    return escaped.replace("|", "&#124;").replace("`", "&#96;")


def _escaped(facts: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """``facts`` with its strings passed through `card_text`, for the template (the metadata keeps them raw)."""
    if facts is None:
        return None
    return {key: card_text(value) if isinstance(value, str) else value for key, value in facts.items()}


def _template_values(results: Mapping[str, Any], model_id: str) -> dict[str, Any]:
    raw_dataset = _dataset_facts(results.get("dataset"))
    dataset = _escaped(raw_dataset)
    model = _escaped(_model_facts(results.get("model") or {}))
    rows = _measured_rows(results)
    subject = f"`{model['architecture']}` image classifier"
    if dataset:
        classes = f", {dataset['num_labels']} classes" if dataset.get("num_labels") else ""
        subject += f" for {dataset['display']}{classes}"
    summary = f"This is a {subject}" + (f", {model['origin']}" if model.get("origin") else "") + "."
    cd_settings = [
        (card_text(key), card_text(_format_value(value)))
        for key, value in (results.get("cd_settings") or {}).items()
        if key not in ("library", "version")
    ]
    quantized = results.get("quantized") or {}
    qat_bits = (results.get("cd_settings") or {}).get("qat_bits")
    test = results.get("test") or {}
    validation = results.get("validation") or {}
    return {
        "title": card_text(model_id.rsplit("/", 1)[-1]),
        "model_id": card_text(model_id),
        "summary": summary,
        "cd_enabled": cd_enabled(results),
        "cd_measured": _cd_measured(results.get("diagnostics")),
        "cd_evidence": CD_EVIDENCE,
        "evidence_url": EVIDENCE_URL,
        "hf_cd_version": results.get("hf_cd_version") or __version__,
        "dataset": dataset,
        "model": model,
        "training": _training_line(results.get("training")),
        "test_accuracy": _percent(test.get("accuracy")),
        # a QAT run trains and tests the fake-quantized model: its test accuracy is not full precision
        "test_accuracy_kind": f"QAT {qat_bits}, quantized" if qat_bits else "full precision",
        "test_samples": dataset.get("test_samples") if dataset else None,
        "validation_accuracy": _percent(validation.get("accuracy")),
        "cd_settings": cd_settings,
        "accuracy": _accuracy_values(rows),
        "quantized_reason": card_text(
            quantized.get("reason") or quantized.get("status") or "no quantized evaluation ran"
        ),
        "diagnostics": _diagnostics_values(results.get("diagnostics")),
        "reproduce_command": _reproduce_command(model_id, raw_dataset, results, rows),
    }
