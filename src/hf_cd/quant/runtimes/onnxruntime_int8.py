"""``onnxruntime-int8``: export to ONNX, quantize statically (QDQ), run on ONNX Runtime's int8 CPU kernels.

The fake-quant pipelines say what a model *could* do at W8A8; this one says what it does on a
real integer runtime, and how much faster it runs there.

* Export: `torch.onnx.export` with the dynamo exporter (the default of torch ≥ 2.9; the TorchScript
  one is deprecated). It resolves shape branches at export time (Dinov2's position-embedding
  interpolation vanishes for the trained image size), names the batch axis with
  ``torch.export.Dim``, and its float logits match PyTorch to ~1e-7 on ViT, DeiT and Dinov2.
  ``dynamo=False`` stays available as a fallback for models the dynamo exporter cannot trace.
* The export copy runs transformers' ``eager`` attention and the graph is opset 20, for speed in
  float and int8 alike: the exporter decomposes SDPA with an ``IsNaN`` + ``Where`` guard after every
  softmax (14–17% of ORT's kernel time), and below opset 20 GELU becomes Div/Erf/Add/Mul/Mul, which
  ORT does not fuse, while opset 20 has one ``Gelu`` op. With the bias pass below, the int8
  speed-up over ORT float32 on DINOv2-S at batch 32 (each against the float graph of its own
  export) went from 1.72× to 2.18–2.24× (bench/results/int8_cpu.md).
  ``attention_implementation="sdpa"`` and ``opset=18`` restore the former export (opset 20 needs
  ONNX Runtime ≥ 1.17).
* Quantization: `onnxruntime.quantization.quantize_static` in QDQ format, per-channel symmetric int8
  weights, activations calibrated (MinMax, Percentile or Entropy) on the same calibration images
  the fake-quant pipelines draw, after `quant_pre_process`. Only the linear layers (``MatMul`` with
  a constant weight, the ``Gemm`` classifier) and the patch-embedding ``Conv`` are quantized;
  LayerNorm, GELU, Softmax and the residual Adds stay float, as ONNX Runtime advises for
  transformers. The attention matmuls (both inputs are activations) stay float by default:
  ORT's QDQ quantizer ignores ``MatMulConstBOnly`` (only its QOperator path reads it), so they are
  excluded by node name.
* Only the inputs and weights of the linear layers get QDQ pairs, not their outputs (ORT's default
  adds those too): ORT then fuses each linear into ``MatMulIntegerToFloat`` with a float32 output
  instead of ``QLinearMatMul`` whose uint8 output the float op after it dequantizes again
  (``quantize_linear_outputs=True`` restores ORT's placement).
* Then each int8 linear is written as ``MatMulIntegerToFloat`` with its bias inside
  (`hf_cd.quant.runtimes.onnx_graph`), since ORT's QDQ fusion leaves the bias Add as a separate
  pass (``fuse_linear_bias=False`` keeps a pure QDQ file for runtimes other than ONNX Runtime).
* Activations are uint8 by default (U8S8): on x86 with AVX2, ORT fuses every U8S8 QDQ linear into
  an integer kernel, while with int8 activations a third of them stayed DequantizeLinear + float
  MatMul (ViT-S/16 on this project's AVX2 CPU: 1.56× vs 1.14× faster than float at batch 1). ORT
  notes U8S8 can saturate without VNNI; ``reduce_range=True`` or ``activation_type="int8"`` are the
  remedies if accuracy drops.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import math
import shutil
import tempfile
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from hf_cd.architectures import unwrap_model
from hf_cd.files import atomic_path
from hf_cd.quant.config import QuantConfig
from hf_cd.quant.evaluate import evaluate_accuracy
from hf_cd.quant.prepare import check_quantizable
from hf_cd.quant.quantizers import is_float_bits
from hf_cd.quant.runtimes.base import (
    RuntimePipeline,
    RuntimeUnavailableError,
    example_images,
    interleaved_median_ms,
    latency_columns,
    settings_from_extra,
    tile_images,
)
from hf_cd.quant.runtimes.onnx_graph import INT8_LINEAR_OP, fuse_int8_linear_bias

logger = logging.getLogger("hf_cd.quant")

INPUT_NAME = "pixel_values"
OUTPUT_NAME = "logits"
SUPPORTED_OP_TYPES: tuple[str, ...] = ("MatMul", "Gemm", "Conv")
"""The ops whose int8 kernels keep a ViT accurate: its linear layers and the patch embedding."""
FLOAT_ONLY_OP_TYPES: dict[str, str] = {
    "LayerNormalization": "its per-token statistics need float range",
    "Softmax": "its exponent needs float range",
    "Gelu": "its curve near zero needs float precision",
    "Erf": "GELU's curve near zero needs float precision",
    "Add": "the residual stream carries outliers that one int8 scale per tensor clips",
}
CALIBRATION_METHODS: tuple[str, ...] = ("minmax", "percentile", "entropy")
ACTIVATION_TYPES: tuple[str, ...] = ("uint8", "int8")
EXPORT_ATTENTION_IMPLEMENTATIONS: tuple[str | None, ...] = ("eager", "sdpa", None)
"""transformers attention implementations the export copy may run; ``None`` keeps the model's own."""
DEFAULT_OPSET = 20
"""The first opset with a ``Gelu`` op (earlier opsets get a Div/Erf/Add/Mul/Mul chain ORT does not fuse)."""
ONNX_EXTRA_KEY = "onnxruntime"
"""``QuantConfig.extra[ONNX_EXTRA_KEY]`` holds the `OnnxRuntimeInt8Config` (or a dict of its fields)."""


class OnnxExportError(RuntimeError):
    """`torch.onnx.export` failed (usually an op the exporter cannot translate); the message says what to try."""


class OnnxParityError(RuntimeError):
    """ONNX Runtime's float logits differ from PyTorch's by more than the tolerance."""


class UnsupportedOpError(ValueError):
    """An op type asked to be quantized that this pipeline keeps float, or one it does not know."""


@dataclass(frozen=True)
class OnnxRuntimeInt8Config:
    """How to quantize for ONNX Runtime and how to time it; pass as ``QuantConfig(extra={"onnxruntime": ...})``."""

    calibration_method: str = "minmax"
    """``minmax``, ``percentile`` or ``entropy`` (ONNX Runtime's calibrators)."""
    percentile: float = 99.999
    """For ``percentile``: the percentile of |activation| kept in range."""
    activation_type: str = "uint8"
    """``uint8`` (U8S8: every linear fuses to QLinearMatMul on x86) or ``int8`` (S8S8)."""
    activation_symmetric: bool = False
    reduce_range: bool = False
    """7-bit weights: ORT's remedy for U8S8 saturation on CPUs without VNNI."""
    per_channel: bool = True
    quantize_attention_matmuls: bool = False
    """Also quantize Q·Kᵀ and P·V (both inputs activations); off by default, as ORT advises."""
    fuse_linear_bias: bool = True
    """Ours: write each int8 linear as ONNX Runtime's ``MatMulIntegerToFloat`` with its bias inside
    (ORT's own QDQ fusion leaves the bias Add as a separate float pass): 4–11% less int8 time on
    DINOv2-S at batch 32, same logits. The file then needs ONNX Runtime (a ``com.microsoft`` op);
    ``False`` keeps standard QDQ ops for other runtimes. Not used with ``quantize_linear_outputs``."""
    quantize_linear_outputs: bool = False
    """Also put a QDQ pair on every linear's *output* (ORT's default placement), so ORT fuses
    ``QLinearMatMul`` with a uint8 output that the float bias Add, GELU or residual Add right after
    it must dequantize again. Off (ours): inputs and weights only, the output stays float32 and ORT
    fuses ``MatMulIntegerToFloat``: one requantization fewer per linear, faster and closer to float
    (bench/results/int8_cpu.md)."""
    op_types: tuple[str, ...] = SUPPORTED_OP_TYPES
    preprocess: bool = True
    """Run `quant_pre_process` (shape inference and graph clean-up) before quantizing."""
    attention_implementation: str | None = "eager"
    """transformers attention the export copy runs: ``eager`` (MatMul, Softmax, MatMul), ``sdpa``
    (the exporter adds an IsNaN + Where guard after every softmax, 14–17% of ORT's kernel time) or
    ``None`` (the model's own). The user's model is never switched."""
    opset: int = DEFAULT_OPSET
    dynamo: bool = True
    """The dynamo exporter (default); ``False`` uses the deprecated TorchScript exporter."""
    parity_atol: float = 1e-4
    """Largest |ORT float logits − PyTorch logits| accepted after export."""
    num_threads: int | None = None
    """ORT ``intra_op_num_threads`` for evaluation and timing; ``None``: ``torch.get_num_threads()``."""
    latency_batch_sizes: tuple[int, ...] = (1, 32)
    latency_runs: int = 50
    latency_warmup: int = 5

    def __post_init__(self) -> None:
        if self.calibration_method not in CALIBRATION_METHODS:
            raise ValueError(
                f"calibration_method must be one of {CALIBRATION_METHODS}, got {self.calibration_method!r}."
            )
        if self.activation_type not in ACTIVATION_TYPES:
            raise ValueError(
                f"activation_type must be one of {ACTIVATION_TYPES}, got {self.activation_type!r}."
            )
        check_attention_implementation(self.attention_implementation, "attention_implementation")
        if not 50.0 < self.percentile <= 100.0:
            raise ValueError(f"percentile is in percent, in (50, 100]; got {self.percentile}.")
        object.__setattr__(self, "op_types", tuple(self.op_types))
        check_op_types(self.op_types)
        object.__setattr__(self, "latency_batch_sizes", tuple(int(b) for b in self.latency_batch_sizes))
        if not self.latency_batch_sizes or min(self.latency_batch_sizes) < 1:
            raise ValueError(f"latency_batch_sizes must be positive ints, got {self.latency_batch_sizes}.")
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError(f"num_threads must be ≥ 1 or None, got {self.num_threads}.")

    @property
    def threads(self) -> int:
        return self.num_threads if self.num_threads is not None else torch.get_num_threads()


def check_attention_implementation(value: str | None, name: str) -> None:
    """Refuse an attention implementation the export copy cannot be switched to, naming the choices."""
    if value not in EXPORT_ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"{name} must be one of {EXPORT_ATTENTION_IMPLEMENTATIONS}, got {value!r}.")


def check_op_types(op_types: Sequence[str]) -> None:
    """Refuse ops this pipeline keeps float (saying why) and ones it does not know."""
    for op_type in op_types:
        if op_type in FLOAT_ONLY_OP_TYPES:
            raise UnsupportedOpError(
                f"{op_type} stays float in onnxruntime-int8: {FLOAT_ONLY_OP_TYPES[op_type]}. Quantize only "
                f"{SUPPORTED_OP_TYPES}."
            )
        if op_type not in SUPPORTED_OP_TYPES:
            raise UnsupportedOpError(
                f"Unknown op type {op_type!r} for onnxruntime-int8; choose from {SUPPORTED_OP_TYPES}."
            )
    if not op_types:
        raise UnsupportedOpError(f"op_types is empty; choose from {SUPPORTED_OP_TYPES}.")


def require_onnxruntime() -> tuple[Any, Any]:
    """``(onnx, onnxruntime)``, imported lazily so ``import hf_cd`` works without them."""
    try:
        import onnx
        import onnxruntime
    except ImportError as error:
        raise RuntimeUnavailableError(
            f"The onnxruntime-int8 pipeline and ONNX export need onnx and onnxruntime ({error}). Install them "
            "with: pip install 'hf-cd[onnx]'  (or pip install onnx onnxruntime onnxscript)."
        ) from error
    return onnx, onnxruntime


class _LogitsOnly(nn.Module):
    """Export wrapper: one tensor in, one tensor out, so the ONNX graph has one named output."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values).logits


def export_copy(model: nn.Module, attn_implementation: str | None = None) -> nn.Module:
    """A float32, CPU, eval-mode copy to export; the user's model keeps its dtype, device, mode and attention.

    ``attn_implementation`` (``eager`` / ``sdpa``) switches the copy's transformers attention;
    ``None`` keeps the model's own.
    """
    check_quantizable(model)
    check_attention_implementation(attn_implementation, "attn_implementation")
    exported = copy.deepcopy(unwrap_model(model)).to(device="cpu", dtype=torch.float32).eval()
    if attn_implementation is not None:
        exported.set_attn_implementation(attn_implementation)
    return exported


def export_onnx(
    model: nn.Module,
    path: str | Path,
    *,
    opset: int = DEFAULT_OPSET,
    dynamo: bool = True,
    attn_implementation: str | None = "eager",
    check_parity: bool = True,
    parity_images: torch.Tensor | None = None,
    atol: float = 1e-4,
) -> Path:
    """Export a ViT / DeiT / Dinov2 classifier to one float32 ONNX file with a dynamic batch axis.

    Input ``pixel_values`` (batch, channels, height, width), output ``logits``. The exported copy
    runs ``attn_implementation`` attention (``eager`` by default: no softmax NaN guard in the
    graph; ``None`` keeps the model's own). With ``check_parity`` ONNX Runtime's logits are
    compared with the PyTorch model's own (its own attention) at batch 1 and at the batch of
    ``parity_images`` (random images when ``None``); a difference above ``atol`` raises
    `OnnxParityError`. The model passed in is not changed.
    """
    require_onnxruntime()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    exported = export_copy(model, attn_implementation)
    example = example_images(exported, 2)  # batch 2: torch.export specializes sizes 0 and 1
    large = sum(p.numel() * p.element_size() for p in exported.parameters()) > 1_800_000_000
    kwargs: dict[str, Any] = (
        {"dynamic_shapes": {INPUT_NAME: {0: torch.export.Dim("batch")}}, "external_data": large}
        if dynamo
        else {"dynamic_axes": {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}}
    )
    exporter_log = io.StringIO()
    try:
        with contextlib.redirect_stdout(exporter_log), _quiet_exporter_logs():
            torch.onnx.export(
                _LogitsOnly(exported).eval(),
                (example,),
                str(path),
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                opset_version=opset,
                dynamo=dynamo,
                verbose=False,
                **kwargs,
            )
    except Exception as error:
        raise OnnxExportError(
            f"Exporting {type(exported).__name__} to ONNX failed ({'dynamo' if dynamo else 'TorchScript'} "
            f"exporter, opset {opset}): {type(error).__name__}: {str(error)[:2000]}\nUsually an op the exporter "
            "cannot translate. Try the other exporter (OnnxRuntimeInt8Config(dynamo=False) / "
            "export_onnx(..., dynamo=False)), a newer opset, or replace the op in the model."
        ) from error
    if check_parity:
        images = parity_images if parity_images is not None else example_images(exported, 4, seed=1)
        difference = onnx_logits_max_abs_diff(exported, path, images)
        if not difference <= atol:
            raise OnnxParityError(
                f"ONNX Runtime's float logits differ from PyTorch's by {difference:.3g} (> {atol:g}) for "
                f"{type(exported).__name__} exported to {path}. Try the other exporter (dynamo={not dynamo}) "
                "or raise the tolerance (atol / OnnxRuntimeInt8Config.parity_atol) if the model's logits are large."
            )
    return path


@contextlib.contextmanager
def _quiet_exporter_logs():
    """The dynamo exporter logs a warning per missing torchvision op and prints progress; none matter for a ViT."""
    quieted = [logging.getLogger(name) for name in ("torch.onnx", "onnxscript", "onnx_ir")]
    levels = [log.level for log in quieted]
    for log in quieted:
        log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():  # torch.export's own deprecation notices, not the user's concern
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            yield
    finally:
        for log, level in zip(quieted, levels):
            log.setLevel(level)


def ort_session(path: str | Path, num_threads: int | None = None):
    """A CPU `InferenceSession` with a fixed thread count (float and int8 are timed alike)."""
    _, onnxruntime = require_onnxruntime()
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = num_threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


@torch.no_grad()
def onnx_logits_max_abs_diff(
    model: nn.Module, path: str | Path, images: torch.Tensor, num_threads: int | None = None
) -> float:
    """Largest |ONNX Runtime logits − PyTorch logits| at batch 1 and at the batch of ``images``.

    ``inf`` when either side has a NaN or inf logit: ``max(0.0, nan)`` is 0.0, and a NaN graph must
    fail the parity check, not pass it.
    """
    session = ort_session(path, num_threads)
    reference_model = export_copy(model)
    images = images.detach().to(device="cpu", dtype=torch.float32)
    worst = 0.0
    for batch in (images[:1], images):
        expected = reference_model(pixel_values=batch).logits.numpy()
        got = session.run([OUTPUT_NAME], {INPUT_NAME: batch.numpy()})[0]
        if got.shape != expected.shape:
            raise OnnxParityError(f"ONNX logits have shape {got.shape}, PyTorch's {expected.shape}.")
        difference = float(np.abs(got - expected).max())
        if not (np.isfinite(got).all() and np.isfinite(expected).all() and math.isfinite(difference)):
            return math.inf
        worst = max(worst, difference)
    return worst


def _calibration_reader_class():
    from onnxruntime.quantization import CalibrationDataReader

    class CalibrationImageReader(CalibrationDataReader):
        """Feeds the calibration images to ORT's calibrator in batches (rewindable)."""

        def __init__(self, images: torch.Tensor, batch_size: int):
            self.batches = [
                images[start : start + batch_size].detach().to(device="cpu", dtype=torch.float32).numpy()
                for start in range(0, images.shape[0], batch_size)
            ]
            self.position = 0

        def get_next(self) -> dict[str, Any] | None:
            if self.position >= len(self.batches):
                return None
            self.position += 1
            return {INPUT_NAME: self.batches[self.position - 1]}

        def rewind(self) -> None:
            self.position = 0

    return CalibrationImageReader


def calibration_reader(images: torch.Tensor, batch_size: int = 32):
    """An ONNX Runtime ``CalibrationDataReader`` over ``images`` (a (N, C, H, W) tensor)."""
    require_onnxruntime()
    return _calibration_reader_class()(images, batch_size)


def _constant_names(graph) -> set[str]:
    names = {initializer.name for initializer in graph.initializer}
    names.update(output for node in graph.node if node.op_type == "Constant" for output in node.output)
    return names


def nodes_kept_float(model_proto, settings: OnnxRuntimeInt8Config, embedding_bits: int, classifier_bits: int):
    """Names of the quantizable nodes left float: attention matmuls, and the embedding / classifier if asked.

    Found from the graph, not from names the exporter happens to give: a MatMul whose second input
    is not a constant is an attention matmul; the linear nodes nearest the graph output are the
    classifier(s); the Conv nodes are the patch embedding.
    """
    graph = model_proto.graph
    constants = _constant_names(graph)
    producer = {output: node for node in graph.node for output in node.output}

    def is_linear(node) -> bool:
        return node.op_type in ("MatMul", "Gemm") and len(node.input) > 1 and node.input[1] in constants

    excluded: list[str] = []
    if not settings.quantize_attention_matmuls:
        excluded += [n.name for n in graph.node if n.op_type == "MatMul" and n.input[1] not in constants]
    if is_float_bits(embedding_bits):
        excluded += [n.name for n in graph.node if n.op_type == "Conv"]
    if is_float_bits(classifier_bits):
        heads, seen = [], set()
        stack = [output.name for output in graph.output]
        while stack:
            node = producer.get(stack.pop())
            if node is None or node.name in seen:
                continue
            seen.add(node.name)
            if is_linear(node):
                heads.append(node.name)
            else:
                stack.extend(node.input)
        excluded += heads
    return excluded


def quantize_onnx_int8(
    float_path: str | Path,
    output_path: str | Path,
    calibration_images: torch.Tensor,
    settings: OnnxRuntimeInt8Config | None = None,
    *,
    embedding_bits: int = 8,
    classifier_bits: int = 8,
    batch_size: int = 32,
) -> Path:
    """Statically quantize a float ONNX classifier to int8 QDQ, calibrated on ``calibration_images``.

    ``embedding_bits`` / ``classifier_bits`` of 16 or more leave the patch embedding / classifier
    float; 8 quantizes them. Writes one file at ``output_path`` and returns it.
    """
    onnx, _ = require_onnxruntime()
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    settings = settings or OnnxRuntimeInt8Config()
    for name, bits in (("embedding_bits", embedding_bits), ("classifier_bits", classifier_bits)):
        if bits != 8 and not is_float_bits(bits):
            raise ValueError(f"{name} must be 8 (int8) or ≥ 16 (float) for ONNX Runtime, got {bits}.")
    if calibration_images is None or calibration_images.shape[0] == 0:
        raise ValueError("Static int8 quantization needs calibration images (e.g. 32 training images).")
    float_path, output_path = Path(float_path), Path(output_path)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="hf_cd_ort_") as workdir:
        source = float_path
        if settings.preprocess:
            source = Path(workdir) / "preprocessed.onnx"
            try:
                with contextlib.redirect_stdout(io.StringIO()):  # it prints its progress
                    quant_pre_process(str(float_path), str(source))
            except Exception as error:
                raise RuntimeError(
                    f"onnxruntime's quant_pre_process failed on {float_path}: {error}. Retry with "
                    "OnnxRuntimeInt8Config(preprocess=False)."
                ) from error
        model_proto = onnx.load(str(source))
        excluded = nodes_kept_float(model_proto, settings, embedding_bits, classifier_bits)
        large = model_proto.ByteSize() > 1_800_000_000
        del model_proto
        method = {
            "minmax": CalibrationMethod.MinMax,
            "percentile": CalibrationMethod.Percentile,
            "entropy": CalibrationMethod.Entropy,
        }[settings.calibration_method]
        extra_options = {
            "ActivationSymmetric": settings.activation_symmetric,
            "WeightSymmetric": True,
            # Read by ORT's QOperator path only; the QDQ path honours the node exclusions above.
            "MatMulConstBOnly": not settings.quantize_attention_matmuls,
        }
        if not settings.quantize_linear_outputs:
            # The Conv (patch embedding) keeps its output QDQ: QLinearConv needs it, and it is one node.
            extra_options["OpTypesToExcludeOutputQuantization"] = ["MatMul", "Gemm"]
        if settings.calibration_method == "percentile":
            extra_options["CalibPercentile"] = settings.percentile
        # ORT's histogram calibrators print progress to stdout.
        with contextlib.redirect_stdout(io.StringIO()):
            quantize_static(
                str(source),
                str(output_path),
                calibration_reader(calibration_images, batch_size),
                quant_format=QuantFormat.QDQ,
                op_types_to_quantize=list(settings.op_types),
                per_channel=settings.per_channel,
                reduce_range=settings.reduce_range,
                activation_type=QuantType.QUInt8 if settings.activation_type == "uint8" else QuantType.QInt8,
                weight_type=QuantType.QInt8,
                nodes_to_exclude=excluded,
                calibrate_method=method,
                use_external_data_format=large,
                extra_options=extra_options,
            )
    if settings.fuse_linear_bias and not settings.quantize_linear_outputs:
        quantized = onnx.load(str(output_path))
        report = fuse_int8_linear_bias(quantized)
        logger.info(
            "onnxruntime-int8: %d linears written as %s, %d with their bias inside",
            report.linears,
            INT8_LINEAR_OP,
            report.with_bias,
        )
        if large:
            onnx.save(
                quantized, str(output_path), save_as_external_data=True, location=f"{output_path.name}.data"
            )
        else:
            onnx.save(quantized, str(output_path))
    return output_path


def add_metadata(path: str | Path, metadata: dict[str, Any]) -> None:
    """Write ``metadata`` into the ONNX file's ``metadata_props`` (what a deployment reads back)."""
    onnx, _ = require_onnxruntime()
    model_proto = onnx.load(str(path))
    existing = {prop.key: prop for prop in model_proto.metadata_props}
    for key, value in metadata.items():
        text = value if isinstance(value, str) else json.dumps(value)
        if key in existing:
            existing[key].value = text
        else:
            model_proto.metadata_props.add(key=key, value=text)
    with atomic_path(path) as tmp:
        onnx.save(model_proto, str(tmp))


def written_by_hf_cd(path: str | Path) -> bool:
    """Whether the ONNX file at ``path`` carries hf-cd's metadata (so an export may replace it)."""
    try:
        onnx, _ = require_onnxruntime()
        model_proto = onnx.load(str(path), load_external_data=False)
    except Exception:  # not an ONNX file at all: not ours
        return False
    return any(prop.key == "hf_cd_version" for prop in model_proto.metadata_props)


class OnnxRuntimeClassifier(nn.Module):
    """An ONNX Runtime CPU session behind the transformers call (``model(pixel_values=...).logits``).

    So `evaluate_accuracy` and user code run the real int8 model exactly as they run the float one.
    It owns the temporary directory its ONNX files live in; `save` copies the int8 file out.
    """

    def __init__(
        self,
        onnx_path: str | Path,
        *,
        float_onnx_path: str | Path | None = None,
        num_threads: int | None = None,
        workdir: tempfile.TemporaryDirectory | None = None,
    ):
        super().__init__()
        # hf_cd's batch helpers read the device and dtype from the first parameter: CPU float32.
        self._device_anchor = nn.Parameter(torch.zeros(0), requires_grad=False)
        self.onnx_path = Path(onnx_path)
        self.float_onnx_path = None if float_onnx_path is None else Path(float_onnx_path)
        self.num_threads = num_threads or torch.get_num_threads()
        self._workdir = workdir
        self.session = ort_session(self.onnx_path, self.num_threads)

    def forward(self, pixel_values: torch.Tensor, **unused: Any):
        from transformers.modeling_outputs import ImageClassifierOutput

        inputs = pixel_values.detach().to(device="cpu", dtype=torch.float32).numpy()
        logits = self.session.run([OUTPUT_NAME], {INPUT_NAME: inputs})[0]
        return ImageClassifierOutput(logits=torch.from_numpy(logits))

    def save(self, path: str | Path) -> Path:
        """Copy the int8 ONNX model to ``path`` (one deployable file)."""
        path = Path(path)
        with atomic_path(path) as tmp:
            shutil.copyfile(self.onnx_path, tmp)
        return path

    def __deepcopy__(self, memo):
        raise TypeError(
            "An OnnxRuntimeClassifier wraps a live ONNX Runtime session; save() it and reload instead."
        )


class OnnxRuntimeInt8Pipeline(RuntimePipeline):
    """W8A8 on ONNX Runtime's CPU int8 kernels: static QDQ, per-channel weights, calibrated activations."""

    name = "onnxruntime-int8"
    runtime = "onnxruntime"
    description = "ONNX export + onnxruntime quantize_static (QDQ, per-channel int8 weights), CPU kernels"

    def __init__(self, settings: OnnxRuntimeInt8Config | None = None):
        self.default_settings = settings or OnnxRuntimeInt8Config()

    def settings(self, config: QuantConfig) -> OnnxRuntimeInt8Config:
        return settings_from_extra(config, ONNX_EXTRA_KEY, OnnxRuntimeInt8Config, self.default_settings)

    def require(self, config: QuantConfig) -> None:
        require_onnxruntime()

    def __call__(
        self, model: nn.Module, config: QuantConfig, calibration_images: torch.Tensor | None
    ) -> OnnxRuntimeClassifier:
        settings = self.settings(config)
        self.check(config)
        if calibration_images is None:
            raise ValueError(f"Pipeline {self.name!r} calibrates activations: pass calibration images.")
        workdir = tempfile.TemporaryDirectory(prefix="hf_cd_onnx_")
        float_path = export_onnx(
            model,
            Path(workdir.name) / "float.onnx",
            opset=settings.opset,
            dynamo=settings.dynamo,
            attn_implementation=settings.attention_implementation,
            parity_images=calibration_images[:8],
            atol=settings.parity_atol,
        )
        int8_path = quantize_onnx_int8(
            float_path,
            Path(workdir.name) / "int8.onnx",
            calibration_images,
            settings,
            embedding_bits=config.embedding_bits,
            classifier_bits=config.classifier_bits,
            batch_size=config.batch_size,
        )
        add_metadata(int8_path, onnx_metadata(model, config, settings, int(calibration_images.shape[0])))
        return OnnxRuntimeClassifier(
            int8_path, float_onnx_path=float_path, num_threads=settings.threads, workdir=workdir
        )

    def evaluate(
        self,
        model: nn.Module,
        config: QuantConfig,
        calibration_images: torch.Tensor | None,
        eval_data: Any,
    ) -> dict[str, Any]:
        settings = self.settings(config)
        start = time.perf_counter()
        classifier = self(model, config, calibration_images)
        quantize_seconds = time.perf_counter() - start
        start = time.perf_counter()
        accuracy, count = evaluate_accuracy(
            classifier, eval_data, config.batch_size, config.progress, f"{self.name} {config.label} eval"
        )
        eval_seconds = time.perf_counter() - start
        float_classifier = OnnxRuntimeClassifier(classifier.float_onnx_path, num_threads=settings.threads)
        float_accuracy, _ = evaluate_accuracy(
            float_classifier, eval_data, config.batch_size, config.progress, f"{self.name} float eval"
        )
        float_session = float_classifier.session
        latencies = {}
        for batch_size in settings.latency_batch_sizes:
            inputs = {INPUT_NAME: tile_images(calibration_images, batch_size).float().numpy()}
            latencies[batch_size] = interleaved_median_ms(
                {
                    "float": lambda inputs=inputs: float_session.run([OUTPUT_NAME], inputs),
                    "quantized": lambda inputs=inputs: classifier.session.run([OUTPUT_NAME], inputs),
                },
                runs=settings.latency_runs,
                warmup=settings.latency_warmup,
            )
        return {
            "w_bits": config.w_bits,
            "a_bits": config.a_bits,
            "embedding_bits": config.embedding_bits,
            "classifier_bits": config.classifier_bits,
            "accuracy": accuracy,
            "num_eval": count,
            "num_calibration": int(calibration_images.shape[0]),
            "quantize_seconds": quantize_seconds,
            "eval_seconds": eval_seconds,
            "float_accuracy": float_accuracy,
            **latency_columns(latencies),
            "num_threads": settings.threads,
        }


def onnx_metadata(
    model: nn.Module, config: QuantConfig | None, settings: OnnxRuntimeInt8Config | None, num_calibration: int
) -> dict[str, Any]:
    """What a deployment needs beside the graph: labels, input size, and how the int8 copy was made."""
    from hf_cd._version import __version__

    model_config = unwrap_model(model).config
    metadata: dict[str, Any] = {
        "hf_cd_version": __version__,
        "model_type": model_config.model_type,
        "id2label": {str(k): v for k, v in getattr(model_config, "id2label", {}).items()},
        "image_size": model_config.image_size,
        "num_channels": model_config.num_channels,
    }
    if settings is not None and config is not None:
        metadata["int8"] = {
            "num_calibration": num_calibration,
            "calibration_seed": config.seed,
            "embedding_bits": config.embedding_bits,
            "classifier_bits": config.classifier_bits,
            **{
                k: v
                for k, v in asdict(settings).items()
                if not k.startswith("latency") and k != "num_threads"
            },
        }
    return metadata
