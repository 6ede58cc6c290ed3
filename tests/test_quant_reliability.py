"""hf_cd.quant on bad images and interrupted evaluations: clear errors first, nothing finished lost."""

from __future__ import annotations

import json
import logging
import warnings

import pytest
import torch
from transformers import Dinov2ForImageClassification, ViTForImageClassification

from conftest import tiny_dinov2_config, tiny_vit_config
from hf_cd import quant
from hf_cd.quant.inputs import CalibrationDataError, UnnormalizedImagesWarning

CONFIG = quant.RepQConfig(progress=False, num_calibration=8, batch_size=16)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return ViTForImageClassification(tiny_vit_config()).eval()


@pytest.fixture(scope="module")
def data():
    generator = torch.Generator().manual_seed(0)
    return torch.randn(24, 1, 28, 28, generator=generator), torch.randint(0, 10, (24,), generator=generator)


# --- images -------------------------------------------------------------------------------------


def test_integer_pixels_are_refused_with_the_image_processor_as_the_fix(model, data):
    raw = torch.randint(0, 256, (8, 1, 28, 28), dtype=torch.uint8)
    with pytest.raises(CalibrationDataError, match=r"uint8 pixels.*image processor"):
        quant.quantize(model, CONFIG, raw)
    with pytest.raises(CalibrationDataError, match="Evaluation images are uint8"):
        quant.evaluate_quantized(model, (raw, data[1][:8]), data[0], pipelines=["minmax"], config=CONFIG)


def test_values_far_outside_a_normalized_range_warn(model, data):
    with pytest.warns(UnnormalizedImagesWarning, match="0–255 pixels"):
        quant.quantize(model, CONFIG, torch.randint(0, 256, (8, 1, 28, 28)).float())
    with pytest.warns(UnnormalizedImagesWarning, match=r"all lie in \[0, 1\]"):
        quant.quantize(model, CONFIG, torch.rand(8, 1, 28, 28))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnnormalizedImagesWarning)
        quant.quantize(model, CONFIG, data[0])  # normalized images: no warning


@pytest.mark.parametrize(
    "shape, needle",
    [
        (
            (4, 3, 28, 28),
            r"expects channels-first images \(batch, 1, 28, 28\).*convert the images to grayscale",
        ),
        (
            (4, 28, 28, 1),
            r"\(batch, 1, 28, 28\).*channels-last \(NHWC\): pass pixel_values.permute\(0, 3, 1, 2\)",
        ),
        ((4, 1, 32, 32), r"expects \(batch, 1, 28, 28\) \(config.image_size=28\)"),
    ],
)
def test_a_wrong_layout_or_size_names_the_expected_one_before_transformers_runs(model, shape, needle):
    with pytest.raises(CalibrationDataError, match=needle):
        quant.quantize(model, CONFIG, torch.randn(*shape))


def test_a_model_that_resamples_its_position_embeddings_takes_other_sizes():
    torch.manual_seed(0)
    dinov2 = Dinov2ForImageClassification(tiny_dinov2_config()).eval()
    quant.quantize(dinov2, CONFIG, torch.randn(4, 1, 42, 42))  # no size error: Dinov2 interpolates
    with pytest.raises(CalibrationDataError, match=r"\(batch, 1, height, width\)"):
        quant.quantize(dinov2, CONFIG, torch.randn(4, 42, 42, 1))


# --- arguments ----------------------------------------------------------------------------------


def test_one_pipeline_name_and_w4a4_labels_are_accepted(model, data):
    table = quant.evaluate_quantized(
        model, data, data[0], pipelines="minmax", bits=["W4A4", (8, 8)], config=CONFIG
    )
    assert [(r["pipeline"], r["w_bits"], r["a_bits"]) for r in table.rows[1:]] == [
        ("minmax", 4, 4),
        ("minmax", 8, 8),
    ]
    single = quant.evaluate_quantized(model, data, data[0], pipelines="minmax", bits="W8A8", config=CONFIG)
    assert single.accuracy("minmax", 8, 8) == table.accuracy("minmax", 8, 8)
    with pytest.raises(ValueError, match=r"'W4' is not a bits entry.*WxAy"):
        quant.evaluate_quantized(model, data, data[0], pipelines="minmax", bits=["W4"], config=CONFIG)


# --- an evaluation that keeps what it finished -----------------------------------------------------


class Interrupted(KeyboardInterrupt):
    pass


def _interrupt_after(rows_wanted: int):
    def on_row(rows):
        if len(rows) >= rows_wanted:
            raise Interrupted

    return on_row


def test_an_interrupted_evaluation_keeps_its_rows_and_the_rerun_skips_them(model, data, tmp_path, caplog):
    pipelines, bits = ["minmax", "per_tensor"], ["W8A8", "W4A4"]
    straight = quant.evaluate_quantized(model, data, data[0], pipelines=pipelines, bits=bits, config=CONFIG)

    path = tmp_path / "rows.json"
    with pytest.raises(Interrupted):  # Ctrl-C after the full-precision row and two quantized rows
        quant.evaluate_quantized(
            model, data, data[0], pipelines, bits, CONFIG, results_file=path, on_row=_interrupt_after(3)
        )
    kept = json.loads(path.read_text())["rows"]
    assert [(r["pipeline"], r["w_bits"]) for r in kept] == [
        ("full_precision", 32),
        ("minmax", 8),
        ("minmax", 4),
    ]

    with caplog.at_level(logging.INFO, logger="hf_cd.quant.evaluate"):
        resumed = quant.evaluate_quantized(model, data, data[0], pipelines, bits, CONFIG, results_file=path)
    assert resumed.num_reused == 2
    assert "2 of 4 rows reused" in caplog.text
    assert [r["accuracy"] for r in resumed.rows] == [r["accuracy"] for r in straight.rows]
    assert len(json.loads(path.read_text())["rows"]) == 5

    again = quant.evaluate_quantized(model, data, data[0], pipelines, bits, CONFIG, results_file=path)
    assert again.num_reused == 4


def test_rows_are_reused_only_for_the_same_model_settings_and_data(model, data, tmp_path):
    path = tmp_path / "rows.json"
    quant.evaluate_quantized(model, data, data[0], "minmax", ["W8A8"], CONFIG, results_file=path)

    def reused(**changes) -> int:
        args = {"model": model, "eval_data": data, "calib_data": data[0], "config": CONFIG, **changes}
        probe = tmp_path / "probe.json"
        probe.write_text(path.read_text())
        return quant.evaluate_quantized(
            args["model"],
            args["eval_data"],
            args["calib_data"],
            "minmax",
            ["W8A8"],
            args["config"],
            results_file=probe,
        ).num_reused

    assert reused() == 1
    other_model = ViTForImageClassification(tiny_vit_config()).eval()
    assert reused(model=other_model) == 0
    assert reused(config=CONFIG.replace(num_calibration=4)) == 0
    assert reused(eval_data=(data[0][:16], data[1][:16])) == 0
    assert reused(calib_data=data[0].flip(0)) == 0
