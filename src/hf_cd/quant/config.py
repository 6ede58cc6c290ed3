"""`QuantConfig`: everything one post-training quantization run depends on, validated up front."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

from hf_cd.quant.quantizers import check_bits, is_float_bits

DEFAULT_ACTIVATION_PERCENTILES: tuple[float, ...] = (0.999, 0.9999, 0.99999)
"""RepQ-ViT's candidates for activation ranges (and for the log√2 quantizer's top level)."""

DEFAULT_WEIGHT_CLIP_RATIOS: tuple[float, ...] = tuple(round(1.0 - 0.01 * i, 2) for i in range(81))
"""Clipping ratios of a channel's absmax searched for weights: 1.00, 0.99, …, 0.20."""


@dataclass(frozen=True)
class QuantConfig:
    """How to quantize: bit widths, the pipeline, and calibration settings.

    Bits are ints in 2..8, or ≥ 16 to leave that part in floating point. ``w_bits`` / ``a_bits``
    cover the encoder (every block's linear weights and inputs, and the inputs of both attention
    matmuls); the patch embedding and the classifier(s) keep their own bits (weights and inputs),
    8 by default as in RepQ-ViT and PTQ4ViT.
    """

    w_bits: int = 8
    a_bits: int = 8
    pipeline: str = "repq"
    embedding_bits: int = 8
    classifier_bits: int = 8
    num_calibration: int = 32
    """Calibration images (RepQ-ViT uses 32), drawn at random with ``seed`` where the data allows."""
    seed: int = 0
    batch_size: int = 32
    """Images per forward pass, for calibration and evaluation."""
    activation_percentiles: tuple[float, ...] = DEFAULT_ACTIVATION_PERCENTILES
    weight_clip_ratios: tuple[float, ...] = DEFAULT_WEIGHT_CLIP_RATIOS
    sequential: bool = True
    """Calibrate block after block with the blocks before already quantized (as RepQ-ViT's single
    quantized calibration pass does); ``False`` calibrates every site at once on float activations."""
    progress: bool = True
    """Show tqdm progress bars over calibration and evaluation batches."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Options for pipelines registered later (e.g. GPTQ's damping); ignored by the built-in ones."""

    def __post_init__(self) -> None:
        for name in ("w_bits", "a_bits", "embedding_bits", "classifier_bits"):
            check_bits(name, getattr(self, name))
        from hf_cd.quant.registry import get_pipeline

        get_pipeline(self.pipeline)  # raises, listing the known pipelines
        for name in ("num_calibration", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}.")
        if not self.activation_percentiles or not all(0.5 < p <= 1.0 for p in self.activation_percentiles):
            raise ValueError(
                f"activation_percentiles must be a non-empty sequence of values in (0.5, 1], got "
                f"{self.activation_percentiles!r} (e.g. {DEFAULT_ACTIVATION_PERCENTILES})."
            )
        if not self.weight_clip_ratios or not all(0.0 < r <= 1.0 for r in self.weight_clip_ratios):
            raise ValueError(
                f"weight_clip_ratios must be a non-empty sequence of values in (0, 1], got {self.weight_clip_ratios!r}."
            )
        object.__setattr__(
            self, "activation_percentiles", tuple(float(p) for p in self.activation_percentiles)
        )
        object.__setattr__(self, "weight_clip_ratios", tuple(float(r) for r in self.weight_clip_ratios))

    @property
    def quantizes_activations(self) -> bool:
        """Whether any activation is quantized (and so calibration data is needed)."""
        return not all(is_float_bits(b) for b in (self.a_bits, self.embedding_bits, self.classifier_bits))

    @property
    def label(self) -> str:
        """``W4A4`` style name of the encoder bits (``W16A16`` etc. mean float)."""
        return f"W{self.w_bits}A{self.a_bits}"

    def replace(self, **changes: Any) -> QuantConfig:
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
