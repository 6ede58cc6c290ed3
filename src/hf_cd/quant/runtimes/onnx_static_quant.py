"""Static int8 quantization of an exported float ONNX classifier with ONNX Runtime (QDQ), and its metadata.

`quantize_onnx_int8` runs `quant_pre_process` and `quantize_static` on the linear layers and the
patch embedding only, calibrated on the same images the fake-quant pipelines draw, then lowers each
int8 linear with its bias (`hf_cd.quant.runtimes.onnx_graph`). Why each choice:
`hf_cd.quant.runtimes.onnxruntime_int8`.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from hf_cd.architectures import unwrap_model
from hf_cd.files import atomic_path
from hf_cd.quant.algorithms.quantizers import is_float_bits
from hf_cd.quant.config import BaseQuantConfig
from hf_cd.quant.runtimes.onnx_export import (
    DEFAULT_OPSET,
    INPUT_NAME,
    check_attention_implementation,
    require_onnxruntime,
)
from hf_cd.quant.runtimes.onnx_graph import INT8_LINEAR_OP, fuse_int8_linear_bias

logger = logging.getLogger("hf_cd.quant")

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


class UnsupportedOpError(ValueError):
    """An op type asked to be quantized that this pipeline keeps float, or one it does not know."""


@dataclass(frozen=True)
class OnnxRuntimeInt8Config(BaseQuantConfig):
    """``onnxruntime-int8``: W8A8 on ONNX Runtime's CPU kernels; how to quantize for it and how to time it.

    ``quantize(model, OnnxRuntimeInt8Config(calibration_method="percentile"), images)``; the spelling
    ``onnxruntime-int8:calibration_method=percentile`` names these fields as they are.
    """

    name: ClassVar[str] = "onnxruntime-int8"
    extra_key: ClassVar[str] = "onnxruntime"
    """The deprecated ``QuantConfig(extra={"onnxruntime": {...}})`` held these settings there."""

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
        super().__post_init__()
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


def onnx_metadata(
    model: nn.Module,
    config: BaseQuantConfig | None,
    settings: OnnxRuntimeInt8Config | None,
    num_calibration: int,
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
                for k, v in settings.options().items()
                if not k.startswith("latency") and k != "num_threads"
            },
        }
    return metadata
