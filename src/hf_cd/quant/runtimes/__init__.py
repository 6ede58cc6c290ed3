"""Real-runtime pipelines: the same rows as the fake-quant ones, measured on real integer kernels.

``onnxruntime-int8`` (CPU, ONNX Runtime static QDQ int8), ``torchao-int8`` and ``torchao-fp8``
(CUDA, torchao + ``torch.compile``). Registered on import like the built-ins; onnxruntime and
torchao are imported only when a pipeline runs, with an error naming the package to install.
"""

from hf_cd.quant.registry import register_handler
from hf_cd.quant.runtimes.base import RuntimePipeline, RuntimeUnavailableError
from hf_cd.quant.runtimes.onnxruntime_int8 import (
    OnnxExportError,
    OnnxParityError,
    OnnxRuntimeClassifier,
    OnnxRuntimeInt8Config,
    OnnxRuntimeInt8Pipeline,
    UnsupportedOpError,
    export_onnx,
    onnx_logits_max_abs_diff,
    quantize_onnx_int8,
)
from hf_cd.quant.runtimes.torchao_gpu import (
    TorchaoConfig,
    TorchaoFloat8Config,
    TorchaoFloat8Pipeline,
    TorchaoInt8Config,
    TorchaoInt8Pipeline,
    TorchaoPipeline,
    TorchaoRuntimeConfig,
)

for _config, _pipeline in (
    (OnnxRuntimeInt8Config, OnnxRuntimeInt8Pipeline()),
    (TorchaoInt8Config, TorchaoInt8Pipeline()),
    (TorchaoFloat8Config, TorchaoFloat8Pipeline()),
):
    register_handler(_config, _pipeline, overwrite=True)

__all__ = [
    "OnnxExportError",
    "OnnxParityError",
    "OnnxRuntimeClassifier",
    "OnnxRuntimeInt8Config",
    "OnnxRuntimeInt8Pipeline",
    "RuntimePipeline",
    "RuntimeUnavailableError",
    "TorchaoConfig",
    "TorchaoFloat8Config",
    "TorchaoFloat8Pipeline",
    "TorchaoInt8Config",
    "TorchaoInt8Pipeline",
    "TorchaoPipeline",
    "TorchaoRuntimeConfig",
    "UnsupportedOpError",
    "export_onnx",
    "onnx_logits_max_abs_diff",
    "quantize_onnx_int8",
]
