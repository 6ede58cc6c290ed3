"""This run beside an earlier one (``--compare_with``): test and quantized accuracy, cell by cell, with the difference.

Why: CD's claim is a difference, not a number. A run shows its own accuracy; what a user needs is that
accuracy beside the baseline's (the same config with ``--cd_strength 0``) on the same images, which
only holds when both runs measured the same dataset, test subset and calibration count. That is
checked before training, so a mismatched file fails in the first second, not after the run.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hf_cd.quant.results import ACCURACY_UNIT
from hf_cd.recipe.arguments import RecipeArgumentError
from hf_cd.recipe.report import RESULTS_FILE


def load_compared_results(path: str | Path) -> tuple[Path, dict[str, Any]]:
    """The results.json at ``path`` (a file, or a run's output_dir), checked to be a finished run's."""
    given = Path(path).expanduser()
    file = given / RESULTS_FILE if given.is_dir() else given
    if not file.is_file():
        raise RecipeArgumentError(
            f"--compare_with {str(path)!r}: no such file (give a run's results.json or its output_dir)."
        )
    try:
        results = json.loads(file.read_text())
    except (OSError, ValueError) as error:
        raise RecipeArgumentError(f"--compare_with {str(file)!r} is not readable JSON ({error}).") from None
    if not isinstance(results, dict) or not isinstance(results.get("test"), Mapping):
        raise RecipeArgumentError(
            f"--compare_with {str(file)!r} is not an hf-cd run's results.json (it has no test accuracy)."
        )
    if results.get("accuracy_unit") != ACCURACY_UNIT:
        raise RecipeArgumentError(
            f"--compare_with {str(file)!r} was written by an hf-cd older than its accuracy_unit field; "
            "rerun that run with this version to compare with it."
        )
    return file, results


def check_comparable(
    file: Path,
    other: Mapping[str, Any],
    *,
    dataset_name: str,
    test_samples: int,
    quant_eval_samples: int | None,
    num_calibration: int | None,
) -> None:
    """Refuse a comparison whose numbers would not be on the same images: dataset, test size, calibration."""
    dataset = other.get("dataset") or {}
    mismatches = []
    if dataset.get("name") != dataset_name:
        mismatches.append(f"dataset {dataset.get('name')!r} there, {dataset_name!r} here")
    if dataset.get("test_samples") != test_samples:
        mismatches.append(f"{dataset.get('test_samples')} test images there, {test_samples} here")
    quantized = other.get("quantized") or {}
    if quant_eval_samples is not None and quantized.get("status") == "done":
        if quantized.get("eval_samples") != quant_eval_samples:
            mismatches.append(
                f"quantized rows on {quantized.get('eval_samples')} test images there, {quant_eval_samples} here"
            )
        if quantized.get("num_calibration") != num_calibration:
            mismatches.append(
                f"{quantized.get('num_calibration')} calibration images there, {num_calibration} here"
            )
    if mismatches:
        raise RecipeArgumentError(
            f"--compare_with {str(file)!r} measured other images ({'; '.join(mismatches)}): give the same "
            "dataset, --max_test_samples, --quant_max_eval_samples and --quant_num_calibration as that run."
        )


def _row_key(row: Mapping[str, Any]) -> tuple[Any, ...]:
    return (row.get("pipeline"), row.get("w_bits"), row.get("a_bits"), row.get("protocol"))


def _difference(here: float | None, there: float | None) -> float | None:
    if here is None or there is None or not (math.isfinite(here) and math.isfinite(there)):
        return None
    return here - there


def compare_results(here: Mapping[str, Any], there: Mapping[str, Any], file: Path) -> dict[str, Any]:
    """Accuracies of this run and the other, and here − there, for the test set and every shared quantized row.

    Accuracies stay in [0, 1] as results.json holds them; a row only one run measured is left out.
    """
    test_here, test_there = here["test"].get("accuracy"), there["test"].get("accuracy")
    other_rows = {_row_key(row): row for row in (there.get("quantized") or {}).get("rows") or []}
    rows = []
    for row in (here.get("quantized") or {}).get("rows") or []:
        match = other_rows.get(_row_key(row))
        if match is None or row.get("pipeline") == "full_precision":
            continue
        rows.append(
            {
                "pipeline": row["pipeline"],
                "w_bits": row["w_bits"],
                "a_bits": row["a_bits"],
                "protocol": row.get("protocol"),
                "here": row["accuracy"],
                "there": match["accuracy"],
                "difference": _difference(row["accuracy"], match["accuracy"]),
            }
        )
    return {
        "path": str(file),
        "cd_settings": there.get("cd_settings"),
        "seed": (there.get("training") or {}).get("seed"),
        "test": {"here": test_here, "there": test_there, "difference": _difference(test_here, test_there)},
        "rows": rows,
    }
