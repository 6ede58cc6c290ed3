"""The card's YAML metadata: its tags, the ``model-index`` (one result per measured row) and the ``hf_cd`` block.

Why apart from the rendered text: the metadata is what programs read back (`hf_cd.hub.parse`,
the Hub's evaluation widgets), so its labels and keys must stay stable whatever the markdown says.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from huggingface_hub import EvalResult, ModelCardData

from hf_cd._version import __version__
from hf_cd.hub.card_facts import CardFacts, cd_enabled, is_full_precision, row_protocol
from hf_cd.quant.config import DEFAULT_PROTOCOL
from hf_cd.quant.results import ACCURACY_UNIT, RESULT_COLUMNS

PAPER = "arXiv 2605.01330"
CARD_TAGS: tuple[str, ...] = ("vision-transformer", "image-classification")
"""Every card's tags."""
CD_TAGS: tuple[str, ...] = ("colinearity-decay",)
"""Added only when the run used CD. No "quantization-friendly" tag: the records do not show that yet."""
RETIRED_TAGS: tuple[str, ...] = ("quantization-friendly",)
"""Tags earlier releases put on every card; dropped when a card is rewritten."""
CARD_COLUMNS: tuple[str, ...] = tuple(c for c in RESULT_COLUMNS if not c.endswith("_seconds"))
"""The `hf_cd.quant.results` columns a card records. Timings are left out because they describe the
machine, not the model."""


def _unique(items: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(items))


DYNAMIC_ACTIVATIONS = "dynamic_per_token"
"""``activation_mode`` of rows whose encoder activations get per-token ranges at run time; the
others are static per-tensor (`hf_cd.quant.results`). Fake-quant rows in this mode are labelled apart."""


def row_label(row: Mapping[str, Any]) -> tuple[str, str]:
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


def eval_result(row: Mapping[str, Any], dataset: Mapping[str, Any] | None) -> EvalResult:
    """One ``model-index`` entry: the row's top-1 accuracy, named by `row_label`, with the settings it ran."""
    name, config = row_label(row)
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


def card_metadata(
    facts: CardFacts,
    model_id: str,
    *,
    license: str | None = None,
    language: str | list[str] | None = None,
    tags: Sequence[str] = (),
) -> ModelCardData:
    """The card's metadata block; ``license``, ``language`` and ``tags`` (added to the card's own) go in as given."""
    results, dataset, model, rows = facts
    return ModelCardData(
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
        eval_results=[eval_result(row, dataset) for row in rows] or None,
        hf_cd={
            "version": results.get("hf_cd_version") or __version__,
            "accuracy_unit": ACCURACY_UNIT,  # model-index values are fractions in [0, 1]
            "paper": PAPER,
            "cd_settings": results.get("cd_settings") or {},
            "results": _results_summary(results, dataset, model),
        },
    )
