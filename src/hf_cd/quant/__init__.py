"""Post-training quantization of Hugging Face ViT / DeiT / Dinov2 models, to measure what CD buys.

One verb, small config objects (torchao's shape); a new model is returned and the input is never
changed::

    from hf_cd.quant import QuantConfig, quantize, evaluate_quantized

    qmodel = quantize(model, QuantConfig(w_bits=4, a_bits=4, pipeline="repq"), calib_images)
    table = evaluate_quantized(model, (x_test, y_test), x_train, bits=((8, 8), (6, 6), (4, 4)))
    print(table.to_markdown())

Pipelines: ``minmax``, ``percentile``, ``repq`` (RepQ-ViT) and ``per_tensor``; add more with
`register_pipeline`. The "fully quantized ViT" setting: every encoder linear (weights and inputs),
both attention matmuls' inputs, and the patch embedding and classifier at 8 bits by default
(``protocol="deploy"``; ``protocol="repq_vit"`` is RepQ-ViT's published bit assignment).
Reconstruction pipelines ``gptq``, ``gptaq``, ``marr`` and ``marr_grid`` solve the encoder weights
layer by layer (options in ``QuantConfig.extra``: `hf_cd.quant.pipelines.reconstruction`).
Quantization-aware training with learned step sizes: `prepare_qat` / `convert` (`hf_cd.quant.qat`);
`save_quantized` / `load_quantized` save and reload a `quantize` or `convert` result.
"""

from hf_cd.quant import pipelines as _builtin_pipelines  # noqa: F401  (registers the built-ins)
from hf_cd.quant.algorithms.observers import NoCalibrationDataError
from hf_cd.quant.algorithms.params import QuantParams
from hf_cd.quant.api import quantize
from hf_cd.quant.attention import ATTENTION_IMPLEMENTATION
from hf_cd.quant.config import (
    DEFAULT_ACTIVATION_PERCENTILES,
    DEFAULT_PROTOCOL,
    DEFAULT_WEIGHT_CLIP_RATIOS,
    PROTOCOLS,
    QuantConfig,
)
from hf_cd.quant.evaluate import DEFAULT_BITS, DEFAULT_PIPELINES, evaluate_accuracy, evaluate_quantized
from hf_cd.quant.inputs import CalibrationDataError
from hf_cd.quant.pipelines import FakeQuantPipeline
from hf_cd.quant.prepare import quantization_state
from hf_cd.quant.qat import QATConfig, convert, float_model, is_qat_model, prepare_qat, qat_init_pipelines
from hf_cd.quant.reconstruction_errors import measure_reconstruction_errors, reconstruction_report
from hf_cd.quant.registry import (
    PIPELINES,
    Pipeline,
    UnknownPipelineError,
    available_pipelines,
    get_pipeline,
    register_pipeline,
)
from hf_cd.quant.report import quantization_report
from hf_cd.quant.results import FULL_PRECISION, RESULT_COLUMNS, QuantResults, result_row
from hf_cd.quant.runtimes import (  # noqa: F401  (also registers onnxruntime-int8, torchao-int8, torchao-fp8)
    OnnxRuntimeInt8Config,
    RuntimeUnavailableError,
    TorchaoRuntimeConfig,
)
from hf_cd.quant.saving import load_quantized, save_quantized
from hf_cd.quant.sensitivity import SITE_GROUPS, plot_sensitivity, sensitivity, site_statistics

__all__ = [
    "ATTENTION_IMPLEMENTATION",
    "DEFAULT_ACTIVATION_PERCENTILES",
    "DEFAULT_BITS",
    "DEFAULT_PIPELINES",
    "DEFAULT_PROTOCOL",
    "DEFAULT_WEIGHT_CLIP_RATIOS",
    "FULL_PRECISION",
    "PIPELINES",
    "PROTOCOLS",
    "RESULT_COLUMNS",
    "SITE_GROUPS",
    "CalibrationDataError",
    "FakeQuantPipeline",
    "NoCalibrationDataError",
    "Pipeline",
    "QATConfig",
    "QuantConfig",
    "QuantParams",
    "QuantResults",
    "UnknownPipelineError",
    "available_pipelines",
    "convert",
    "evaluate_accuracy",
    "evaluate_quantized",
    "float_model",
    "get_pipeline",
    "is_qat_model",
    "load_quantized",
    "measure_reconstruction_errors",
    "plot_sensitivity",
    "prepare_qat",
    "qat_init_pipelines",
    "quantization_report",
    "quantization_state",
    "quantize",
    "reconstruction_report",
    "register_pipeline",
    "result_row",
    "save_quantized",
    "sensitivity",
    "site_statistics",
]
