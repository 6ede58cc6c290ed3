"""One frozen config per fake-quant method: the shared settings (`BaseQuantConfig`) plus its own options.

``quantize(model, RepQConfig(w_bits=4, a_bits=4), images)`` runs RepQ-ViT; the type says which
pipeline runs (`hf_cd.quant.registry`). A composed method receives its parts as configs:
``RotateConfig(solver=GPTAQConfig(alpha=0.25), activations="dynamic_per_token")``, or
``GPTQConfig(activations=RepQConfig())``. A part runs with the shared settings of the config that
holds it (its own bits, seed, … are ignored), as the one-config spelling always did.

The CLI / YAML spelling ``NAME:key=value,...`` (``rotate_gptaq:rotate_activations=dynamic_per_token``)
names each option by a prefix and the field (``repq_weights`` is `RepQConfig.weights`); it is
parsed in one place, `hf_cd.quant.spec.parse_quant_spec`. What each option does: the pipeline's
module (`hf_cd.quant.pipelines.repq`, `.rotate`, `.reconstruction`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, ClassVar

from hf_cd.quant.algorithms.gptaq import DEFAULT_ALPHA
from hf_cd.quant.algorithms.marr import DEFAULT_GRID
from hf_cd.quant.config import DEFAULT_ACTIVATION_PERCENTILES, BaseQuantConfig, check_option


def _floats(config: BaseQuantConfig, *names: str) -> None:
    """Store sequence options as tuples of floats (lists from YAML / JSON compare equal to the defaults)."""
    for name in names:
        value = getattr(config, name)
        if isinstance(value, (list, tuple)):
            object.__setattr__(config, name, tuple(float(v) for v in value))


def _one_of(config: BaseQuantConfig, name: str, choices: tuple) -> None:
    check_option(config, getattr(config, name) in choices, name, " or ".join(map(repr, choices)))


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


# --- the fake-quant methods with round-to-nearest weights ---------------------------------------------


@dataclass(frozen=True)
class MinMaxConfig(BaseQuantConfig):
    """``minmax``: per-channel symmetric weights, per-tensor min/max asymmetric activations."""

    name: ClassVar[str] = "minmax"


@dataclass(frozen=True)
class PerTensorConfig(BaseQuantConfig):
    """``per_tensor``: per-tensor AbsMax symmetric weights and activations."""

    name: ClassVar[str] = "per_tensor"


PERCENTILE_WEIGHT_SCHEMES: dict[str, str] = {
    "asymmetric": "per-row [quantile(1 − p), quantile(p)], p of least squared error (2^b levels)",
    "symmetric": "narrow-range symmetric per row, clip ratio of the absmax from weight_clip_ratios",
}


@dataclass(frozen=True)
class PercentileConfig(BaseQuantConfig):
    """``percentile``: MSE-percentile ranges for weights (per row) and activations (per tensor)."""

    option_prefix: ClassVar[str] = "percentile_"
    name: ClassVar[str] = "percentile"

    weights: str = "asymmetric"
    """One of `PERCENTILE_WEIGHT_SCHEMES`; ``symmetric`` is the earlier default."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.weights not in PERCENTILE_WEIGHT_SCHEMES:
            raise ValueError(
                "PercentileConfig.weights (percentile_weights) must be one of "
                + "; ".join(f"{name!r} ({what})" for name, what in PERCENTILE_WEIGHT_SCHEMES.items())
                + f", got {self.weights!r}."
            )


REPQ_WEIGHT_SCHEMES = ("asymmetric", "symmetric")
REPQ_POST_LAYERNORM_TARGETS = ("mean", "recalibrate")


@dataclass(frozen=True)
class RepQConfig(BaseQuantConfig):
    """``repq``: RepQ-ViT; the defaults are its reference code's (the table: `hf_cd.quant.pipelines.repq`)."""

    option_prefix: ClassVar[str] = "repq_"
    name: ClassVar[str] = "repq"

    weights: str = "asymmetric"
    weight_percentiles: tuple[float, ...] = DEFAULT_ACTIVATION_PERCENTILES
    post_layernorm: str = "mean"
    log_zero_code: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        _floats(self, "weight_percentiles")
        check = functools.partial(check_option, self)
        _one_of(self, "weights", REPQ_WEIGHT_SCHEMES)
        check(
            len(self.weight_percentiles) > 0 and all(0.5 < p <= 1.0 for p in self.weight_percentiles),
            "weight_percentiles",
            "a non-empty sequence of values in (0.5, 1]",
        )
        _one_of(self, "post_layernorm", REPQ_POST_LAYERNORM_TARGETS)
        check(isinstance(self.log_zero_code, bool), "log_zero_code", "a bool")


# --- rotation ------------------------------------------------------------------------------------------

ROTATE_ACTIVATION_MODES = ("static_per_tensor", "dynamic_per_token")


@dataclass(frozen=True)
class RotateConfig(BaseQuantConfig):
    """``rotate``: rotation-based PTQ (QuaRot / SpinQuant for ViTs); ``solver`` solves the weights.

    ``solver=None`` rounds to nearest (``rotate``); a `GPTQConfig` or `GPTAQConfig` runs that
    reconstruction with this rotation as its activation method (``rotate_gptq`` / ``rotate_gptaq``).
    """

    option_prefix: ClassVar[str] = "rotate_"
    spec_renames: ClassVar[dict[str, str]] = {"rotation_seed": "rotate_seed"}

    solver: GPTQConfig | None = None
    activations: str = "static_per_tensor"
    """``static_per_tensor`` (calibrated) or ``dynamic_per_token`` (QuaRot's per-token ranges at run time)."""
    residual: bool = True
    fc2_online: bool = True
    value_output: bool = True
    query_key: bool = False
    rotation_seed: int | None = None
    """Seed of the random signs (``None``: the shared ``seed``)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check = functools.partial(check_option, self)
        check(
            self.solver is None or type(self.solver) in ROTATE_SOLVERS,
            "solver",
            "None (round to nearest), GPTQConfig(...) or GPTAQConfig(...)",
        )
        _one_of(self, "activations", ROTATE_ACTIVATION_MODES)
        for key in ("residual", "fc2_online", "value_output", "query_key"):
            check(isinstance(getattr(self, key), bool), key, "a bool")
        check(
            self.rotation_seed is None
            or (isinstance(self.rotation_seed, int) and not isinstance(self.rotation_seed, bool)),
            "rotation_seed",
            "an int or None",
        )

    @property
    def name(self) -> str:  # type: ignore[override]
        return ROTATE_NAMES[type(self.solver)]

    @property
    def solver_name(self) -> str:
        """``rtn``, ``gptq`` or ``gptaq``: what every result row records as ``weight_solver``."""
        return "rtn" if self.solver is None else self.solver.name

    @property
    def rotations(self) -> str:
        """The rotations switched on, e.g. ``residual+fc2_online+value_output`` (``none``: folding only)."""
        names = [
            name
            for name, on in (
                ("residual", self.residual),
                ("fc2_online", self.fc2_online),
                ("value_output", self.value_output),
                ("query_key", self.query_key),
            )
            if on
        ]
        return "+".join(names) or "none"


# --- reconstruction: weights solved layer by layer --------------------------------------------------


@dataclass(frozen=True)
class GPTQConfig(BaseQuantConfig):
    """``gptq``: GPTQ encoder weights; ``activations`` is the fake-quant method of everything else."""

    option_prefix: ClassVar[str] = "gptq_"
    name: ClassVar[str] = "gptq"
    spec_prefixes: ClassVar[tuple[str, ...]] = ("gptq_", "gptaq_", "marr_")

    activations: BaseQuantConfig = field(default_factory=PercentileConfig)
    """The method whose observers calibrate the activations and which quantizes the patch embedding
    and classifier (and RepQ's reparameterization, rotate's rotations): a `PercentileConfig`,
    `MinMaxConfig`, `RepQConfig`, `PerTensorConfig` or a `RotateConfig` without solver."""
    damp: float = 0.01
    block_size: int = 128
    group_size: int | None = None
    act_order: bool = False
    clip_search: bool = True
    precision: str = "float64"

    def __post_init__(self) -> None:
        super().__post_init__()
        check = functools.partial(check_option, self)
        check(
            isinstance(self.activations, BaseQuantConfig)
            and not isinstance(self.activations, GPTQConfig)
            and not (isinstance(self.activations, RotateConfig) and self.activations.solver is not None),
            "activations",
            "a fake-quant activation pipeline's config, e.g. PercentileConfig(), MinMaxConfig() or RepQConfig() "
            "(not another reconstruction, nor a RotateConfig with a solver)",
        )
        check(isinstance(self.damp, (int, float)) and self.damp >= 0, "damp", "a number ≥ 0")
        check(_positive_int(self.block_size), "block_size", "a positive int")
        check(
            self.group_size is None or _positive_int(self.group_size), "group_size", "None or a positive int"
        )
        check(isinstance(self.act_order, bool), "act_order", "a bool")
        check(isinstance(self.clip_search, bool), "clip_search", "a bool")
        _one_of(self, "precision", ("float32", "float64"))

    def activation_config(self) -> BaseQuantConfig:
        """The activation method's config with this config's shared settings (what its pipeline runs with)."""
        return self.activations.with_shared(self)

    def holdout_fraction(self) -> float | None:
        """Share of calibration images an α search measures on (``None``: no α search, or all of them)."""
        return None


@dataclass(frozen=True)
class GPTAQConfig(GPTQConfig):
    """``gptaq``: GPTQ fitted to the float layer on float inputs, the residual term scaled by one global α."""

    option_prefix: ClassVar[str] = "gptaq_"
    name: ClassVar[str] = "gptaq"

    alpha: float = DEFAULT_ALPHA

    def __post_init__(self) -> None:
        super().__post_init__()
        check_option(self, 0.0 <= self.alpha <= 1.0, "alpha", "in [0, 1]")


MARR_FEEDBACK = ("calibration", "holdout")


@dataclass(frozen=True)
class MARRConfig(GPTQConfig):
    """``marr``: GPTAQ with a residual scale α_m per module, refined by a PID loop on its error."""

    option_prefix: ClassVar[str] = "marr_"
    name: ClassVar[str] = "marr"

    alpha_init: float = 0.25
    rounds: int = 6
    gains: tuple[float, float, float] = (0.8, 0.05, 0.1)
    max_step: float = 0.35
    tolerance: float = 0.01
    feedback: str = "calibration"
    """Where E(α) is measured: ``calibration`` (the images the solve fits) or ``holdout``."""
    holdout: float = 0.25
    """Share of the calibration images held out for ``feedback="holdout"``."""

    def __post_init__(self) -> None:
        super().__post_init__()
        _floats(self, "gains")
        check = functools.partial(check_option, self)
        check(0.0 < self.alpha_init <= 1.0, "alpha_init", "in (0, 1]")
        check(_positive_int(self.rounds), "rounds", "a positive int")
        check(len(self.gains) == 3 and min(self.gains) >= 0, "gains", "three gains ≥ 0 (kp, ki, kd)")
        check(self.max_step > 0, "max_step", "> 0")
        check(self.tolerance >= 0, "tolerance", "≥ 0")
        _one_of(self, "feedback", MARR_FEEDBACK)
        check(0.0 < self.holdout < 1.0, "holdout", "in (0, 1)")

    def holdout_fraction(self) -> float | None:
        return self.holdout if self.feedback == "holdout" else None


@dataclass(frozen=True)
class MARRGridConfig(MARRConfig):
    """``marr_grid``: per-module α chosen by grid search over ``grid`` (MARR's reference)."""

    option_prefix: ClassVar[str] = "marr_"
    name: ClassVar[str] = "marr_grid"

    grid: tuple[float, ...] = DEFAULT_GRID

    def __post_init__(self) -> None:
        super().__post_init__()
        _floats(self, "grid")
        check_option(
            self,
            len(self.grid) > 0 and all(0.0 <= a <= 1.0 for a in self.grid),
            "grid",
            "a non-empty sequence of α in [0, 1]",
        )


ROTATE_SOLVERS = (GPTQConfig, GPTAQConfig)
ROTATE_NAMES: dict[type | None, str] = {
    type(None): "rotate",
    GPTQConfig: "rotate_gptq",
    GPTAQConfig: "rotate_gptaq",
}
"""``RotateConfig.name`` by solver type: the three registered spellings of one pipeline."""
