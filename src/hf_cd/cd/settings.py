"""`CDSettings`: the settings of Colinearity Decay, declared and validated once.

Why one declaration: `hf_cd.CDConfig` (the ``cd_*`` flags of the command line and YAML), `hf_cd.CDCallback`,
the checkpoint's ``trainer_state.json`` and ``config.json``'s ``hf_cd`` block all state these settings.
They all read them from here, so a new setting is one field, and a bad value gets the same one-line
error wherever it came from.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from hf_cd.cd.colinearity import CD_FACTORS, CD_MODES, CD_RATE_SCHEDULES
from hf_cd.cd.pairs import DEFAULT_KINDS, PAIR_KINDS, MatrixPair, parse_pair_spec


class CDSettingsError(ValueError):
    """A CD setting out of range. The message starts with the setting's name, so `CDConfig` can name its flag."""

    def __init__(self, setting: str, problem: str):
        super().__init__(f"{setting} {problem}")
        self.setting, self.problem = setting, problem


def _setting(default: Any, help: str, *, mid_run: bool | None) -> Any:
    """A field with its help text and whether a resumed run may change it (``mid_run``; None: not compared)."""
    return field(default=default, metadata={"help": help, "mid_run": mid_run})


@dataclass(frozen=True)
class CDSettings:
    """How Colinearity Decay acts: strength, pairs, cadence, and what counts as alignment.

    ``mid_run`` in each field's metadata says whether a resumed run may change it: True for settings
    read afresh at every step, False for those that shape the run (`hf_cd.training.resume`).
    """

    strength: float = _setting(
        1.0,
        "Colinearity Decay strength λ: the most aligned direction of each pair decays at rate lr·λ per "
        "optimizer step. 0 turns CD off.",
        mid_run=True,
    )
    kinds: tuple[str, ...] = _setting(
        DEFAULT_KINDS, f"Matrix pairs to decay, any of: {', '.join(PAIR_KINDS)}.", mid_run=False
    )
    every: int = _setting(1, "Apply CD every k optimizer steps (strength is multiplied by k).", mid_run=True)
    power_iters: int = _setting(
        2,
        "Warm-started power iterations per step for the spectral norms (cold start converges).",
        mid_run=True,
    )
    power_tol: float = _setting(
        1e-4,
        "After the warm-started power iterations, keep iterating until no spectral norm moves by more than "
        "this (relative); keeps the estimates within one percent while weights move fast. 0 = fixed "
        "iterations only.",
        mid_run=True,
    )
    warmup_steps: int = _setting(
        0, "Ramp the CD strength linearly from 0 over this many optimizer steps.", mid_run=True
    )
    pairs: tuple[str, ...] | None = _setting(
        None,
        "Explicit pairs 'in_module:out_module' (e.g. 'blocks.0.fc1:blocks.0.fc2') for models outside the "
        "architecture table; replaces the kinds.",
        mid_run=False,
    )
    fold_layer_scale: bool = _setting(
        False,
        "Fold Dinov2's layer scale into the matrix it multiplies (the step is taken on the effective "
        "matrix, at rate η·λ whatever the scale).",
        mid_run=False,
    )
    fold_norm: bool = _setting(
        False,
        "Fold the LayerNorm γ in front of an FFN / value→output pair into its A factor.",
        mid_run=False,
    )
    mode: str = _setting(
        "plain",
        "Which alignment CD decays: 'plain' (all of it, the spec's form), 'outlier_rows' (only output "
        "channels whose gain exceeds θ× the median, θ the threshold) or 'balanced' (plain, plus decay of "
        "hidden units that carry more than θ× the median). Equations: hf_cd.cd.colinearity.",
        mid_run=False,
    )
    threshold: float = _setting(
        2.0, "θ of the outlier_rows / balanced modes: θ× the median counts as typical.", mid_run=True
    )
    factors: str = _setting(
        "both",
        "Which factor of each pair CD writes: 'both' (the method), 'in' (A only: fc1, v_proj; the output "
        "matrices fc2 / o_proj are left alone) or 'out' (B only).",
        mid_run=False,
    )
    rate_schedule: str = _setting(
        "follow_lr",
        "How CD's per-step rate follows the lr schedule: 'follow_lr' (lr of the step × λ, the method) or "
        "'peak_lr' (the peak lr × λ at every step, so the decay does not fade as the lr anneals).",
        mid_run=False,
    )
    check_finite: bool = _setting(
        True,
        "Stop with an error naming the pair when a CD weight holds NaN/Inf (one sync per step).",
        mid_run=None,
    )

    def __post_init__(self) -> None:
        normalized = {
            "strength": _number("strength", self.strength),
            "kinds": _kinds(self.kinds),
            "every": _whole("every", self.every),
            "power_iters": _whole("power_iters", self.power_iters),
            "power_tol": _number("power_tol", self.power_tol),
            "warmup_steps": _whole("warmup_steps", self.warmup_steps),
            "pairs": _pairs(self.pairs),
            "fold_layer_scale": bool(self.fold_layer_scale),
            "fold_norm": bool(self.fold_norm),
            "threshold": _number("threshold", self.threshold),
            "check_finite": bool(self.check_finite),
        }
        for name, value in normalized.items():
            object.__setattr__(self, name, value)
        for name, low, inclusive, why in (
            ("strength", 0, True, " (0 turns CD off)"),
            ("every", 1, True, ""),
            ("power_iters", 1, True, ""),
            ("power_tol", 0, True, " (0: fixed iterations only)"),
            ("warmup_steps", 0, True, ""),
            ("threshold", 0, False, ""),
        ):
            value = getattr(self, name)
            if value < low or (value == low and not inclusive):
                raise CDSettingsError(name, f"must be {'≥' if inclusive else '>'} {low}{why}, got {value}.")
        for name, choices in (
            ("mode", CD_MODES),
            ("factors", CD_FACTORS),
            ("rate_schedule", CD_RATE_SCHEDULES),
        ):
            if getattr(self, name) not in choices:
                raise CDSettingsError(
                    name, f"{getattr(self, name)!r} is unknown; choose from {', '.join(choices)}."
                )

    def as_dict(self) -> dict[str, Any]:
        """Every setting, as JSON holds it (lists for tuples): the checkpoint's ``CDCallback`` arguments."""
        return {
            name: list(value) if isinstance(value, tuple) else value for name, value in asdict(self).items()
        }

    def model_settings(self) -> dict[str, Any]:
        """The settings that shape the trained model (all but the ``check_finite`` guard), for
        ``config.json``'s ``hf_cd`` block and the model card."""
        return {name: value for name, value in self.as_dict().items() if name != "check_finite"}

    @classmethod
    def names(cls, *, mid_run: bool) -> tuple[str, ...]:
        """The settings a resumed run may change (``mid_run=True``) or must keep (``False``)."""
        return tuple(f.name for f in fields(cls) if f.metadata["mid_run"] is mid_run)


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise CDSettingsError(name, f"must be a finite number, got {value!r}.")
    return float(value)


def _whole(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not float(value).is_integer():
        raise CDSettingsError(name, f"must be a whole number, got {value!r}.")
    return int(value)


def _kinds(kinds: Any) -> tuple[str, ...]:
    """A tuple of pair kinds; ``"ffn,value_output"`` (one YAML or CLI word) is split at the commas."""
    if isinstance(kinds, str):
        kinds = [kind.strip() for kind in kinds.split(",") if kind.strip()]
    kinds = tuple(kinds)
    unknown = [kind for kind in kinds if kind not in PAIR_KINDS]
    if unknown:
        raise CDSettingsError("kinds", f"{unknown} are not pair kinds; choose from {', '.join(PAIR_KINDS)}.")
    return kinds


def _pairs(pairs: Any) -> tuple[str, ...] | None:
    """Explicit pairs as ``"in_module:out_module"`` strings (2-sequences are joined); none given is None."""
    if not pairs:
        return None
    if isinstance(pairs, str):
        pairs = [pairs]
    names = []
    for spec in pairs:
        if isinstance(spec, MatrixPair):
            raise CDSettingsError(
                "pairs", f"takes module names 'in_module:out_module', got the MatrixPair {spec.name!r}."
            )
        try:
            names.append(":".join(parse_pair_spec(spec)))
        except (TypeError, ValueError) as error:
            raise CDSettingsError("pairs", f"holds a bad entry: {error}") from None
    return tuple(names)
