"""What a run leaves for people: results.json (written atomically), the model card and the end-of-run summary."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from hf_cd import hub
from hf_cd.files import atomic_write_text

RESULTS_FILE = "results.json"
ALIGNMENT_PLOT = "alignment.png"
ACTIVATION_PLOT = "activation_max.png"


SIGNIFICANT_DIGITS = 6
"""Floats in results.json keep this many significant digits: 77.76, not 77.75999999999999."""


def rounded(value: Any, digits: int = SIGNIFICANT_DIGITS) -> Any:
    """``value`` with every float (in nested dicts, lists and tuples) cut to ``digits`` significant digits.

    Why: accuracies are means over at most a few thousand images and timings vary run to run, so
    digits past the sixth are noise that only makes the file harder to read.
    """
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, float):
        return value if not math.isfinite(value) else float(f"{value:.{digits}g}")
    if isinstance(value, Mapping):
        return {key: rounded(item, digits) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [rounded(item, digits) for item in value]
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:  # numpy / torch scalars
        return rounded(value.item(), digits)
    return value


def write_json_atomic(path: Path, payload: Mapping[str, Any]) -> Path:
    """Write JSON (floats `rounded`) through a temporary file, so an interrupted run never leaves half a file."""
    return atomic_write_text(path, json.dumps(rounded(payload), indent=2, default=_json_default) + "\n")


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def write_model_card(output_dir: Path, results: Mapping[str, Any] | Iterable[Mapping[str, Any]]) -> Path:
    """Write ``README.md``: the card with the quantized accuracy, CD settings and diagnostics (`hf_cd.hub`).

    ``results`` is a run's results dict, or the table `hf_cd.quant.evaluate_quantized` returns.
    """
    return hub.write_model_card(output_dir, results)


# --- the summary ---------------------------------------------------------------------------------


def _percent(value: float | None) -> str:
    """An accuracy in [0, 1] (as results.json holds it) as a percentage, for people."""
    return (
        "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.2f}%"
    )


def _is_full_precision(row: Mapping[str, Any]) -> bool:
    return row.get("pipeline") == "full_precision" or row.get("runtime") == "float"


def quantized_accuracy_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Pipelines down, bit widths across (accuracy in %, drop from full precision in points).

    ``rows`` hold accuracies in [0, 1], as results.json does; the table shows percent.
    """
    full_precision = [row for row in rows if _is_full_precision(row)]
    quantized = [row for row in rows if not _is_full_precision(row)]
    labels = list(dict.fromkeys(f"W{row['w_bits']}A{row['a_bits']}" for row in quantized))
    pipelines = list(dict.fromkeys(row["pipeline"] for row in quantized))
    cells = {(row["pipeline"], f"W{row['w_bits']}A{row['a_bits']}"): row for row in quantized}
    lines = ["| pipeline | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
    for pipeline in pipelines:
        values = [_quant_cell(cells.get((pipeline, label))) for label in labels]
        lines.append(f"| {pipeline} | " + " | ".join(values) + " |")
    if full_precision:
        lines.append(f"full precision on the same images: {_percent(full_precision[0]['accuracy'])}")
    return "\n".join(lines)


def _quant_cell(row: Mapping[str, Any] | None) -> str:
    if row is None:
        return "—"
    drop = row.get("accuracy_drop")
    return _percent(row["accuracy"]) + ("" if drop is None else f" ({0.0 - 100 * drop:+.2f})")


def _change(before: float, after: float) -> str:
    if f"{before:.4g}" == f"{after:.4g}":  # a change below the printed precision is not a change
        return f"{before:.4g} → {after:.4g}  (unchanged)"
    ratio = before / after if after else float("inf")
    direction = f"÷{ratio:.1f}" if ratio >= 1 else f"×{1 / ratio:.1f}"
    if direction in ("÷1.0", "×1.0"):
        direction = "+" if after > before else "−"
        direction += f"{abs(after - before) / before:.1%}"
    return f"{before:.4g} → {after:.4g}  ({direction})"


def moment_labels(results: Mapping[str, Any]) -> tuple[str, str]:
    """What "before" and "after" training are for this run: a random initialization, or a checkpoint."""
    from_scratch = str(results.get("model", {}).get("source", "")).startswith("preset ")
    return ("at initialization", "trained") if from_scratch else ("pretrained", "fine-tuned")


def plot_title(results: Mapping[str, Any]) -> str:
    """The run a plot belongs to: dataset, model, CD setting (the plots leave the output folder)."""
    cd = results.get("cd_settings") or {}
    cd_text = f"CD λ={cd['strength']:g}" if cd.get("strength") else "CD off"
    return f"{results['dataset']['name']} · {results['model']['source']} · {cd_text}"


def _block_changes(before: Mapping[str, float], after: Mapping[str, float]) -> str:
    """Which blocks' mean alignment rose: the per-block view that a mean over blocks can hide.

    Values are compared as printed (3 significant digits): a change below that precision is
    "unchanged", never "rose 0.0276 → 0.0276".
    """
    rose, fell, unchanged = [], [], []
    for block, value in after.items():
        if block not in before:
            continue
        shown_before, shown_after = f"{before[block]:.3g}", f"{value:.3g}"
        if shown_before == shown_after:
            unchanged.append(block)
        elif value > before[block]:
            rose.append((block, shown_before, shown_after))
        else:
            fell.append(block)
    compared = len(rose) + len(fell) + len(unchanged)
    if len(fell) == compared:
        return "fell in every block"
    if len(rose) == compared:
        return "rose in every block"
    if len(unchanged) == compared:
        return "unchanged in every block (at 3 significant digits)"
    parts = []
    if rose:
        shown = ", ".join(f"{block} ({b} → {a})" for block, b, a in rose[:4])
        more = f" and {len(rose) - 4} more" if len(rose) > 4 else ""
        parts.append(f"rose in block{'s' if len(rose) > 1 else ''} {shown}{more}")
    if fell:
        parts.append(f"fell in {'the other ' if not unchanged else ''}{len(fell)}")
    if unchanged:
        parts.append(f"unchanged in {len(unchanged)}")
    return "; ".join(parts)


def _diagnostics_lines(results: Mapping[str, Any]) -> list[str]:
    diagnostics = results["diagnostics"]
    before, after = diagnostics["before"], diagnostics["after"]
    start, end = moment_labels(results)
    lines = [f"alignment and outliers, {start} → {end} ({diagnostics['num_images']} validation images):"]
    for kind, values in after["alignment"].items():
        if kind not in before["alignment"]:
            continue
        lines.append(
            f"  {kind + ' alignment (mean)':<34}{_change(before['alignment'][kind]['mean'], values['mean'])}"
        )
        by_block_before = (before.get("alignment_by_block") or {}).get(kind)
        by_block_after = (after.get("alignment_by_block") or {}).get(kind)
        if by_block_before and by_block_after:
            lines.append(f"  {'':<34}{_block_changes(by_block_before, by_block_after)}")
    names = {
        "residual_max": "residual max |x|",
        "residual_max_last_block": "residual max |x|, last block",
        "linear_input_max": "linear-input max |x|",
        "residual_kurtosis_max": "residual kurtosis (max)",
    }
    for key, name in names.items():
        if key in after["outliers"] and key in before["outliers"]:
            lines.append(f"  {name:<34}{_change(before['outliers'][key], after['outliers'][key])}")
    if start == "at initialization":
        lines.append("  (from scratch, 'before' is the random initialization, whose activations are small:")
        lines.append(
            "  |x| growing with training is normal. A run with --cd_strength 0 shows what CD changes.)"
        )
    return lines


def _points(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:+.2f}"


def describe_cd(cd: Mapping[str, Any] | None) -> str:
    """``CD λ=100 on ffn, value_output`` or ``CD off``: a run's CD, from its results.json ``cd_settings``."""
    if not cd or not cd.get("strength"):
        return "CD off"
    mode = f", {cd['mode']} mode" if cd.get("mode") not in (None, "plain") else ""
    return f"CD λ={cd['strength']:g} on {', '.join(cd.get('kinds') or [])}{mode}"


def comparison_lines(comparison: Mapping[str, Any]) -> list[str]:
    """The summary's section: one line for the test set, then a table of here / there (here − there)."""
    test = comparison["test"]
    lines = [
        f"beside     {comparison['path']} ({describe_cd(comparison.get('cd_settings'))}):",
        f"accuracy   test {_percent(test['here'])} here, {_percent(test['there'])} there "
        f"({_points(test['difference'])} points)",
    ]
    rows = comparison.get("rows") or []
    if not rows:
        lines.append("quantized  no row that both runs measured")
        return lines
    labels = list(dict.fromkeys(f"W{row['w_bits']}A{row['a_bits']}" for row in rows))
    cells = {(row["pipeline"], f"W{row['w_bits']}A{row['a_bits']}"): row for row in rows}
    lines.append("| pipeline | " + " | ".join(f"{label} here / there" for label in labels) + " |")
    lines.append("|---|" + "---|" * len(labels))
    for pipeline in dict.fromkeys(row["pipeline"] for row in rows):
        values = []
        for label in labels:
            row = cells.get((pipeline, label))
            values.append(
                "—"
                if row is None
                else f"{_percent(row['here'])} / {_percent(row['there'])} ({_points(row['difference'])})"
            )
        lines.append(f"| {pipeline} | " + " | ".join(values) + " |")
    return lines


def format_summary(results: Mapping[str, Any]) -> str:
    """The end-of-run report: data, model, steps, accuracy, quantized accuracy, what CD changed, where files went."""
    dataset, model, training, cd = (
        results["dataset"],
        results["model"],
        results["training"],
        results["cd_settings"],
    )
    lines = ["", "═" * 78, f" hf-cd recipe: {dataset['name']} · {model['source']}", "═" * 78]
    lines.append(
        f"dataset    {dataset['name']}: {dataset['num_labels']} classes; train {dataset['train_samples']:,} · "
        f"validation {dataset['validation_samples']:,} · test {dataset['test_samples']:,} images"
    )
    lines.append(
        f"model      {model['architecture']} ({model['source']}): width {model['hidden_size']}, "
        f"{model['num_hidden_layers']} blocks, {model['num_attention_heads']} heads, {model['image_size']} px / "
        f"patch {model['patch_size']}, {model['num_parameters'] / 1e6:.2f} M parameters"
    )
    cd_text = describe_cd(cd)
    resumed = f", resumed from {training['resumed_from']}" if training.get("resumed_from") else ""
    lines.append(
        f"training   {training['global_step']:,} steps ({training['epochs']:.2f} epochs, "
        f"{training['world_size']} process(es)), {results['wall_time_s']['train'] / 60:.1f} min; {cd_text}{resumed}"
    )
    validation = results.get("validation")
    val_text = f" (validation {_percent(validation['accuracy'])})" if validation else ""
    lines.append(f"accuracy   test {_percent(results['test']['accuracy'])} full precision{val_text}")

    quantized = results.get("quantized", {})
    lines.append("")
    if quantized.get("status") == "done" and quantized.get("rows"):
        protocols = " / ".join(
            dict.fromkeys(str(r.get("protocol")) for r in quantized["rows"] if r.get("protocol"))
        )
        lines.append(
            f"quantized accuracy ({quantized['eval_samples']:,} test images, "
            f"{quantized['num_calibration']} calibration images from train, "
            f"{protocols or 'unrecorded'} bit protocol):"
        )
        lines.append(quantized_accuracy_table(quantized["rows"]))
    else:
        lines.append(
            f"quantized accuracy: not measured ({quantized.get('reason') or quantized.get('status')})"
        )

    if results.get("comparison"):
        lines.append("")
        lines.extend(comparison_lines(results["comparison"]))

    diagnostics = results.get("diagnostics", {})
    if "before" in diagnostics and "after" in diagnostics:
        lines.append("")
        lines.extend(_diagnostics_lines(results))

    for warning in results.get("warnings") or []:
        lines.append("")
        lines.append(f"warning    {warning}")

    lines.append("")
    out = results["output_dir"]
    lines.append(f"model      {out}  (safetensors + image processor)")
    lines.append(f"results    {os.path.join(out, RESULTS_FILE)}")
    plots = results.get("plots") or {}
    if plots:
        lines.append(f"plots      {', '.join(plots.values())}")
    if results.get("model_card"):
        lines.append(f"card       {results['model_card']}")
    total = results["wall_time_s"].get("total")
    if total is not None:
        lines.append(f"wall time  {total / 60:.1f} min")
    lines.append("═" * 78)
    return "\n".join(lines)
