"""GPTQ / GPTAQ / MARR on the tiny ViT trained on the real Fashion-MNIST (slow: trains once per session)."""

from __future__ import annotations

import statistics

import pytest
import torch

from hf_cd.quant import RESULT_COLUMNS, BaseQuantConfig, evaluate_quantized, parse_quant_spec, quantize
from hf_cd.quant.reconstruction_errors import measure_reconstruction_errors

pytestmark = pytest.mark.slow

NUM_EVAL = 2000


def test_w4a4_reconstruction_pipelines_run_end_to_end(
    trained_tiny_vit, fashion_mnist_tensors, one_cpu_thread
):
    x, y = fashion_mnist_tensors["test"]
    before = {k: v.clone() for k, v in trained_tiny_vit.state_dict().items()}
    table = evaluate_quantized(
        trained_tiny_vit,
        (x[:NUM_EVAL], y[:NUM_EVAL]),
        fashion_mnist_tensors["train"][0],
        pipelines=("gptq", "gptaq", "marr"),
        bits=((4, 4),),
        config=BaseQuantConfig(progress=False, batch_size=250),
    )
    assert table.columns == [*RESULT_COLUMNS, "config"]
    assert [(r["pipeline"], r["w_bits"], r["a_bits"]) for r in table][1:] == [
        ("gptq", 4, 4),
        ("gptaq", 4, 4),
        ("marr", 4, 4),
    ]
    for row in table.rows[1:]:
        assert row["runtime"] == "fake_quant" and row["num_calibration"] == 32 and row["num_eval"] == NUM_EVAL
        # A working W4A4 copy of an ≈84% model stays far above chance (10%) and near full precision.
        assert row["accuracy_drop"] <= 3.0, row
    assert all(torch.equal(v, before[k]) for k, v in trained_tiny_vit.state_dict().items())


def test_gptq_and_gptaq_reconstruct_held_out_images_better_than_round_to_nearest(
    trained_tiny_vit, fashion_mnist_tensors, one_cpu_thread
):
    """The point of solving for the weights: each layer's output on unseen images is closer to float."""
    calibration, held_out = fashion_mnist_tensors["train"][0], fashion_mnist_tensors["test"][0][-256:]

    def mean_error(pipeline: str) -> float:
        config = parse_quant_spec(pipeline, w_bits=3, a_bits=4, progress=False)
        quantized = quantize(trained_tiny_vit, config, calibration)
        return statistics.fmean(
            measure_reconstruction_errors(trained_tiny_vit, quantized, held_out).column("error")
        )

    rtn, gptq, gptaq = mean_error("percentile"), mean_error("gptq"), mean_error("gptaq")
    assert gptq < 0.9 * rtn, (gptq, rtn)
    assert gptaq < gptq, (gptaq, gptq)
