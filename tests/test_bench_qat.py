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
