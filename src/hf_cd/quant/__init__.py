"""Post-training quantization of Hugging Face ViT / DeiT / Dinov2 models, to measure what CD buys.

One verb and one frozen config per method (torchao's shape); a new model is returned and the input
is never changed::

    from hf_cd.quant import GPTAQConfig, RepQConfig, RotateConfig, evaluate_quantized, quantize

    qmodel = quantize(model, RepQConfig(w_bits=4, a_bits=4), calib_images)
    rotated = quantize(model, RotateConfig(w_bits=4, a_bits=4, solver=GPTAQConfig(), activations="dynamic_per_token"), calib_images)
    table = evaluate_quantized(model, (x_test, y_test), x_train, ["repq", "rotate_gptaq"], bits=("W8A8", "W4A4"))
    print(table.to_markdown())

Methods: `MinMaxConfig`, `PercentileConfig`, `RepQConfig` (RepQ-ViT), `PerTensorConfig`; the
reconstructions `GPTQConfig`, `GPTAQConfig`, `MARRConfig`, `MARRGridConfig` (encoder weights solved
layer by layer); `RotateConfig` (rotation-based PTQ, any of those as its ``solver``); and the real
runtimes `OnnxRuntimeInt8Config`, `TorchaoInt8Config`, `TorchaoFloat8Config`. Every config shares
`BaseQuantConfig`'s fields: the "fully quantized ViT" setting, every encoder linear (weights and
inputs), both attention matmuls' inputs, and the patch embedding and classifier at 8 bits by default
(``protocol="deploy"``; ``protocol="repq_vit"`` is RepQ-ViT's published bit assignment). The CLI /
YAML spelling ``"rotate_gptaq:rotate_activations=dynamic_per_token"`` parses into the same config
(`parse_quant_spec`); add a method with `register_handler`. ``QuantConfig(pipeline=..., extra=...)``
still works for one release, with a DeprecationWarning.
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
    BaseQuantConfig,
)
from hf_cd.quant.evaluate import DEFAULT_BITS, DEFAULT_PIPELINES, evaluate_accuracy, evaluate_quantized
from hf_cd.quant.inputs import CalibrationDataError
from hf_cd.quant.method_configs import (
    GPTAQConfig,
    GPTQConfig,
    MARRConfig,
    MARRGridConfig,
    MinMaxConfig,
    PercentileConfig,
    PerTensorConfig,
    RepQConfig,
    RotateConfig,
)
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
    pipeline_for,
    register_handler,
    register_pipeline,
)
from hf_cd.quant.report import quantization_report
from hf_cd.quant.results import FULL_PRECISION, RESULT_COLUMNS, QuantResults, result_row
from hf_cd.quant.runtimes import (  # noqa: F401  (also registers onnxruntime-int8, torchao-int8, torchao-fp8)
    OnnxRuntimeInt8Config,
    RuntimeUnavailableError,
    TorchaoFloat8Config,
    TorchaoInt8Config,
    TorchaoRuntimeConfig,
)
from hf_cd.quant.saving import load_quantized, save_quantized
from hf_cd.quant.sensitivity import SITE_GROUPS, plot_sensitivity, sensitivity, site_statistics
from hf_cd.quant.spec import QuantConfig, config_to_spec, parse_quant_spec

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
    "BaseQuantConfig",
    "CalibrationDataError",
    "FakeQuantPipeline",
    "GPTAQConfig",
    "GPTQConfig",
    "MARRConfig",
    "MARRGridConfig",
    "MinMaxConfig",
    "NoCalibrationDataError",
    "OnnxRuntimeInt8Config",
    "PerTensorConfig",
    "PercentileConfig",
    "Pipeline",
    "QATConfig",
    "QuantConfig",
    "QuantParams",
    "QuantResults",
    "RepQConfig",
    "RotateConfig",
    "TorchaoFloat8Config",
    "TorchaoInt8Config",
    "UnknownPipelineError",
    "available_pipelines",
    "config_to_spec",
    "convert",
    "evaluate_accuracy",
    "evaluate_quantized",
    "float_model",
    "get_pipeline",
    "is_qat_model",
    "load_quantized",
    "measure_reconstruction_errors",
    "parse_quant_spec",
    "pipeline_for",
    "plot_sensitivity",
    "prepare_qat",
    "qat_init_pipelines",
    "quantization_report",
    "quantization_state",
    "quantize",
    "reconstruction_report",
    "register_handler",
    "register_pipeline",
    "result_row",
    "save_quantized",
    "sensitivity",
    "site_statistics",
]
