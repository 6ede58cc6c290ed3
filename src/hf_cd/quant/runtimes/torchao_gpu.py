"""``torchao-int8`` and ``torchao-fp8``: real int8 / float8 GPU kernels through torchao, against bf16.

torchao's ``quantize_`` swaps every eligible ``nn.Linear`` weight for a quantized tensor whose
matmul runs an int8 (``Int8DynamicActivationInt8WeightConfig``: per-token int8 activations, per-channel
int8 weights) or float8 (``Float8DynamicActivationFloat8WeightConfig`` with per-row scales, compute
capability ≥ 8.9: L4, H100, H200) kernel. The speed only appears under ``torch.compile``, which
fuses the dynamic activation quantization into the neighbouring kernels, so both the quantized and
the bf16 baseline are compiled the same way. The patch-embedding Conv stays bf16 (torchao
quantizes linears), and a classifier whose width is not a multiple of 16 (e.g. 1000 or 10 labels)
stays bf16 too; the row reports the bits that really ran.

torchao is imported lazily and is not a dependency of hf-cd (it must match the CUDA torch build):
``pip install 'hf-cd[gpu]'``. This module is exercised on a GPU machine, never in CPU CI.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from hf_cd.architectures import classifiers, unwrap_model
from hf_cd.quant.algorithms.quantizers import is_float_bits
from hf_cd.quant.config import BaseQuantConfig
from hf_cd.quant.evaluate import evaluate_accuracy
from hf_cd.quant.prepare import check_quantizable
from hf_cd.quant.runtimes.base import (
    RuntimePipeline,
    RuntimeUnavailableError,
    check_int8_bits,
    example_images,
    interleaved_median_ms,
    latency_columns,
    tile_images,
)

TORCHAO_EXTRA_KEY = "torchao"
"""The deprecated ``QuantConfig.extra[TORCHAO_EXTRA_KEY]`` held the torchao settings."""
BF16_BITS = 16
FP8_MIN_CAPABILITY = (8, 9)
LINEAR_MULTIPLE = 16
"""torchao's int8 (``torch._int_mm``) and float8 (``torch._scaled_mm``) matmuls want dims in multiples of 16."""


@dataclass(frozen=True)
class TorchaoConfig(BaseQuantConfig):
    """Device, compilation and timing, shared by `TorchaoInt8Config` and `TorchaoFloat8Config`."""

    extra_key: ClassVar[str] = TORCHAO_EXTRA_KEY

    device: str = "cuda"
    compile: bool = True
    compile_mode: str = "max-autotune"
    """torchao's recommended mode; ``"default"`` compiles faster."""
    latency_batch_size: int = 256
    latency_runs: int = 30
    latency_warmup: int = 5

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.latency_batch_size < 1 or self.latency_runs < 1 or self.latency_warmup < 0:
            raise ValueError(
                "latency_batch_size and latency_runs must be ≥ 1 and latency_warmup ≥ 0, got "
                f"{self.latency_batch_size}, {self.latency_runs}, {self.latency_warmup}."
            )


TorchaoRuntimeConfig = TorchaoConfig
"""Deprecated name of the settings (``QuantConfig(extra={"torchao": TorchaoRuntimeConfig(...)})``)."""


@dataclass(frozen=True)
class TorchaoInt8Config(TorchaoConfig):
    """``torchao-int8``: per-token dynamic int8 activations, per-channel int8 weights, on CUDA."""

    name: ClassVar[str] = "torchao-int8"


@dataclass(frozen=True)
class TorchaoFloat8Config(TorchaoConfig):
    """``torchao-fp8``: float8 (e4m3) with per-row scales, on compute capability ≥ 8.9."""

    name: ClassVar[str] = "torchao-fp8"


def require_torchao(pipeline: str, device: str = "cuda", float8: bool = False):
    """``torchao.quantization``, after checking there is a CUDA device (and fp8 support) to run it on."""
    if not torch.cuda.is_available():
        raise RuntimeUnavailableError(
            f"Pipeline {pipeline!r} runs torchao's GPU kernels and needs a CUDA device, but "
            f"torch.cuda.is_available() is False (torch {torch.__version__}). Run it on a GPU machine, or "
            "measure real int8 on the CPU with pipelines=('onnxruntime-int8',)."
        )
    if not torch.device(device).type == "cuda":
        raise RuntimeUnavailableError(
            f"Pipeline {pipeline!r} runs on a CUDA device; TorchaoConfig.device is {device!r}."
        )
    try:
        import torchao.quantization as torchao_quantization
    except ImportError as error:
        raise RuntimeUnavailableError(
            f"Pipeline {pipeline!r} needs torchao ({error}). Install the build matching your CUDA torch "
            f"{torch.__version__}: pip install 'hf-cd[gpu]'  (or pip install torchao)."
        ) from error
    if float8:
        capability = torch.cuda.get_device_capability(torch.device(device))
        if capability < FP8_MIN_CAPABILITY:
            raise RuntimeUnavailableError(
                f"Pipeline {pipeline!r} needs float8 tensor cores (compute capability ≥ 8.9: L4, H100, H200); "
                f"{torch.cuda.get_device_name(torch.device(device))} is sm_{capability[0]}{capability[1]}. "
                "Use torchao-int8 instead."
            )
    return torchao_quantization


class TorchaoPipeline(RuntimePipeline):
    """Shared skeleton: bf16 CUDA copy, ``quantize_`` with the subclass's config, ``torch.compile``."""

    runtime = "torchao"
    float8 = False

    def require(self, config: TorchaoConfig):
        """``torchao.quantization``, once torchao, the device and (for float8) its compute capability check out."""
        return require_torchao(self.name, config.device, self.float8)

    def torchao_config(self, torchao_quantization) -> Any:
        raise NotImplementedError

    def _bf16_copy(self, model: nn.Module, settings: TorchaoConfig) -> nn.Module:
        check_quantizable(model)
        return copy.deepcopy(unwrap_model(model)).to(device=settings.device, dtype=torch.bfloat16).eval()

    def _compiled(self, model: nn.Module, settings: TorchaoConfig) -> nn.Module:
        return torch.compile(model, mode=settings.compile_mode) if settings.compile else model

    def quantize_copy(self, model: nn.Module, config: TorchaoConfig) -> tuple[nn.Module, int]:
        """The quantized, compiled copy and the classifier bits that really ran (8, or 16 if left bf16)."""
        settings = config
        check_int8_bits(self.name, config)
        torchao_quantization = self.require(config)
        quantized = self._bf16_copy(model, settings)
        heads = {id(head) for head in classifiers(quantized).values()}
        quantized_heads: list[str] = []

        def eligible(module: nn.Module, name: str) -> bool:
            if not isinstance(module, nn.Linear):
                return False
            if module.in_features % LINEAR_MULTIPLE or module.out_features % LINEAR_MULTIPLE:
                return False
            if id(module) in heads:
                if is_float_bits(config.classifier_bits):
                    return False
                quantized_heads.append(name)
            return True

        torchao_quantization.quantize_(
            quantized, self.torchao_config(torchao_quantization), filter_fn=eligible
        )
        classifier_bits = 8 if quantized_heads and len(quantized_heads) == len(heads) else BF16_BITS
        return self._compiled(quantized, settings), classifier_bits

    def __call__(
        self, model: nn.Module, config: TorchaoConfig, calibration_images: torch.Tensor | None
    ) -> nn.Module:
        return self.quantize_copy(model, config)[0]

    def evaluate(
        self,
        model: nn.Module,
        config: TorchaoConfig,
        calibration_images: torch.Tensor | None,
        eval_data: Any,
    ) -> dict[str, Any]:
        settings = config
        start = time.perf_counter()
        quantized, classifier_bits = self.quantize_copy(model, config)
        quantize_seconds = time.perf_counter() - start
        baseline = self._compiled(self._bf16_copy(model, settings), settings)
        description = f"{self.name} {config.label} eval"
        start = time.perf_counter()
        accuracy, count = evaluate_accuracy(
            quantized, eval_data, config.batch_size, config.progress, description
        )
        eval_seconds = time.perf_counter() - start  # includes torch.compile's first-call compilation
        float_accuracy, _ = evaluate_accuracy(
            baseline, eval_data, config.batch_size, config.progress, "bf16 eval"
        )
        if calibration_images is None:  # nothing to calibrate; time on seeded random images
            calibration_images = example_images(unwrap_model(model), 8, seed=config.seed)
        batch_size = settings.latency_batch_size
        images = tile_images(calibration_images, batch_size).to(settings.device, torch.bfloat16)
        device = torch.device(settings.device)

        def runner(module: nn.Module):
            def run() -> None:
                with torch.inference_mode():
                    module(pixel_values=images)
                torch.cuda.synchronize(device)

            return run

        latency = interleaved_median_ms(
            {"float": runner(baseline), "quantized": runner(quantized)},
            runs=settings.latency_runs,
            warmup=settings.latency_warmup,
        )
        return {
            "w_bits": 8,
            "a_bits": 8,
            "embedding_bits": BF16_BITS,
            "classifier_bits": classifier_bits,
            "accuracy": accuracy,
            "num_eval": count,
            "num_calibration": 0,  # dynamic quantization: scales come from each batch, nothing is calibrated
            "quantize_seconds": quantize_seconds,
            "eval_seconds": eval_seconds,
            "float_accuracy": float_accuracy,
            **latency_columns({batch_size: latency}),
            "throughput_images_per_s": round(batch_size / (latency["quantized"] / 1e3), 1),
            "float_throughput_images_per_s": round(batch_size / (latency["float"] / 1e3), 1),
        }


class TorchaoInt8Pipeline(TorchaoPipeline):
    """W8A8 int8: per-token dynamic activations, per-channel weights (torchao's ``Int8DynamicActivationInt8WeightConfig``)."""

    name = "torchao-int8"
    activation_mode = "dynamic_per_token"
    description = "torchao Int8DynamicActivationInt8WeightConfig + torch.compile, CUDA"

    def torchao_config(self, torchao_quantization) -> Any:
        return torchao_quantization.Int8DynamicActivationInt8WeightConfig()


class TorchaoFloat8Pipeline(TorchaoPipeline):
    """W8A8 float8 (e4m3) with per-row scales, on compute capability ≥ 8.9."""

    name = "torchao-fp8"
    activation_mode = "dynamic_per_token"
    description = "torchao Float8DynamicActivationFloat8WeightConfig(PerRow) + torch.compile, CUDA sm_89+"
    float8 = True

    def torchao_config(self, torchao_quantization) -> Any:
        return torchao_quantization.Float8DynamicActivationFloat8WeightConfig(
            granularity=torchao_quantization.PerRow()
        )
