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

import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hf_cd.files import atomic_path
from hf_cd.quant.evaluate import evaluate_accuracy
from hf_cd.quant.runtimes.base import (
    RuntimePipeline,
    interleaved_median_ms,
    latency_columns,
    tile_images,
)
from hf_cd.quant.runtimes.onnx_export import (
    INPUT_NAME,
    OUTPUT_NAME,
    OnnxExportError,
    OnnxParityError,
    export_onnx,
    onnx_logits_max_abs_diff,
    ort_session,
    require_onnxruntime,
)
from hf_cd.quant.runtimes.onnx_static_quant import (
    OnnxRuntimeInt8Config,
    UnsupportedOpError,
    add_metadata,
    onnx_metadata,
    quantize_onnx_int8,
    written_by_hf_cd,
)

__all__ = [
    "INPUT_NAME",
    "OUTPUT_NAME",
    "OnnxExportError",
    "OnnxParityError",
    "OnnxRuntimeClassifier",
    "OnnxRuntimeInt8Config",
    "OnnxRuntimeInt8Pipeline",
    "UnsupportedOpError",
    "export_onnx",
    "onnx_logits_max_abs_diff",
    "ort_session",
    "quantize_onnx_int8",
    "written_by_hf_cd",
]

ONNX_EXTRA_KEY = OnnxRuntimeInt8Config.extra_key
"""The deprecated ``QuantConfig.extra[ONNX_EXTRA_KEY]`` held the `OnnxRuntimeInt8Config` settings."""


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

    def require(self, config: OnnxRuntimeInt8Config) -> None:
        require_onnxruntime()

    def __call__(
        self, model: nn.Module, config: OnnxRuntimeInt8Config, calibration_images: torch.Tensor | None
    ) -> OnnxRuntimeClassifier:
        settings = config
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
        config: OnnxRuntimeInt8Config,
        calibration_images: torch.Tensor | None,
        eval_data: Any,
    ) -> dict[str, Any]:
        settings = config
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
