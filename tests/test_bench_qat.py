"""bench/qat.py: the PTQ row QAT is compared with is chosen on validation, never on the test images."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture
def qat_bench():
    saved = list(sys.path)
    sys.path.insert(0, str(BENCH))
    import qat

    yield qat
    sys.path[:] = saved


def test_best_ptq_is_chosen_on_validation_and_reported_on_test(qat_bench):
    rows = [
        {"pipeline": "full_precision", "w_bits": 32, "a_bits": 32, "accuracy": 85.0, "val_accuracy": 86.0},
        {"pipeline": "percentile", "w_bits": 4, "a_bits": 4, "accuracy": 80.0, "val_accuracy": 78.0},
        {"pipeline": "repq", "w_bits": 4, "a_bits": 4, "accuracy": 79.0, "val_accuracy": 81.0},
    ]
    assert qat_bench.best_ptq({"rows": rows}, "W4A4") == ("repq", 79.0)  # best on validation, not on test
    assert qat_bench.best_ptq({"rows": rows}, "W6A6") is None
    older = [{k: v for k, v in r.items() if k != "val_accuracy"} for r in rows]
    assert qat_bench.best_ptq({"rows": older}, "W4A4") is None  # no validation: no choice on test either


def test_the_static_ptq_row_leaves_out_dynamic_per_token_activations(qat_bench):
    dynamic = "rotate_gptaq:rotate_activations=dynamic_per_token"
    rows = [
        {"pipeline": dynamic, "w_bits": 4, "a_bits": 4, "accuracy": 83.0, "val_accuracy": 84.0},
        {"pipeline": "gptaq", "w_bits": 4, "a_bits": 4, "accuracy": 81.0, "val_accuracy": 80.0},
    ]
    assert qat_bench.best_ptq({"rows": rows}, "W4A4") == (dynamic, 83.0)
    assert qat_bench.best_ptq({"rows": rows}, "W4A4", static_only=True) == ("gptaq", 81.0)


def test_the_report_never_averages_runs_of_different_schedules(qat_bench, tmp_path):
    def settings(total, qat):
        return {"total_steps": total, "qat_steps": qat, "smoke": False}

    header = {"date": "2026-12-06", "commit": "abc", "device": "cpu", "command": "python bench/qat.py"}
    rows = [
        {"pipeline": "full_precision", "w_bits": 32, "a_bits": 32, "accuracy": 85.0},
        {"pipeline": "percentile", "w_bits": 4, "a_bits": 4, "accuracy": 78.0, "val_accuracy": 78.0},
    ]
    records = []
    for (total, qat), accuracy in (((250, 125), 80.0), ((500, 375), 84.0)):
        common = {"seed": 0, "cd": "none", "settings": settings(total, qat), **header}
        records.append(
            {"kind": "float", "fp_accuracy": 85.0, "rows": rows, "train_s": 10.0, "steps": total, **common}
        )
        records.append({"kind": "qat", "bits": "W4A4", "qat_distill": 0.0, "accuracy": accuracy, "train_s": 10.0,
                        "steps": qat, "curve": [{"step": qat, "accuracy": accuracy}], **common})  # fmt: skip
    records.append({**records[-1], "seed": 1})  # a second seed on the long schedule: the plot shows that one
    args = qat_bench.parse_args(["--report", "--results-dir", str(tmp_path)])
    text = qat_bench.report(args, records)
    assert "| none | W4A4 | 125 / 250 | 1 |" in text and "80.00 (0)" in text
    assert (
        "| none | W4A4 | 375 / 500 | 1 |" in text and "84.00 (0)" in text
    )  # seed 1 has no float run of its own
    assert "82.00" not in text  # never the mean of the two schedules
    assert "Plot (375 QAT steps of 500)" in text and (tmp_path / "qat.png").is_file()


def test_runs_with_other_settings_never_share_a_folder(qat_bench):
    base = qat_bench.parse_args([])
    longer = qat_bench.parse_args(["--total-steps", "500", "--qat-steps", "375"])
    other_cd = qat_bench.parse_args(["--cd-flags", "--cd_strength 100"])
    assert qat_bench.folder_tag(base, "cd") == qat_bench.folder_tag(qat_bench.parse_args([]), "cd")
    assert qat_bench.folder_tag(base, "none") != qat_bench.folder_tag(longer, "none")  # the QAT-of-125 clash
    assert qat_bench.folder_tag(base, "cd") != qat_bench.folder_tag(other_cd, "cd")
    assert qat_bench.folder_tag(base, "none") == qat_bench.folder_tag(
        other_cd, "none"
    )  # CD flags: cd arm only
    assert qat_bench.folder_tag(base, "none", "percentile") != qat_bench.folder_tag(base, "none", "minmax")


def test_a_fully_recorded_seed_is_skipped_without_training(qat_bench, tmp_path, monkeypatch):
    args = ["--seeds", "0", "--cd", "none", "--bits", "W4A4", "--results-dir", str(tmp_path), "--allow-dirty"]
    parsed = qat_bench.parse_args(args)
    recorded = [
        qat_bench.float_record(parsed, 0, "none"),
        qat_bench.qat_record(parsed, 0, "none", "W4A4", 0.0),
    ]
    monkeypatch.setattr(qat_bench, "load_records", lambda _args: recorded)
    monkeypatch.setattr(qat_bench, "write_report", lambda _args: tmp_path / "qat.md")

    def no_training(*_args, **_kwargs):
        raise AssertionError("a recorded run was trained again")

    monkeypatch.setattr(qat_bench, "float_run", no_training)
    monkeypatch.setattr(qat_bench, "qat_run", no_training)
    qat_bench.main(args)
    recorded.pop()  # the QAT run missing: now the float folder is needed
    with pytest.raises(AssertionError, match="trained again"):
        qat_bench.main(args)
