"""ONNX export and the real-runtime pipelines on tiny random models: parity, errors, and no side effects."""

from __future__ import annotations

import sys
import types

import pytest
import torch
from transformers import (
    DeiTConfig,
    DeiTForImageClassification,
    Dinov2ForImageClassification,
    ResNetConfig,
    ResNetForImageClassification,
    ViTForImageClassification,
)

from conftest import tiny_dinov2_config, tiny_vit_config
from hf_cd import UnsupportedArchitectureError
from hf_cd.export import export_model, main
from hf_cd.quant import (
    BaseQuantConfig,
    RuntimeUnavailableError,
    evaluate_quantized,
    parse_quant_spec,
    quantize,
)
from hf_cd.quant.inputs import select_calibration_images
from hf_cd.quant.runtimes import (
    OnnxExportError,
    OnnxRuntimeClassifier,
    OnnxRuntimeInt8Config,
    UnsupportedOpError,
    export_onnx,
    onnx_logits_max_abs_diff,
)
from hf_cd.quant.runtimes import onnxruntime_int8 as ort_module

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

PARITY_ATOL = 1e-4


def tiny_deit_config() -> DeiTConfig:
    keys = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
    keys += ("image_size", "patch_size", "num_channels", "num_labels")
    return DeiTConfig(**{key: getattr(tiny_vit_config(), key) for key in keys})


def make_model(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "vit":
        return ViTForImageClassification(tiny_vit_config()).eval()
    if kind == "deit":
        return DeiTForImageClassification(tiny_deit_config()).eval()
    return Dinov2ForImageClassification(tiny_dinov2_config()).eval()


def images(count: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(count, 1, 28, 28, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", ["vit", "deit", "dinov2"])
def test_onnx_runtime_float_logits_match_pytorch(kind, tmp_path):
    model = make_model(kind)
    path = export_onnx(model, tmp_path / f"{kind}.onnx", check_parity=False)
    # batch 1 and batch 5: the batch axis is dynamic, not baked in at the example's size (2)
    difference = onnx_logits_max_abs_diff(model, path, images(5, seed=3))
    assert difference <= PARITY_ATOL
    session = ort_module.ort_session(path, 1)
    assert session.get_inputs()[0].shape[0] != 2  # a symbolic dimension


def _op_types(path) -> set[str]:
    import onnx

    return {node.op_type for node in onnx.load(str(path)).graph.node}


@pytest.mark.parametrize("kind", ["vit", "deit", "dinov2"])
def test_default_export_has_no_softmax_nan_guard_and_one_gelu_op(kind, tmp_path):
    """The graph ORT runs fast: eager attention (no IsNaN + Where after softmax) and opset 20's Gelu."""
    model = make_model(kind)
    assert model.config._attn_implementation == "sdpa"  # the user's model keeps SDPA
    default = export_onnx(model, tmp_path / "default.onnx", parity_images=images(3))
    assert "IsNaN" not in _op_types(default) and "Gelu" in _op_types(default)
    assert not {"Erf", "Div"} & _op_types(default)
    assert model.config._attn_implementation == "sdpa"
    # the former export, for comparison: SDPA decomposed with its NaN guard, GELU through Erf
    former = export_onnx(model, tmp_path / "former.onnx", opset=18, attn_implementation="sdpa")
    assert {"IsNaN", "Erf"} <= _op_types(former) and "Gelu" not in _op_types(former)


def test_export_attention_implementation_is_checked(tmp_path):
    with pytest.raises(ValueError, match="attention_implementation must be one of"):
        OnnxRuntimeInt8Config(attention_implementation="flash")
    with pytest.raises(ValueError, match="attn_implementation must be one of"):
        export_onnx(make_model("vit"), tmp_path / "x.onnx", attn_implementation="flash")


def test_torchscript_exporter_fallback_matches_too(tmp_path):
    model = make_model("vit")
    path = export_onnx(model, tmp_path / "vit-torchscript.onnx", dynamo=False, check_parity=False)
    assert onnx_logits_max_abs_diff(model, path, images(5, seed=4)) <= PARITY_ATOL


def test_parity_check_catches_a_wrong_export(tmp_path):
    model = make_model("vit")
    path = export_onnx(model, tmp_path / "vit.onnx", check_parity=False)
    with torch.no_grad():
        model.classifier.bias.add_(1.0)  # the file no longer matches the model
    assert onnx_logits_max_abs_diff(model, path, images(3)) > 0.5


def _state(model: torch.nn.Module) -> dict:
    return {
        "weights": {k: v.clone() for k, v in model.state_dict().items()},
        "training": {name: m.training for name, m in model.named_modules()},
        "requires_grad": {k: p.requires_grad for k, p in model.named_parameters()},
        "attention": model.config._attn_implementation,
        "dtype": next(model.parameters()).dtype,
    }


def test_the_users_model_is_unchanged_by_export_and_int8(tmp_path):
    model = make_model("vit").train()
    model.vit.embeddings.patch_embeddings.projection.weight.requires_grad_(False)
    before = _state(model)
    export_onnx(model, tmp_path / "float.onnx")
    config = parse_quant_spec("onnxruntime-int8", progress=False)
    int8 = quantize(model, config, images(32))
    after = _state(model)
    assert before["weights"].keys() == after["weights"].keys()
    assert all(torch.equal(before["weights"][k], after["weights"][k]) for k in before["weights"])
    assert before["training"] == after["training"]
    assert all(after["training"].values())
    assert before["requires_grad"] == after["requires_grad"]
    assert (before["attention"], before["dtype"]) == (after["attention"], after["dtype"])
    assert isinstance(int8, OnnxRuntimeClassifier)
    assert int8(pixel_values=images(4)).logits.shape == (4, 10)


def test_int8_pipeline_calibrates_on_the_fake_quant_images(monkeypatch):
    model = make_model("vit")
    calibration_pool, seen = images(100, seed=7), []
    original = ort_module.quantize_onnx_int8

    def spy(float_path, output_path, calibration_images, *args, **kwargs):
        seen.append(calibration_images.clone())
        return original(float_path, output_path, calibration_images, *args, **kwargs)

    monkeypatch.setattr(ort_module, "quantize_onnx_int8", spy)
    config = BaseQuantConfig(progress=False, num_calibration=16, seed=3)
    table = evaluate_quantized(
        model,
        (images(40, 1), torch.arange(40) % 10),
        calibration_pool,
        ("onnxruntime-int8",),
        ((8, 8),),
        config,
        extra={"onnxruntime": {"latency_runs": 2}},
    )
    assert len(seen) == 1
    assert torch.equal(seen[0], select_calibration_images(calibration_pool, 16, 3))
    row = table[1]
    assert row["runtime"] == "onnxruntime" and row["num_calibration"] == 16
    assert {"latency_ms_batch1", "latency_ms_batch32", "speedup_vs_float", "float_accuracy"} <= set(row)
    assert row["speedup_vs_float"] == pytest.approx(
        row["float_latency_ms_batch32"] / row["latency_ms_batch32"], rel=1e-3
    )
    assert "latency_ms_batch32" in table.to_markdown()


def _inputs_by_producer(path) -> list[tuple[str, list[str]]]:
    """``(op_type, [producer op type of each input])`` per node; initializers count as ``const``."""
    import onnx

    graph = onnx.load(str(path)).graph
    producer = {output: node.op_type for node in graph.node for output in node.output}
    constants = {initializer.name for initializer in graph.initializer}
    return [
        (node.op_type, [producer.get(name, "const" if name in constants else "input") for name in node.input])
        for node in graph.node
    ]


def test_int8_graph_keeps_norms_softmax_gelu_and_attention_float(tmp_path):
    model = make_model("vit")
    float_path = export_onnx(model, tmp_path / "float.onnx")
    qdq_only = OnnxRuntimeInt8Config(fuse_linear_bias=False)  # the QDQ graph before our bias pass
    default = ort_module.quantize_onnx_int8(float_path, tmp_path / "int8.onnx", images(16), qdq_only)
    nodes = _inputs_by_producer(default)
    for op_type, sources in nodes:
        if op_type in ("LayerNormalization", "Softmax", "Erf", "Gelu"):
            assert "DequantizeLinear" not in sources, op_type
    linears = [s for t, s in nodes if t in ("MatMul", "Gemm", "Conv") and s[0] == "DequantizeLinear"]
    attention = [s for t, s in nodes if t == "MatMul" and "DequantizeLinear" not in s]
    assert len(linears) == 6 * 2 + 2  # q k v o fc1 fc2 per block, the patch embedding, the classifier
    assert len(attention) == 2 * 2  # Q·Kᵀ and P·V per block stay float

    settings = OnnxRuntimeInt8Config(quantize_attention_matmuls=True)
    other = ort_module.quantize_onnx_int8(
        float_path, tmp_path / "other.onnx", images(16), settings, embedding_bits=16, classifier_bits=16
    )
    nodes = _inputs_by_producer(other)
    assert all("DequantizeLinear" not in s for t, s in nodes if t in ("Conv", "Gemm"))
    assert all(s[0] == "DequantizeLinear" for t, s in nodes if t == "MatMul")


def _optimized_op_counts(path, tmp_path) -> dict[str, int]:
    """Op types of the graph ONNX Runtime really runs after its fusions."""
    import collections

    import onnx
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / f"{path.stem}-optimized.onnx")
    options.log_severity_level = 3
    onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return collections.Counter(n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node)


def test_linear_outputs_stay_float_so_ort_runs_matmul_integer_to_float(tmp_path):
    model = make_model("vit")
    float_path = export_onnx(model, tmp_path / "float.onnx")
    default = ort_module.quantize_onnx_int8(float_path, tmp_path / "int8.onnx", images(16))
    ops = _optimized_op_counts(default, tmp_path)
    assert ops["MatMulIntegerToFloat"] == 6 * 2 and ops["QLinearMatMul"] == 0  # every encoder linear
    assert ops["DequantizeLinear"] < 6 * 2  # no linear output is dequantized again
    settings = OnnxRuntimeInt8Config(quantize_linear_outputs=True)
    placed = ort_module.quantize_onnx_int8(float_path, tmp_path / "placed.onnx", images(16), settings)
    ops = _optimized_op_counts(placed, tmp_path)
    assert ops["QLinearMatMul"] == 6 * 2 and ops["MatMulIntegerToFloat"] == 0
    assert ops["DequantizeLinear"] >= 6 * 2  # each uint8 output goes back to float for the op after it


@pytest.mark.parametrize("kind", ["vit", "deit", "dinov2"])
def test_int8_linears_carry_their_bias_and_keep_the_logits(kind, tmp_path):
    """Our pass: every encoder linear becomes one MatMulIntegerToFloat with its bias; logits unchanged."""
    import onnx

    model = make_model(kind)
    float_path = export_onnx(model, tmp_path / "float.onnx")
    calibration = images(16)
    fused = ort_module.quantize_onnx_int8(float_path, tmp_path / "fused.onnx", calibration)
    qdq = ort_module.quantize_onnx_int8(
        float_path, tmp_path / "qdq.onnx", calibration, OnnxRuntimeInt8Config(fuse_linear_bias=False)
    )
    fused_nodes, qdq_nodes = onnx.load(str(fused)).graph.node, onnx.load(str(qdq)).graph.node
    lowered = [n for n in fused_nodes if n.op_type == "MatMulIntegerToFloat"]
    assert len(lowered) == 6 * 2 and all(n.domain == "com.microsoft" for n in lowered)
    assert all(len(n.input) == 7 and n.input[6] for n in lowered)  # the bias is inside
    assert not any(n.op_type == "MatMulIntegerToFloat" for n in qdq_nodes)
    assert sum(n.op_type == "Add" for n in qdq_nodes) - sum(n.op_type == "Add" for n in fused_nodes) == 6 * 2
    attention = [n.name for n in fused_nodes if n.op_type == "MatMul"]
    assert len(attention) == 2 * 2 and sum(n.op_type == "MatMul" for n in qdq_nodes) == 2 * 2 + 6 * 2
    probe = images(5, seed=7).numpy()
    got = ort_module.ort_session(fused, 1).run(None, {"pixel_values": probe})[0]
    expected = ort_module.ort_session(qdq, 1).run(None, {"pixel_values": probe})[0]
    assert abs(got - expected).max() <= 1e-4 * max(1.0, abs(expected).max())


def test_unsupported_architecture_is_refused(tmp_path):
    config = ResNetConfig(embedding_size=8, hidden_sizes=[8, 8], depths=[1, 1], num_labels=3)
    resnet = ResNetForImageClassification(config).eval()
    with pytest.raises(UnsupportedArchitectureError, match="resnet"):
        export_onnx(resnet, tmp_path / "resnet.onnx")
    with pytest.raises(UnsupportedArchitectureError, match="resnet"):
        quantize(resnet, parse_quant_spec("onnxruntime-int8"), torch.randn(4, 3, 32, 32))


def test_an_op_the_exporter_cannot_translate_is_named(tmp_path):
    model = make_model("vit")

    class SvdHead(torch.nn.Module):
        def __init__(self, linear: torch.nn.Linear):
            super().__init__()
            self.linear = linear

        def forward(self, x):
            return self.linear(x + torch.linalg.svdvals(x.reshape(x.shape[0], 2, -1)).sum(-1, keepdim=True))

    model.classifier = SvdHead(model.classifier)
    with pytest.raises(OnnxExportError, match="linalg_svd") as error:
        export_onnx(model, tmp_path / "svd.onnx")
    assert "dynamo=False" in str(error.value)


@pytest.mark.parametrize("op_type", ["Softmax", "LayerNormalization", "Add", "Gelu"])
def test_quantizing_ops_that_must_stay_float_is_refused(op_type):
    with pytest.raises(UnsupportedOpError, match=f"{op_type} stays float"):
        OnnxRuntimeInt8Config(op_types=("MatMul", op_type))


def test_unknown_op_types_and_settings_are_refused():
    with pytest.raises(UnsupportedOpError, match="Unknown op type 'Tanh'"):
        OnnxRuntimeInt8Config(op_types=("MatMul", "Tanh"))
    with pytest.raises(ValueError, match="calibration_method must be one of"):
        OnnxRuntimeInt8Config(calibration_method="kl")
    with pytest.raises(TypeError, match=r"extra\['onnxruntime'\] must be a OnnxRuntimeInt8Config"):
        quantize(make_model("vit"), parse_quant_spec("onnxruntime-int8", extra={"onnxruntime": 3}), images(4))
    with pytest.raises(ValueError, match=r"'calibration_metod' .* Did you mean 'calibration_method'"):
        # the --quant_extra spelling is checked as soon as the config is built, before any row
        parse_quant_spec("onnxruntime-int8", extra={"onnxruntime": {"calibration_metod": "percentile"}})
    with pytest.raises(
        ValueError, match=r"Unknown option 'calibration_metod'.* Did you mean 'calibration_method'"
    ):
        parse_quant_spec("onnxruntime-int8:calibration_metod=percentile")


def test_int8_runtimes_refuse_other_bit_widths():
    model = make_model("vit")
    with pytest.raises(ValueError, match="W8A8 only; got W4A4"):
        quantize(model, parse_quant_spec("onnxruntime-int8", w_bits=4, a_bits=4), images(8))
    with pytest.raises(ValueError, match="classifier_bits at 8 bits"):
        quantize(model, parse_quant_spec("onnxruntime-int8", classifier_bits=6), images(8))


def test_evaluate_quantized_refuses_a_bad_row_before_running_any(monkeypatch):
    """A W4A4 row for the int8 runtime, or a bad reconstruction option, fails before the first row runs."""
    model, x = make_model("vit"), images(8)
    evaluated = []
    monkeypatch.setattr(
        "hf_cd.quant.evaluate.evaluate_accuracy", lambda *args, **kwargs: evaluated.append(1) or (0.0, 1)
    )
    eval_data = (x, torch.zeros(8, dtype=torch.long))
    with pytest.raises(ValueError, match="W8A8 only; got W4A4"):
        evaluate_quantized(
            model, eval_data, x, pipelines=("minmax", "onnxruntime-int8"), bits=((8, 8), (4, 4))
        )
    with pytest.raises(ValueError, match="gptaq_alpha"):
        evaluate_quantized(model, eval_data, x, pipelines=("minmax", "gptaq"), extra={"gptaq_alpha": 2.0})
    assert evaluated == []  # not even the full-precision row ran


def test_missing_onnxruntime_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` now raises ImportError
    model = make_model("vit")
    with pytest.raises(RuntimeUnavailableError, match=r"pip install 'hf-cd\[onnx\]'"):
        export_onnx(model, tmp_path / "vit.onnx")
    with pytest.raises(RuntimeUnavailableError, match="onnxruntime"):
        evaluate_quantized(
            model,
            (images(8), torch.zeros(8, dtype=torch.long)),
            images(8),
            pipelines=("onnxruntime-int8",),
            bits=((8, 8),),
            config=BaseQuantConfig(progress=False),
        )


def test_torchao_without_cuda_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    model = make_model("vit")
    for name in ("torchao-int8", "torchao-fp8"):
        with pytest.raises(RuntimeUnavailableError, match="needs a CUDA device"):
            quantize(model, parse_quant_spec(name), images(4))


def test_torchao_missing_or_fp8_on_an_old_gpu_is_a_clear_error(monkeypatch):
    model = make_model("vit")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "torchao", None)
    with pytest.raises(RuntimeUnavailableError, match=r"pip install 'hf-cd\[gpu\]'"):
        quantize(model, parse_quant_spec("torchao-int8"), images(4))
    fake_torchao = types.ModuleType("torchao")
    fake_torchao.quantization = types.ModuleType("torchao.quantization")
    monkeypatch.setitem(sys.modules, "torchao", fake_torchao)
    monkeypatch.setitem(sys.modules, "torchao.quantization", fake_torchao.quantization)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100")
    with pytest.raises(RuntimeUnavailableError, match=r"compute capability ≥ 8.9.*sm_80"):
        quantize(model, parse_quant_spec("torchao-fp8"), images(4))


def test_export_cli_writes_a_float_model_with_metadata(tmp_path, capsys):
    import onnx

    model = make_model("dinov2")
    model.save_pretrained(tmp_path / "model")
    output = tmp_path / "out" / "dinov2.onnx"
    assert (
        main(["--model_name_or_path", str(tmp_path / "model"), "--format", "onnx", "--output", str(output)])
        == 0
    )
    assert onnx_logits_max_abs_diff(model, output, images(3)) <= PARITY_ATOL
    metadata = {prop.key: prop.value for prop in onnx.load(str(output)).metadata_props}
    assert metadata["model_type"] == "dinov2" and "id2label" in metadata
    with pytest.raises(SystemExit) as exit_:
        main(["--model_name_or_path", str(tmp_path / "model"), "--int8", "--output", str(output)])
    assert exit_.value.code == 2 and "--dataset_name" in capsys.readouterr().err
    with pytest.raises(ValueError, match="Unknown export format"):
        export_model(model, output, format="tflite")


def test_interleaved_timing_returns_every_rounds_samples_in_call_order():
    """The int8 benchmark's spread (per-round ratios) rests on the samples matching the medians."""
    import statistics

    from hf_cd.quant.runtimes.base import interleaved_median_ms

    calls: list[str] = []
    runners = {"float": lambda: calls.append("float"), "int8": lambda: calls.append("int8")}
    samples: dict[str, list[float]] = {}
    medians = interleaved_median_ms(runners, runs=5, warmup=1, samples_ms=samples)
    assert calls == ["float", "int8"] * 6  # alternating, warm-up round first
    assert {name: len(values) for name, values in samples.items()} == {"float": 5, "int8": 5}
    assert medians == {name: statistics.median(values) for name, values in samples.items()}
