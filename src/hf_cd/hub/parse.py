"""Read a model card's ``model-index`` back into result rows, with errors that name the bad field."""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError
from huggingface_hub.repocard import REGEX_YAML_BLOCK

from hf_cd.hub.card import CARD_FILE
from hf_cd.hub.card_facts import is_full_precision
from hf_cd.hub.card_metadata import CARD_COLUMNS
from hf_cd.hub.errors import LOAD_HINT, IncompleteResultsWarning, ModelCardError, checked_repo_id, hub_errors
from hf_cd.quant.results import ACCURACY_UNIT, FULL_PRECISION, QuantResults

_BITS_LABEL = re.compile(r"[Ww](\d+)[Aa](\d+)")
_OUR_METRIC_CONFIG = re.compile(r"w\d+a\d+-.+|full-precision")


def read_quantized_results(
    source: str | os.PathLike, *, revision: str | None = None, token: str | None = None
) -> QuantResults:
    """The quantized accuracy rows of a card (a Hub repo id, a local folder, or a README.md path).

    Returns a `QuantResults` with `CARD_COLUMNS` (e.g. ``.accuracy("repq", 4, 4)``, ``.to_markdown()``).
    Raises `ModelCardError` naming the field when the card's metadata is malformed. If rows that
    the card's ``hf_cd`` block announces are missing, an `IncompleteResultsWarning` lists them.
    """
    path = Path(source).expanduser()
    if path.is_file():
        card_path, label = path, str(path)
    elif path.is_dir():
        card_path, label = path / CARD_FILE, str(path / CARD_FILE)
        if not card_path.is_file():
            raise FileNotFoundError(
                f"{path} has no {CARD_FILE}; write one with hf_cd.hub.write_model_card(output_dir, results)."
            )
    else:
        repo_id = checked_repo_id(source)
        from huggingface_hub import hf_hub_download

        with hub_errors(f"download the model card of {repo_id!r}", token, offline_hint=LOAD_HINT):
            try:
                card_path = Path(hf_hub_download(repo_id, CARD_FILE, revision=revision, token=token))
            except EntryNotFoundError as error:
                if isinstance(error, LocalEntryNotFoundError):
                    raise
                raise FileNotFoundError(f"{repo_id} has no {CARD_FILE} model card on the Hub.") from None
        label = f"{repo_id}/{CARD_FILE}"
    return parse_card(card_path.read_text(encoding="utf-8-sig"), label)


def parse_card(text: str, label: str) -> QuantResults:
    """The rows of a card's text. ``label`` names the card in errors (a path or repo/README.md)."""
    match = REGEX_YAML_BLOCK.search(text)
    if not match:
        raise ModelCardError(
            f"{label}: no YAML metadata block (--- … ---) at the top; regenerate the card with write_model_card."
        )
    try:
        metadata = yaml.safe_load(match.group(2))
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 2}" if mark is not None else ""  # +1: 1-based, +1: the opening ---
        problem = getattr(error, "problem", None) or type(error).__name__
        raise ModelCardError(
            f"{label}: the YAML metadata does not parse{where} ({problem}); fix that line or regenerate the card."
        ) from None
    if not isinstance(metadata, dict):
        raise ModelCardError(f"{label}: the YAML metadata must be a mapping, got {type(metadata).__name__}.")
    if "model-index" not in metadata:
        raise ModelCardError(
            f"{label}: the metadata has no `model-index`, so the card records no quantized accuracy; "
            "regenerate it with write_model_card from a results.json whose quantized evaluation ran."
        )
    rows: list[dict[str, Any]] = []
    seen: dict[tuple, str] = {}
    block = metadata.get("hf_cd")
    # model-index values are fractions in [0, 1] (what evaluate and Trainer cards write); cards written
    # before hf_cd.accuracy_unit existed held percent. The returned rows are in percent, as QuantResults.
    fraction = isinstance(block, Mapping) and block.get("accuracy_unit") == ACCURACY_UNIT
    for i, entry in enumerate(_as_list(metadata["model-index"], "model-index", label)):
        where = f"model-index[{i}]"
        entry = _as_mapping(entry, where, label)
        for j, result in enumerate(
            _as_list(_required(entry, "results", where, label), f"{where}.results", label)
        ):
            result_where = f"{where}.results[{j}]"
            result = _as_mapping(result, result_where, label)
            metrics = _required(result, "metrics", result_where, label)
            for k, metric in enumerate(_as_list(metrics, f"{result_where}.metrics", label)):
                metric_where = f"{result_where}.metrics[{k}]"
                row = _row_from_metric(
                    _as_mapping(metric, metric_where, label), metric_where, label, fraction=fraction
                )
                if row is None:
                    continue
                key = (
                    row["pipeline"],
                    row["w_bits"],
                    row["a_bits"],
                    row["runtime"],
                    row["protocol"],
                    row["activation_mode"],
                )
                if key in seen:
                    raise ModelCardError(
                        f"{label}: `{metric_where}` repeats the row of `{seen[key]}` "
                        f"({row['pipeline']} W{row['w_bits']}A{row['a_bits']}); delete one of them."
                    )
                seen[key] = metric_where
                rows.append(row)
    reference = next((row["accuracy"] for row in rows if is_full_precision(row)), None)
    for row in rows:
        row["accuracy_drop"] = None if reference is None else float(reference) - float(row["accuracy"])
    _warn_missing_rows(metadata.get("hf_cd"), rows, label)
    return QuantResults(rows, columns=list(CARD_COLUMNS))


def _as_list(value: Any, where: str, label: str) -> list[Any]:
    if not isinstance(value, list):
        raise ModelCardError(f"{label}: `{where}` must be a list, got {type(value).__name__}.")
    return value


def _as_mapping(value: Any, where: str, label: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ModelCardError(f"{label}: `{where}` must be a mapping, got {type(value).__name__}.")
    return value


def _required(mapping: Mapping[str, Any], key: str, where: str, label: str) -> Any:
    if key not in mapping or mapping[key] is None:
        raise ModelCardError(f"{label}: `{where}.{key}` is missing.")
    return mapping[key]


def _int_field(
    args: Mapping[str, Any], key: str, where: str, label: str, required: bool = True
) -> int | None:
    if not required and args.get(key) is None:
        return None
    value = _required(args, key, where, label)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ModelCardError(f"{label}: `{where}.{key}` must be a non-negative integer, got {value!r}.")
    return value


def _row_from_metric(
    metric: Mapping[str, Any], where: str, label: str, *, fraction: bool = True
) -> dict[str, Any] | None:
    """One result row, or None for a metric that is not an hf-cd row (someone else's, kept untouched)."""
    args = metric.get("args")
    ours = (isinstance(args, Mapping) and "pipeline" in args) or bool(
        _OUR_METRIC_CONFIG.fullmatch(str(metric.get("config") or ""))
    )
    if not ours:
        return None
    if metric.get("type") != "accuracy":
        raise ModelCardError(f"{label}: `{where}.type` must be 'accuracy', got {metric.get('type')!r}.")
    args = _as_mapping(_required(metric, "args", where, label), f"{where}.args", label)
    value = _required(metric, "value", where, label)
    highest = 1 if fraction else 100
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= highest:
        unit = "a fraction (a number from 0 to 1)" if fraction else "percent (a number from 0 to 100)"
        raise ModelCardError(f"{label}: `{where}.value` must be a top-1 accuracy as {unit}, got {value!r}.")
    args_where = f"{where}.args"
    pipeline = _required(args, "pipeline", args_where, label)
    runtime, protocol = args.get("runtime"), args.get("protocol")
    activation_mode = args.get("activation_mode")
    if not isinstance(pipeline, str) or any(
        v is not None and not isinstance(v, str) for v in (runtime, protocol, activation_mode)
    ):
        raise ModelCardError(
            f"{label}: `{args_where}.pipeline`, `.runtime`, `.protocol` and `.activation_mode` must be strings."
        )
    return {
        "pipeline": pipeline,
        "runtime": runtime,
        "w_bits": _int_field(args, "w_bits", args_where, label),
        "a_bits": _int_field(args, "a_bits", args_where, label),
        "embedding_bits": _int_field(args, "embedding_bits", args_where, label, required=False),
        "classifier_bits": _int_field(args, "classifier_bits", args_where, label, required=False),
        "protocol": protocol,
        "activation_mode": activation_mode,
        "accuracy": round(float(value) * 100.0, 9) if fraction else float(value),  # 9: no binary noise
        "accuracy_drop": None,
        "num_eval": _int_field(args, "num_eval", args_where, label, required=False),
        "num_calibration": _int_field(args, "calibration_images", args_where, label),
        "seed": _int_field(args, "seed", args_where, label),
    }


def _warn_missing_rows(block: Any, rows: Sequence[Mapping[str, Any]], label: str) -> None:
    """Compare the model-index with the pipelines × bits that the ``hf_cd`` block says were measured."""
    try:
        quantized = block["results"]["quantized"]
        if quantized.get("status") != "done":
            return
        bits = [
            tuple(int(b) for b in _BITS_LABEL.fullmatch(str(text)).groups()) for text in quantized["bits"]
        ]
        expected = [(FULL_PRECISION, None)] + [(p, b) for p in quantized["pipelines"] for b in bits]
    except (KeyError, TypeError, AttributeError, ValueError):
        return  # no (well-formed) announcement to compare with
    present = {(row["pipeline"], (row["w_bits"], row["a_bits"])) for row in rows}
    present |= {(FULL_PRECISION, None) for row in rows if is_full_precision(row)}
    missing = [
        "full precision" if p == FULL_PRECISION else f"{p} W{b[0]}A{b[1]}"
        for p, b in expected
        if (p, b) not in present
    ]
    if missing:
        warnings.warn(
            f"{label}: the model-index lacks {len(missing)} of the {len(expected)} rows its hf_cd block lists "
            f"({', '.join(missing)}); they are missing from the returned results.",
            IncompleteResultsWarning,
            stacklevel=3,
        )
