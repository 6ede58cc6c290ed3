"""Post-training quantization of the tiny ViT trained on the real Fashion-MNIST (slow: trains once per session)."""

from __future__ import annotations

import pytest
import torch

from conftest import accuracy
from hf_cd.quant import BaseQuantConfig, evaluate_quantized, parse_quant_spec, quantization_state, quantize

pytestmark = pytest.mark.slow

NUM_EVAL = 5000


@pytest.fixture(scope="module")
def ptq_table(trained_tiny_vit, fashion_mnist_tensors, one_cpu_thread):
    x, y = fashion_mnist_tensors["test"]
    return evaluate_quantized(
        trained_tiny_vit,
        (x[:NUM_EVAL], y[:NUM_EVAL]),
        fashion_mnist_tensors["train"][0],
        pipelines=("minmax", "per_tensor"),
        bits=((8, 8), (4, 4)),
        config=BaseQuantConfig(progress=False, batch_size=500),
    )


def test_full_precision_row_is_the_model_accuracy(ptq_table, trained_tiny_vit, fashion_mnist_tensors):
    x, y = fashion_mnist_tensors["test"]
    assert ptq_table.full_precision_accuracy == accuracy(trained_tiny_vit, x[:NUM_EVAL], y[:NUM_EVAL])
    assert all(row["num_eval"] == NUM_EVAL for row in ptq_table)


def test_w8a8_minmax_is_within_one_point_of_full_precision(ptq_table):
    assert abs(ptq_table.accuracy("minmax", 8, 8) - ptq_table.full_precision_accuracy) <= 1.0


def test_w4a4_per_tensor_falls_below_w8a8(ptq_table):
    w4a4 = ptq_table.accuracy("per_tensor", 4, 4)
    assert w4a4 < ptq_table.accuracy("per_tensor", 8, 8)
    assert w4a4 < ptq_table.accuracy("minmax", 8, 8)


@torch.no_grad()
def test_calibration_is_deterministic_for_a_fixed_seed(
    trained_tiny_vit, fashion_mnist_tensors, one_cpu_thread
):
    train_images = fashion_mnist_tensors["train"][0]
    x = fashion_mnist_tensors["test"][0][:256]
    config = parse_quant_spec("repq", w_bits=4, a_bits=4, progress=False, batch_size=8)
    runs = [quantize(trained_tiny_vit, config, train_images) for _ in range(2)]
    other_seed = quantize(trained_tiny_vit, config.replace(seed=1), train_images)

    def scales(model):
        return [site.quantizer.scale for site in quantization_state(model).activations]

    for first, second in zip(scales(runs[0]), scales(runs[1])):
        assert torch.equal(first, second)
    assert torch.equal(runs[0](pixel_values=x).logits, runs[1](pixel_values=x).logits)
    assert any(not torch.equal(a, b) for a, b in zip(scales(runs[0]), scales(other_seed)))
