"""The card's markdown: the template, and the values it is rendered with (tables, sentences, commands).

Why apart from the metadata: this is the text people read, so every user-provided string in it is
made inert (`card_text`) and every number is formatted for reading; the metadata keeps them raw.
"""

from __future__ import annotations

import html
import math
import shlex
import unicodedata
from collections.abc import Mapping, Sequence
from importlib import resources
from typing import Any

from hf_cd._version import __version__
from hf_cd.hub.card_facts import CardFacts, cd_enabled, is_full_precision, row_protocol
from hf_cd.hub.card_metadata import row_label
from hf_cd.quant.config import DEFAULT_PROTOCOL
from hf_cd.quant.qat import QAT_PIPELINE

TEMPLATE_RESOURCE = "templates/model_card.md"
EVIDENCE_TABLE_RESOURCE = "templates/evidence.md"
"""The project's verdict on CD and its final-set table, generated from the records by
``bench/efficacy.py --report --sync-docs`` (empty until the verdict is decided); a test keeps it current."""
REPOSITORY_URL = "https://github.com/hf-cd/hf-cd/blob/main/"
"""Where a card's links to the project's files point: a card lives on the Hub, away from the repository."""
EVIDENCE_URL = REPOSITORY_URL + "docs/method.md#evidence-so-far"
CD_EVIDENCE = (
    "CD has not been shown to make a model keep more of its accuracy when quantized. In the project's "
    "recorded comparisons, at fine-tuning learning rates CD at strength 1 changes nothing measurable; on "
    "a pretrained DINOv2-S, the CD setting chosen on validation (strength 150) kept full precision but, "
    "over five seeds, did not beat the baseline on the W4A4 pipelines users pick (percentile, RepQ, "
    "GPTAQ, rotation) and gained only on min-max, as TWEO does"
)
"""The benefit claim, phrased from the recorded evidence (`EVIDENCE_URL`); change it only when the records do."""


def card_template() -> str:
    """The Jinja template of the card, read from the installed package.

    ``model_cards/template.md`` is the canonical copy in the repository. A test keeps the two identical.
    """
    return resources.files("hf_cd").joinpath(TEMPLATE_RESOURCE).read_text(encoding="utf-8")


def evidence_table() -> str:
    """The packaged verdict block (`EVIDENCE_TABLE_RESOURCE`), or ``""`` while there is no verdict."""
    return resources.files("hf_cd").joinpath(EVIDENCE_TABLE_RESOURCE).read_text(encoding="utf-8").strip()


def _percent(value: Any) -> str | None:
    """An accuracy in [0, 1] as a percentage, for the card's text and tables."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or math.isnan(value):
        return None
    return f"{100 * value:.2f}%"


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
        pipeline = card_text(row_label(row)[0].split(", ", 1)[1])  # the pipeline, with a non-default runtime
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


def template_values(facts: CardFacts, model_id: str) -> dict[str, Any]:
    """The values `card_template` is rendered with; every user-provided string in them passed through `card_text`."""
    results, raw_dataset, raw_model, rows = facts
    dataset = _escaped(raw_dataset)
    model = _escaped(raw_model)
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
        "cd_evidence_table": evidence_table(),
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
