"""Real int8 on ONNX Runtime for the tiny ViT trained on the real Fashion-MNIST (slow: trains once per session)."""

from __future__ import annotations

import pytest
import torch

from hf_cd.export import export_model
from hf_cd.quant import BaseQuantConfig, evaluate_quantized
from hf_cd.quant.runtimes import OnnxRuntimeInt8Config
from hf_cd.quant.runtimes.onnx_export import ort_session

pytestmark = pytest.mark.slow

NUM_EVAL = 5000
MAX_INT8_DROP = 1.5


@pytest.fixture(scope="module")
def ort_table(trained_tiny_vit, fashion_mnist_tensors, one_cpu_thread):
    x, y = fashion_mnist_tensors["test"]
    settings = OnnxRuntimeInt8Config(num_threads=1, latency_runs=15, latency_warmup=3)
    return evaluate_quantized(
        trained_tiny_vit,
        (x[:NUM_EVAL], y[:NUM_EVAL]),
        fashion_mnist_tensors["train"][0],
        pipelines=("minmax", "onnxruntime-int8"),
        bits=((8, 8),),
        config=BaseQuantConfig(progress=False, batch_size=500),
        extra={"onnxruntime": settings},
    )


def test_onnxruntime_int8_is_within_1_5_points_of_float(ort_table):
    row = ort_table.where(pipeline="onnxruntime-int8")[0]
    assert row["runtime"] == "onnxruntime" and (row["w_bits"], row["a_bits"]) == (8, 8)
    assert row["num_eval"] == NUM_EVAL and row["num_calibration"] == 32
    assert abs(row["accuracy"] - ort_table.full_precision_accuracy) <= MAX_INT8_DROP
    assert row["accuracy_drop"] == pytest.approx(ort_table.full_precision_accuracy - row["accuracy"])


def test_onnxruntime_float_model_is_the_pytorch_model(ort_table):
    row = ort_table.where(pipeline="onnxruntime-int8")[0]
    # float32 ONNX vs PyTorch differ by ~1e-7 in the logits: at most a tie flips
    assert abs(row["float_accuracy"] - ort_table.full_precision_accuracy) <= 0.1


def test_latency_columns_are_measured_and_consistent(ort_table):
    row = ort_table.where(pipeline="onnxruntime-int8")[0]
    for batch in (1, 32):
        assert row[f"latency_ms_batch{batch}"] > 0 and row[f"float_latency_ms_batch{batch}"] > 0
        assert row[f"speedup_vs_float_batch{batch}"] == pytest.approx(
            row[f"float_latency_ms_batch{batch}"] / row[f"latency_ms_batch{batch}"], rel=1e-3
        )
    assert row["speedup_vs_float"] == row["speedup_vs_float_batch32"]
    assert row["num_threads"] == 1
    simulated = ort_table.where(pipeline="minmax")[0]
    assert "latency_ms_batch1" not in simulated  # fake-quant rows keep the shared format


def test_exported_int8_file_runs_standalone(
    trained_tiny_vit, fashion_mnist_tensors, tmp_path, one_cpu_thread
):
    x, y = fashion_mnist_tensors["test"]
    path = export_model(
        trained_tiny_vit,
        tmp_path / "vit-int8.onnx",
        int8=True,
        calib_data=fashion_mnist_tensors["train"][0],
        config=OnnxRuntimeInt8Config(calibration_method="percentile"),
    )
    session = ort_session(path, 1)
    assert {"QuantizeLinear", "DequantizeLinear"} <= {node.op_type for node in _graph_nodes(path)}
    logits = session.run(["logits"], {"pixel_values": x[:NUM_EVAL].numpy()})[0]
    int8_accuracy = 100.0 * (torch.from_numpy(logits).argmax(-1) == y[:NUM_EVAL]).float().mean().item()
    with torch.no_grad():
        float_logits = trained_tiny_vit(pixel_values=x[:NUM_EVAL]).logits
    float_accuracy = 100.0 * (float_logits.argmax(-1) == y[:NUM_EVAL]).float().mean().item()
    assert abs(int8_accuracy - float_accuracy) <= MAX_INT8_DROP


def _graph_nodes(path):
    import onnx

    return onnx.load(str(path)).graph.node
