"""``--compare_with``: a run's test and quantized accuracy beside an earlier run's, checked before training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import requires_fashion_mnist
from hf_cd.recipe import RecipeArgumentError, format_summary
from hf_cd.recipe.comparison import compare_results
from test_recipe import QUICK, TINY_PRESET, load_finetune

RUN = [
    *TINY_PRESET, *QUICK, "--max_steps", "2", "--per_device_train_batch_size", "16", "--max_train_samples", "64",
    "--max_eval_samples", "16", "--max_test_samples", "40", "--quant_pipelines", "minmax", "percentile",
    "--quant_bits", "W8A8", "W4A4", "--quant_num_calibration", "8", "--quant_max_eval_samples", "20",
    "--diagnostics_samples", "4", "--debug",
]  # fmt: skip


def _row(pipeline: str, w_bits: int, a_bits: int, accuracy: float) -> dict:
    return {
        "pipeline": pipeline,
        "w_bits": w_bits,
        "a_bits": a_bits,
        "protocol": "deploy",
        "accuracy": accuracy,
    }


def test_rows_are_paired_by_pipeline_and_bits_and_a_row_only_one_run_has_is_left_out():
    here = {
        "test": {"accuracy": 0.80},
        "quantized": {
            "rows": [_row("minmax", 4, 4, 0.50), _row("repq", 4, 4, 0.70), _row("percentile", 8, 8, 0.79)]
        },
    }
    there = {
        "test": {"accuracy": 0.75},
        "cd_settings": {"strength": 0.0},
        "quantized": {"rows": [_row("percentile", 8, 8, 0.74), _row("minmax", 4, 4, 0.60)]},
    }
    comparison = compare_results(here, there, Path("baseline/results.json"))
    assert comparison["test"] == pytest.approx({"here": 0.80, "there": 0.75, "difference": 0.05})
    assert [(r["pipeline"], r["w_bits"], r["here"], r["there"]) for r in comparison["rows"]] == [
        ("minmax", 4, 0.50, 0.60),
        ("percentile", 8, 0.79, 0.74),
    ]
    assert [r["difference"] for r in comparison["rows"]] == pytest.approx([-0.10, 0.05])


@requires_fashion_mnist
def test_a_run_beside_its_baseline_shows_both_accuracies_and_the_difference(tmp_path):
    finetune = load_finetune()
    baseline = finetune.main([*RUN, "--cd_strength", "0", "--output_dir", str(tmp_path / "baseline")])
    run = finetune.main(
        [*RUN, "--output_dir", str(tmp_path / "cd"), "--compare_with", str(tmp_path / "baseline")]
    )

    comparison = run.results["comparison"]
    assert comparison["path"] == str(tmp_path / "baseline" / "results.json")
    assert comparison["cd_settings"]["strength"] == 0
    assert comparison["test"]["here"] == run.results["test"]["accuracy"]
    assert comparison["test"]["there"] == baseline.results["test"]["accuracy"]
    measured = {
        (r["pipeline"], r["w_bits"], r["a_bits"]): r["accuracy"]
        for r in baseline.results["quantized"]["rows"]
        if r["pipeline"] != "full_precision"
    }
    assert {(r["pipeline"], r["w_bits"], r["a_bits"]) for r in comparison["rows"]} == set(measured)
    for row in comparison["rows"]:
        assert row["there"] == measured[(row["pipeline"], row["w_bits"], row["a_bits"])]
        assert row["difference"] == pytest.approx(row["here"] - row["there"], abs=1e-5)
    saved = json.loads((tmp_path / "cd" / "results.json").read_text())
    assert saved["comparison"]["rows"] == comparison["rows"]

    summary = format_summary(run.results)
    assert f"beside     {comparison['path']} (CD off):" in summary
    assert "| pipeline | W8A8 here / there | W4A4 here / there |" in summary


@requires_fashion_mnist
def test_a_baseline_measured_on_other_images_is_refused_before_training(tmp_path):
    finetune = load_finetune()
    finetune.main([*RUN, "--cd_strength", "0", "--output_dir", str(tmp_path / "baseline")])
    with pytest.raises(RecipeArgumentError, match=r"measured other images \(40 test images there, 32 here"):
        finetune.main(
            [*RUN, "--max_test_samples", "32", "--output_dir", str(tmp_path / "cd"), "--compare_with",
             str(tmp_path / "baseline")]
        )  # fmt: skip
    assert not (tmp_path / "cd" / "checkpoint-2").exists() and not (tmp_path / "cd" / "results.json").exists()


@pytest.mark.parametrize(
    ("make", "needle"),
    [
        (lambda tmp: tmp / "nowhere", "no such file"),
        (lambda tmp: (tmp / "broken.json").write_text("{") and tmp / "broken.json", "is not readable JSON"),
        (lambda tmp: (tmp / "other.json").write_text("{}") and tmp / "other.json", "no test accuracy"),
        (
            lambda tmp: (tmp / "old.json").write_text('{"test": {"accuracy": 80.0}}') and tmp / "old.json",
            "older than its accuracy_unit",
        ),
        (lambda tmp: tmp / "run", "this run's own results.json"),
    ],
)
def test_a_file_that_is_no_finished_run_is_refused_in_one_line(tmp_path, make, needle):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "results.json").write_text('{"test": {"accuracy": 0.5}, "accuracy_unit": "fraction"}')
    with pytest.raises(RecipeArgumentError, match=needle):
        load_finetune().main(
            [*RUN, "--output_dir", str(tmp_path / "run"), "--compare_with", str(make(tmp_path))]
        )
