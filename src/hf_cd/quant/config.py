"""`BaseQuantConfig`: the settings every quantization method shares, validated up front.

Each method has its own frozen config that adds its options (`hf_cd.quant.method_configs`; the
runtimes' beside them); `quantize` dispatches on the config's type.
"""

from __future__ import annotations

import difflib
import inspect
import re
from dataclasses import dataclass, field, fields, replace
from typing import Any, ClassVar

from hf_cd.quant.algorithms.quantizers import check_bits, is_float_bits

DEFAULT_ACTIVATION_PERCENTILES: tuple[float, ...] = (0.999, 0.9999, 0.99999)
"""RepQ-ViT's candidates for activation ranges and for the log√2 quantizer's top level (its weight rows
use the same ones: ``repq_weight_percentiles``)."""

DEFAULT_WEIGHT_CLIP_RATIOS: tuple[float, ...] = tuple(round(1.0 - 0.01 * i, 2) for i in range(81))
"""Clipping ratios of a channel's absmax searched for symmetric weights: 1.00, 0.99, …, 0.20 (ours;
RepQ-ViT searches asymmetric per-row percentiles instead, see ``repq``)."""

DEFAULT_PROTOCOL = "deploy"
PROTOCOLS: dict[str, str] = {
    "deploy": "patch embedding and classifier weights and inputs at embedding_bits / classifier_bits "
    "(8 by default), what an integer runtime deploys",
    "repq_vit": "RepQ-ViT's published bit assignment: patch-embedding weight at w_bits and its input at "
    "8 bits, classifier weight at w_bits and its input at a_bits",
}
"""Bit protocols: which bits the patch embedding and the classifier get. Every result row names its
protocol, so no number is compared with a paper's measured under another assignment."""


def check_option(options: Any, condition: bool, key: str, expected: str) -> None:
    """Raise, naming the config's field, its value and what it must be, unless ``condition``.

    Shared by every method's config, so a bad option reads the same whichever method owns it.
    """
    if not condition:
        spelt = {name: spec_key for spec_key, name in type(options).spec_keys().items()}.get(key)
        where = f"{type(options).__name__}.{key}" + (f" ({spelt})" if spelt else "")
        raise ValueError(f"{where} must be {expected}, got {getattr(options, key)!r}.")


_BITS_TEXT = re.compile(r"[Ww]?\s*(\d+)\s*(?:,|[Aa]|,\s*[Aa])\s*(\d+)")
"""Every spelling of a bits pair that hf-cd accepts: ``W4A8``, ``w4a8``, ``4,8``, ``W4,A8``."""


def parse_bits(entry: Any) -> tuple[int, int]:
    """``"W4A8"`` / ``"w4a8"`` / ``"4,8"`` or ``(4, 8)`` → ``(4, 8)``: encoder weight and activation bits.

    The one parser behind the recipe's ``--quant_bits``, ``python -m hf_cd.quant --bits`` and the API,
    so every spelling works everywhere; each width is checked (`check_bits`) here, before any work.
    """
    from hf_cd.quant.algorithms.quantizers import check_bits

    pair = None
    if isinstance(entry, str):
        match = _BITS_TEXT.fullmatch(entry.strip())
        if match:
            pair = int(match.group(1)), int(match.group(2))
    elif (
        isinstance(entry, (tuple, list))
        and len(entry) == 2
        and all(isinstance(b, int) and not isinstance(b, bool) for b in entry)
    ):
        pair = int(entry[0]), int(entry[1])
    if pair is None:
        raise ValueError(
            f"{entry!r} is not a bits entry: write WxAy (e.g. W4A4, w4a8), x,y (e.g. 4,4) or a (w_bits, a_bits) pair."
        )
    return check_bits(f"{entry!r}: w_bits", pair[0]), check_bits(f"{entry!r}: a_bits", pair[1])


def parse_bits_list(bits: Any) -> list[tuple[int, int]]:
    """A list of bits entries (`parse_bits`); a single entry (``"W4A4"`` or ``(4, 4)``) is a list of one."""
    if isinstance(bits, str) or (
        isinstance(bits, (tuple, list)) and len(bits) == 2 and all(isinstance(b, int) for b in bits)
    ):
        bits = [bits]
    return [parse_bits(entry) for entry in bits]


REPQ_VIT_EMBEDDING_INPUT_BITS = 8
"""RepQ-ViT's ``QuantConv2d`` keeps the patch embedding's input (the pixels) at 8 bits whatever a_bits is."""


@dataclass(frozen=True)
class BaseQuantConfig:
    """The shared settings of every method: bit widths, bit protocol and calibration.

    Bits are ints in 2..8, or ≥ 16 to leave that part in floating point. ``w_bits`` / ``a_bits``
    cover the encoder (every block's linear weights and inputs, and the inputs of both attention
    matmuls). The patch embedding and the classifier(s) follow ``protocol``: under ``deploy`` they
    keep ``embedding_bits`` / ``classifier_bits`` (weights and inputs, 8 by default); under
    ``repq_vit`` they follow RepQ-ViT's published protocol (weights at ``w_bits``, the embedding's
    input at 8 and the classifier's at ``a_bits``), and those two fields must stay at 8.
    """

    w_bits: int = 8
    a_bits: int = 8
    embedding_bits: int = 8
    classifier_bits: int = 8
    num_calibration: int = 32
    """Calibration images (RepQ-ViT uses 32), drawn at random with ``seed`` where the data allows."""
    seed: int = 0
    batch_size: int = 32
    """Images per forward pass, for calibration and evaluation."""
    activation_percentiles: tuple[float, ...] = DEFAULT_ACTIVATION_PERCENTILES
    weight_clip_ratios: tuple[float, ...] = field(default=DEFAULT_WEIGHT_CLIP_RATIOS, repr=False)
    sequential: bool = True
    """Calibrate block after block with the blocks before already quantized (as RepQ-ViT's single
    quantized calibration pass does); ``False`` calibrates every site at once on float activations."""
    progress: bool = True
    """Show tqdm progress bars over calibration and evaluation batches."""
    protocol: str = DEFAULT_PROTOCOL
    """Bit protocol of the patch embedding and classifier, one of `PROTOCOLS`; recorded in every result row."""
    activation_include_zero: bool = True
    """Per-tensor asymmetric activation ranges (every pipeline) are widened to contain 0, so the
    zero-point is an integer code in range and 0 is exact (what integer kernels need). ``False``
    fits the range as RepQ-ViT does; that differs only where the range excludes 0, and there the
    zero-point falls outside the codes. ``minmax``/``percentile``/``repq``/reconstruction alike."""
    weight_prefix_tokens: bool | None = None
    """Make the percentile range search of the block activations (the linear inputs) prefix-aware:
    each prefix token (CLS; DeiT's distillation token) counts as much as all patch tokens together,
    and ranges widened to cover the prefix tokens are among the candidates. A plain per-tensor
    squared error weighs the CLS token 1/N and clips its rare large values, which are what the
    classifier reads (on the pretrained DINOv2-S, most clipped fc2 inputs sit in the CLS token;
    bench/results/ptq_anomaly.md). ``None``: the pipeline's default, on for ``percentile`` (ours)
    and off for ``repq`` (RepQ-ViT does not do it; ``True`` is our improvement of it). Pipelines
    that never clip (``minmax``, ``per_tensor``) ignore it."""

    def __post_init__(self) -> None:
        for name in ("w_bits", "a_bits", "embedding_bits", "classifier_bits"):
            check_bits(name, getattr(self, name))
        if self.protocol not in PROTOCOLS:
            close = difflib.get_close_matches(str(self.protocol), list(PROTOCOLS), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ValueError(
                f"Unknown protocol {self.protocol!r}.{hint} Known: "
                + "; ".join(f"{name!r} ({what})" for name, what in PROTOCOLS.items())
                + "."
            )
        if self.protocol == "repq_vit" and (self.embedding_bits, self.classifier_bits) != (8, 8):
            raise ValueError(
                "protocol='repq_vit' sets the patch embedding and classifier bits itself (weights at w_bits, "
                "inputs at 8 and a_bits); leave embedding_bits and classifier_bits at 8, or use "
                f"protocol='deploy' to choose them (got {self.embedding_bits} and {self.classifier_bits})."
            )
        if self.weight_prefix_tokens is not None and not isinstance(self.weight_prefix_tokens, bool):
            raise TypeError(
                f"weight_prefix_tokens must be True, False or None, got {self.weight_prefix_tokens!r}."
            )
        if not isinstance(self.activation_include_zero, bool):
            raise TypeError(f"activation_include_zero must be a bool, got {self.activation_include_zero!r}.")
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
    def embedding_weight_bits(self) -> int:
        """Bits of the patch-embedding weight under `protocol`."""
        return self.w_bits if self.protocol == "repq_vit" else self.embedding_bits

    @property
    def embedding_input_bits(self) -> int:
        """Bits of the patch-embedding input (the pixels) under `protocol`."""
        return REPQ_VIT_EMBEDDING_INPUT_BITS if self.protocol == "repq_vit" else self.embedding_bits

    @property
    def classifier_weight_bits(self) -> int:
        """Bits of the classifier weight(s) under `protocol`."""
        return self.w_bits if self.protocol == "repq_vit" else self.classifier_bits

    @property
    def classifier_input_bits(self) -> int:
        """Bits of the classifier input(s) under `protocol`."""
        return self.a_bits if self.protocol == "repq_vit" else self.classifier_bits

    @property
    def quantizes_activations(self) -> bool:
        """Whether any activation is quantized (and so calibration data is needed)."""
        bits = (self.a_bits, self.embedding_input_bits, self.classifier_input_bits)
        return not all(is_float_bits(b) for b in bits)

    @property
    def label(self) -> str:
        """``W4A4`` style name of the encoder bits (``W16A16`` etc. mean float)."""
        return f"W{self.w_bits}A{self.a_bits}"

    name: ClassVar[str] = ""
    """The method's name as the CLI and YAML spell it (``"repq"``), and its rows' ``pipeline``."""
    option_prefix: ClassVar[str] = ""
    """Prefix of the option keys of the fields this class declares, in the spelling ``NAME:key=value``
    (``"repq_"``: `RepQConfig.weights` is ``repq_weights``); inherited fields keep their class's prefix."""
    spec_prefixes: ClassVar[tuple[str, ...]] = ()
    """Every prefix of this method's option keys: a misspelt key with one of them is an error, while
    keys of other methods are left to them (the options of the deprecated ``QuantConfig.extra``).
    Left out, it is ``(option_prefix,)`` (`__init_subclass__`); a family of methods declares all of theirs."""
    spec_renames: ClassVar[dict[str, str]] = {}
    """Fields whose option key is not prefix + field name (``{"rotation_seed": "rotate_seed"}``)."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if not cls.spec_prefixes and cls.option_prefix:
            cls.spec_prefixes = (cls.option_prefix,)

    def replace(self, **changes: Any) -> BaseQuantConfig:
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)

    def shared(self) -> dict[str, Any]:
        """The shared settings (this class's fields that `BaseQuantConfig` declares), as keyword arguments."""
        return {name: getattr(self, name) for name in SHARED_FIELDS}

    def options(self) -> dict[str, Any]:
        """The method's own options: every field `BaseQuantConfig` does not declare."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in SHARED_FIELDS}

    def with_shared(self, source: BaseQuantConfig) -> BaseQuantConfig:
        """This config with ``source``'s shared settings: how a composed method runs its parts."""
        values = source.shared()
        return self if values == self.shared() else replace(self, **values)

    @classmethod
    def spec_keys(cls) -> dict[str, str]:
        """``{option key: field name}`` of this method's options in the spelling ``NAME:key=value``."""
        names = {f.name for f in fields(cls)} - set(SHARED_FIELDS)
        keys = {}
        for klass in reversed(cls.__mro__):
            prefix = klass.__dict__.get("option_prefix", "")
            for name in inspect.get_annotations(klass):
                if name in names:
                    keys[cls.spec_renames.get(name, prefix + name)] = name
        return keys


SHARED_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(BaseQuantConfig))
"""The fields every method's config shares (and a composed method hands to its parts)."""
