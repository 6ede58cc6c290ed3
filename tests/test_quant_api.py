"""`quantize` / `evaluate_quantized`: float reproduction, every site quantized, the input model untouched,
data in every accepted form, the result rows, and errors that name the problem."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    DeiTConfig,
    DeiTForImageClassification,
    DeiTForImageClassificationWithTeacher,
    Dinov2ForImageClassification,
    ViTForImageClassification,
)

from conftest import accuracy, tiny_dinov2_config, tiny_vit_config
from hf_cd.architectures import UnsupportedArchitectureError
from hf_cd.quant import (
    FULL_PRECISION,
    PIPELINES,
    RESULT_COLUMNS,
    BaseQuantConfig,
    CalibrationDataError,
    UnknownPipelineError,
    available_pipelines,
    evaluate_quantized,
    parse_quant_spec,
    quantization_state,
    quantize,
    register_pipeline,
)
from hf_cd.quant.pipelines import MinMaxPipeline

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

FLOAT = dict(w_bits=16, a_bits=16, embedding_bits=16, classifier_bits=16)


def tiny_deit_config(**overrides) -> DeiTConfig:
    kwargs = tiny_vit_config().to_dict()
    kwargs = {
        k: kwargs[k]
        for k in (
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "intermediate_size",
            "image_size",
            "patch_size",
            "num_channels",
        )
    }
    kwargs.update(num_labels=10, **overrides)
    return DeiTConfig(**kwargs)


MODELS = {
    "vit": lambda: ViTForImageClassification(tiny_vit_config()),
    "dinov2": lambda: Dinov2ForImageClassification(tiny_dinov2_config()),
    "dinov2-swiglu": lambda: Dinov2ForImageClassification(tiny_dinov2_config(use_swiglu_ffn=True)),
    "deit": lambda: DeiTForImageClassification(tiny_deit_config()),
    "deit-teacher": lambda: DeiTForImageClassificationWithTeacher(tiny_deit_config()),
}


def _model(name: str = "vit") -> nn.Module:
    torch.manual_seed(0)
    return MODELS[name]().eval()


def _images(count: int = 24, seed: int = 1) -> torch.Tensor:
    return torch.randn(count, 1, 28, 28, generator=torch.Generator().manual_seed(seed))


def _labelled(count: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    return _images(count, seed=2), torch.randint(0, 10, (count,), generator=torch.Generator().manual_seed(3))


def _config(pipeline: str = "repq", **changes) -> BaseQuantConfig:
    """The typed config of ``pipeline`` without progress bars (also the shared settings of `evaluate_quantized`)."""
    return parse_quant_spec(pipeline, progress=False, **changes)


def _relative_error(output: torch.Tensor, reference: torch.Tensor) -> float:
    return ((output - reference).norm() / reference.norm()).item()


@torch.no_grad()
@pytest.mark.parametrize("name", list(MODELS))
def test_bits_of_16_or_more_reproduce_full_precision_logits(name):
    model, x = _model(name), _images()
    reference = model(pixel_values=x).logits
    for pipeline in available_pipelines(runtime="fake_quant"):
        quantized = quantize(model, _config(pipeline=pipeline, **FLOAT), x)
        assert _relative_error(quantized(pixel_values=x).logits, reference) <= 1e-5, pipeline
    quantized = quantize(
        model, _config(w_bits=32, a_bits=24, embedding_bits=16, classifier_bits=20)
    )  # no data needed
    assert _relative_error(quantized(pixel_values=x).logits, reference) <= 1e-5


@torch.no_grad()
@pytest.mark.parametrize(
    ("name", "pipeline"),
    [("vit", pipeline) for pipeline in ("minmax", "percentile", "repq", "per_tensor")]
    + [(name, "repq") for name in ("dinov2", "dinov2-swiglu", "deit", "deit-teacher")]
    + [("deit-teacher", "per_tensor"), ("dinov2-swiglu", "minmax")],
)
def test_every_site_is_calibrated_and_quantized(name, pipeline):
    model, x = _model(name), _images()
    quantized = quantize(model, _config(pipeline=pipeline, w_bits=4, a_bits=4), x)
    state = quantization_state(quantized)
    roles = {site.role for site in state.activations}
    assert {"query", "key", "value", "attention_probs", "attention_input", "ffn_input", "ffn_hidden"} <= roles
    assert {"patch_embedding_input", "classifier_input", "attention_output"} <= roles
    assert all(site.quantizer.mode == "quantize" for site in state.activations)
    expected_heads = 2 if name == "deit-teacher" else 1
    assert sum(site.role == "classifier_input" for site in state.activations) == expected_heads
    probs = [s.quantizer.scheme for s in state.activations if s.role == "attention_probs"]
    assert set(probs) == (
        {"log_sqrt2"} if pipeline == "repq" else {"symmetric" if pipeline == "per_tensor" else "asymmetric"}
    )
    # Weights really are on a 4-bit grid: at most 2^4 distinct values per output channel (the
    # asymmetric grid of repq and percentile), 2^4 − 1 for the symmetric narrow range of the others.
    linear = state.blocks[0].value
    assert max(row.unique().numel() for row in linear.weight) <= (
        16 if pipeline in ("repq", "percentile") else 15
    )
    assert state.num_calibration == x.shape[0]
    reference, output = model(pixel_values=x).logits, quantized(pixel_values=x).logits
    assert torch.isfinite(output).all()
    assert 0 < _relative_error(output, reference) < 1


@torch.no_grad()
@pytest.mark.parametrize(
    ("w_bits", "a_bits", "pipeline"),
    [
        (2, 2, "minmax"),
        (2, 8, "repq"),
        (8, 2, "percentile"),
        (3, 5, "per_tensor"),
        (7, 3, "repq"),
        (5, 6, "minmax"),
    ],
)
def test_any_bit_combination_runs(w_bits, a_bits, pipeline):
    model, x = _model(), _images()
    quantized = quantize(model, _config(pipeline=pipeline, w_bits=w_bits, a_bits=a_bits), x)
    state = quantization_state(quantized)
    assert {site.bits for site in state.activations if site.block is not None} == {a_bits}
    assert {site.bits for site in state.weights if site.block is not None} == {w_bits}
    assert torch.isfinite(quantized(pixel_values=x).logits).all()


def _snapshot(model: nn.Module) -> dict:
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "attention": model.config._attn_implementation,
        "hooks": [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()],
        "modules": [name for name, _ in model.named_modules()],
        "training": [m.training for m in model.modules()],
    }


def _assert_unchanged(model: nn.Module, before: dict) -> None:
    after = _snapshot(model)
    assert after["state"].keys() == before["state"].keys()
    for key, value in before["state"].items():
        assert torch.equal(after["state"][key], value), key
    assert after["attention"] == before["attention"]
    assert after["hooks"] == before["hooks"]
    assert after["modules"] == before["modules"]
    assert after["training"] == before["training"]
    assert not hasattr(model, "hf_cd_quant")


def test_the_input_model_is_unchanged_by_quantize_and_evaluate_quantized():
    model, x = _model("dinov2-swiglu"), _images()
    model.train()  # its mode must survive too
    model.dinov2.encoder.eval()
    before = _snapshot(model)
    for pipeline in available_pipelines(runtime="fake_quant"):
        quantize(model, _config(pipeline=pipeline, w_bits=4, a_bits=4), x)
        _assert_unchanged(model, before)
    evaluate_quantized(model, _labelled(), x, bits=((4, 4),), config=_config())
    _assert_unchanged(model, before)


def test_evaluate_quantized_rows_and_views():
    model, (x, y) = _model(), _labelled()
    table = evaluate_quantized(
        model,
        (x, y),
        _images(),
        pipelines=("minmax", "repq"),
        bits=((8, 8), (4, 4)),
        config=_config(batch_size=16),
    )
    assert [(r["pipeline"], r["w_bits"], r["a_bits"]) for r in table] == [
        (FULL_PRECISION, 32, 32),
        ("minmax", 8, 8),
        ("minmax", 4, 4),
        ("repq", 8, 8),
        ("repq", 4, 4),
    ]
    rows = table.to_dicts()
    assert all(list(row)[: len(RESULT_COLUMNS)] == list(RESULT_COLUMNS) for row in rows)
    assert [row.get("config") for row in rows] == [None, "minmax", "minmax", "repq", "repq"]
    json.dumps(rows)
    assert table.full_precision_accuracy == accuracy(model, x, y)
    assert table.accuracy("minmax", 4, 4) == accuracy(
        quantize(model, _config(pipeline="minmax", w_bits=4, a_bits=4), _images()), x, y
    )
    assert all(row["num_eval"] == x.shape[0] for row in rows)
    assert [row["num_calibration"] for row in rows] == [0, 24, 24, 24, 24]
    assert all(row["accuracy_drop"] == pytest.approx(rows[0]["accuracy"] - row["accuracy"]) for row in rows)
    assert {row["runtime"] for row in rows[1:]} == {"fake_quant"}
    assert len(table.to_markdown().splitlines()) == 2 + len(rows)
    assert list(table.to_pandas().columns) == [*RESULT_COLUMNS, "config"]


def test_data_in_every_accepted_form_gives_the_same_numbers():
    import datasets

    model, (x, y) = _model(), _labelled(30)
    calib = _images(10)
    config = _config(pipeline="minmax", w_bits=4, a_bits=4, num_calibration=10, batch_size=7)
    reference = quantize(model, config, calib)(pixel_values=x).logits
    dataset = datasets.Dataset.from_dict({"pixel_values": calib.numpy(), "labels": [0] * 10}).with_format(
        "torch"
    )
    forms = {
        "tuple": (calib, torch.zeros(10, dtype=torch.long)),
        "dict": {"pixel_values": calib},
        "dataloader": DataLoader(TensorDataset(calib, torch.zeros(10)), batch_size=4),
        "dict batches": [
            {"pixel_values": calib[i : i + 3], "labels": torch.zeros(calib[i : i + 3].shape[0])}
            for i in range(0, 10, 3)
        ],
        "datasets.Dataset": dataset,
    }
    for form, data in forms.items():
        output = quantize(model, config, data)(pixel_values=x).logits
        torch.testing.assert_close(output, reference, rtol=1e-5, atol=1e-6, msg=form)

    expected = evaluate_quantized(model, (x, y), calib, pipelines=("minmax",), bits=((4, 4),), config=config)
    eval_dataset = datasets.Dataset.from_dict({"pixel_values": x.numpy(), "labels": y.numpy()}).with_format(
        "torch"
    )
    eval_forms = {
        "datasets.Dataset": eval_dataset,
        "dataloader": DataLoader(
            eval_dataset,
            batch_size=8,
            collate_fn=lambda rows: {
                "pixel_values": torch.stack([r["pixel_values"] for r in rows]),
                "labels": torch.stack([r["labels"] for r in rows]),
            },
        ),
        "tuples": DataLoader(TensorDataset(x, y), batch_size=9),
    }
    for form, data in eval_forms.items():
        table = evaluate_quantized(model, data, calib, pipelines=("minmax",), bits=((4, 4),), config=config)
        assert [r["accuracy"] for r in table] == [r["accuracy"] for r in expected], form
        assert [r["num_eval"] for r in table] == [x.shape[0]] * 2, form


def test_calibration_draw_is_seeded():
    model, x, calib = _model(), _images(), _images(64)
    config = _config(pipeline="percentile", w_bits=4, a_bits=4, num_calibration=8)
    first = quantize(model, config, calib)(pixel_values=x).logits
    again = quantize(model, config, calib)(pixel_values=x).logits
    other = quantize(model, config.replace(seed=1), calib)(pixel_values=x).logits
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_a_registered_pipeline_produces_rows_in_the_same_format():
    class Clipped(MinMaxPipeline):
        name = "test_clipped"
        runtime = "test_runtime"

    register_pipeline(Clipped())
    try:
        assert "test_clipped" in available_pipelines()
        with pytest.raises(ValueError, match="already registered"):
            register_pipeline(Clipped())
        table = evaluate_quantized(
            _model(), _labelled(), _images(), pipelines=("test_clipped",), bits=((6, 6),), config=_config()
        )
        assert table[1]["pipeline"] == "test_clipped" and table[1]["runtime"] == "test_runtime"
        assert list(table.to_dicts()[1]) == [*RESULT_COLUMNS, "config"]
    finally:
        PIPELINES.pop("test_clipped")


@pytest.mark.parametrize("bits", [1, 0, 9, 15, -4, 4.0, True, "8"])
def test_bits_out_of_range_are_rejected_with_the_fix(bits):
    with pytest.raises((ValueError, TypeError), match=r"2..8|≥ 16"):
        BaseQuantConfig(w_bits=bits)
    with pytest.raises((ValueError, TypeError), match="a_bits"):
        BaseQuantConfig(a_bits=bits)
    with pytest.raises((ValueError, TypeError), match="embedding_bits"):
        BaseQuantConfig(embedding_bits=bits)


def test_unknown_pipeline_lists_the_known_ones():
    with pytest.raises(UnknownPipelineError, match=r"'repqq'.*minmax, .*per_tensor, percentile, repq"):
        parse_quant_spec("repqq")
    with pytest.raises(UnknownPipelineError, match="minmax"):
        evaluate_quantized(_model(), _labelled(), _images(), pipelines=("nope",), config=_config())


def test_a_model_without_supported_layers_is_rejected():
    with pytest.raises(UnsupportedArchitectureError, match=r"no supported layers.*Sequential"):
        quantize(nn.Sequential(nn.Linear(4, 4)), _config(), torch.randn(2, 4))
    bert = BertForSequenceClassification(
        BertConfig(
            hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16, vocab_size=50
        )
    )
    with pytest.raises(UnsupportedArchitectureError, match=r"no supported layers.*bert"):
        quantize(bert, _config(), _images())
    quantized = quantize(_model(), _config(**FLOAT))
    with pytest.raises(ValueError, match="already a fake-quantized copy"):
        quantize(quantized, _config(), _images())


def test_empty_or_missing_calibration_data_is_rejected():
    import datasets

    model = _model()
    empty = [
        torch.empty(0, 1, 28, 28),
        [],
        datasets.Dataset.from_dict({"pixel_values": [], "labels": []}),
        {"pixel_values": torch.empty(0, 1, 28, 28)},
    ]
    for data in empty:
        with pytest.raises(CalibrationDataError, match="empty"):
            quantize(model, _config(), data)
    with pytest.raises(ValueError, match="needs calibration data"):
        quantize(model, _config())
    with pytest.raises(CalibrationDataError, match="no 'pixel_values'"):
        quantize(model, _config(), [{"image": torch.zeros(1, 1, 28, 28)}])


def test_bad_evaluation_data_is_rejected():
    model = _model()
    with pytest.raises(CalibrationDataError, match="needs labels"):
        evaluate_quantized(model, _images(), _images(), bits=((8, 8),), config=_config())
    with pytest.raises(CalibrationDataError, match="one-shot iterator"):
        evaluate_quantized(model, iter([_labelled()]), _images(), bits=((8, 8),), config=_config())


@torch.no_grad()
def test_sequential_calibration_sees_the_quantized_blocks_before():
    model, x = _model(), _images()
    config = _config(pipeline="minmax", w_bits=3, a_bits=3)
    sequential = quantization_state(quantize(model, config, x))
    at_once = quantization_state(quantize(model, config.replace(sequential=False), x))
    first = [s.quantizer.scale for s in sequential.activations]
    second = [s.quantizer.scale for s in at_once.activations]
    assert torch.equal(first[0], second[0])  # the patch-embedding input: nothing quantized before it
    assert any(not torch.equal(a, b) for a, b in zip(first, second))  # later sites see quantized inputs
