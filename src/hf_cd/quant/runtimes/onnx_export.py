"""ONNX export of a ViT / DeiT / Dinov2 classifier, and the checks that the graph computes what the model does.

Export: `torch.onnx.export` with the dynamo exporter on a float32 CPU copy running ``eager``
attention at opset 20 (why: `hf_cd.quant.runtimes.onnxruntime_int8`); then ONNX Runtime's float
logits are compared with PyTorch's (`onnx_logits_max_abs_diff`). onnx and onnxruntime are imported
lazily, with an error naming the package to install.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from hf_cd.architectures import unwrap_model
from hf_cd.quant.prepare import check_quantizable
from hf_cd.quant.runtimes.base import RuntimeUnavailableError, example_images

INPUT_NAME = "pixel_values"
OUTPUT_NAME = "logits"
EXPORT_ATTENTION_IMPLEMENTATIONS: tuple[str | None, ...] = ("eager", "sdpa", None)
"""transformers attention implementations the export copy may run; ``None`` keeps the model's own."""
DEFAULT_OPSET = 20
"""The first opset with a ``Gelu`` op (earlier opsets get a Div/Erf/Add/Mul/Mul chain ORT does not fuse)."""


class OnnxExportError(RuntimeError):
    """`torch.onnx.export` failed (usually an op the exporter cannot translate); the message says what to try."""


class OnnxParityError(RuntimeError):
    """ONNX Runtime's float logits differ from PyTorch's by more than the tolerance."""


def check_attention_implementation(value: str | None, name: str) -> None:
    """Refuse an attention implementation the export copy cannot be switched to, naming the choices."""
    if value not in EXPORT_ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"{name} must be one of {EXPORT_ATTENTION_IMPLEMENTATIONS}, got {value!r}.")


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
