"""What the real-runtime pipelines share: the error they raise, the evaluate hook, and latency timing.

A runtime pipeline honours the registry's call contract (``pipeline(model, config, images)``
returns a model whose forward gives ``.logits``), and adds `RuntimePipeline.evaluate`, which
`evaluate_quantized` calls instead of its own loop: a real runtime must time itself against its
own float baseline (same runtime, same threads), which a returned ``nn.Module`` cannot do.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from hf_cd.quant.algorithms.quantizers import is_float_bits
from hf_cd.quant.config import DEFAULT_PROTOCOL, BaseQuantConfig
from hf_cd.quant.registry import Pipeline


class RuntimeUnavailableError(RuntimeError):
    """A real runtime that cannot run here (missing package or device); the message says the fix."""


class RuntimePipeline(Pipeline):
    """Base of the real-runtime pipelines; subclasses set ``name``, ``runtime`` and implement both methods."""

    runtime: str = ""

    def check(self, config: BaseQuantConfig) -> None:
        """Refuse a config this runtime cannot run, and say why, before any work is done.

        `evaluate_quantized` checks every row first, so a W4A4 row for an 8-bit runtime fails
        at once instead of after the rows before it. The default: 8-bit kernels and the runtime present.
        """
        check_int8_bits(self.name, config)
        self.require(config)

    def require(self, config: BaseQuantConfig) -> None:
        """Raise `RuntimeUnavailableError` (with the fix) when the runtime cannot run here."""

    activation_mode: str = "static_per_tensor"
    """How the runtime quantizes activations, recorded in every row (`hf_cd.quant.results`)."""

    def row_fields(self, config: BaseQuantConfig) -> dict[str, Any]:
        return {"activation_mode": self.activation_mode}


def check_int8_bits(pipeline: str, config: BaseQuantConfig, float_parts_allowed: bool = True) -> None:
    """Integer kernels come in one width: refuse other bits instead of silently running 8-bit ones."""
    if config.w_bits != 8 or config.a_bits != 8:
        raise ValueError(
            f"Pipeline {pipeline!r} runs real 8-bit integer kernels, so it measures W8A8 only; got "
            f"{config.label}. Evaluate other bit widths with the fake-quant pipelines (e.g. "
            f"pipelines=('repq',)) and {pipeline!r} in a call with bits=((8, 8),)."
        )
    if config.protocol != DEFAULT_PROTOCOL:
        raise ValueError(
            f"Pipeline {pipeline!r} runs the patch embedding and classifier as a runtime deploys them "
            f"(protocol='deploy'), not under protocol={config.protocol!r}; measure that protocol with the "
            "fake-quant pipelines."
        )
    for name in ("embedding_bits", "classifier_bits"):
        bits = getattr(config, name)
        if bits != 8 and not (float_parts_allowed and is_float_bits(bits)):
            raise ValueError(
                f"Pipeline {pipeline!r} runs {name} at 8 bits or leaves that layer float (≥ 16); got {bits}."
            )


def interleaved_median_ms(
    runners: Mapping[str, Callable[[], None]],
    runs: int,
    warmup: int,
    samples_ms: dict[str, list[float]] | None = None,
) -> dict[str, float]:
    """Median wall time in milliseconds of each runner, run in alternating rounds.

    Alternating float and int8 calls in every round means CPU frequency changes and other
    processes on a shared machine hit both alike, so their ratio stays meaningful. Pass a dict as
    ``samples_ms`` to get every round's times too (per-round ratios show the spread).
    """
    if runs < 1 or warmup < 0:
        raise ValueError(f"runs must be ≥ 1 and warmup ≥ 0, got runs={runs}, warmup={warmup}.")
    for _ in range(warmup):
        for run in runners.values():
            run()
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(runs):
        for name, run in runners.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    if samples_ms is not None:
        samples_ms.update({name: [1e3 * value for value in values] for name, values in times.items()})
    return {name: 1e3 * statistics.median(values) for name, values in times.items()}


def latency_columns(
    latencies_ms: Mapping[int, Mapping[str, float]], quantized: str = "quantized", float_: str = "float"
) -> dict[str, float | int]:
    """``latency_ms_batch<B>``, ``float_latency_ms_batch<B>``, ``speedup_vs_float_batch<B>`` per batch
    size, and ``speedup_vs_float`` at the largest batch (the throughput figure a card quotes)."""
    columns: dict[str, float | int] = {}
    for batch, measured in sorted(latencies_ms.items()):
        columns[f"latency_ms_batch{batch}"] = round(measured[quantized], 4)
        columns[f"float_latency_ms_batch{batch}"] = round(measured[float_], 4)
        columns[f"speedup_vs_float_batch{batch}"] = round(measured[float_] / measured[quantized], 4)
    largest = max(latencies_ms)
    columns["speedup_vs_float"] = columns[f"speedup_vs_float_batch{largest}"]
    return columns


def tile_images(images: torch.Tensor, batch_size: int) -> torch.Tensor:
    """A batch of exactly ``batch_size`` images, repeating the given ones (speed does not depend on which)."""
    repeats = -(-batch_size // images.shape[0])
    return images.repeat(repeats, *([1] * (images.ndim - 1)))[:batch_size].contiguous()


def example_images(model: nn.Module, count: int, seed: int = 0) -> torch.Tensor:
    """``count`` seeded random images of the model's input size (for export and timing, not accuracy)."""
    config = model.config
    size = config.image_size
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(count, config.num_channels, height, width, generator=generator)
