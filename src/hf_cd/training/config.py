"""`CDConfig`: `TrainingArguments` plus every Colinearity Decay and TWEO knob (TRL's SFTConfig pattern).

Being a dataclass with ``metadata["help"]`` on each field, it works unchanged with
`HfArgumentParser` from the command line and from YAML.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from transformers import TrainingArguments

from hf_cd.cd.colinearity import CD_FACTORS, CD_MODES, CD_RATE_SCHEDULES
from hf_cd.cd.pairs import DEFAULT_KINDS, PAIR_KINDS


def _secret_fields(config: TrainingArguments) -> list[str]:
    """The fields that hold credentials (``hub_token``): TrainingArguments masks every ``*_token``."""
    return [f.name for f in fields(config) if f.name.endswith("_token")]


@dataclass(
    repr=False
)  # keep TrainingArguments' __repr__, which masks the token (the generated one would not)
class CDConfig(TrainingArguments):
    """Training arguments for `CDTrainer`: the usual `TrainingArguments` plus ``cd_*`` and ``tweo_*``.

    The Hub token never leaves the process through this object: ``repr`` masks it and a pickle
    (``training_args.bin``, written into ``output_dir`` and every checkpoint, and uploaded by
    ``push_to_hub``) stores ``None`` instead. A copy (`copy.copy`, `copy.deepcopy`) keeps it.
    """

    cd_strength: float = field(
        default=1.0,
        metadata={
            "help": "Colinearity Decay strength λ: the most aligned direction of each pair decays at rate lr·λ per "
            "optimizer step. 0 turns CD off."
        },
    )
    cd_kinds: list[str] = field(
        default_factory=lambda: list(DEFAULT_KINDS),
        metadata={"help": f"Matrix pairs to decay, any of: {', '.join(PAIR_KINDS)}."},
    )
    cd_every: int = field(
        default=1, metadata={"help": "Apply CD every k optimizer steps (strength is multiplied by k)."}
    )
    cd_warmup_steps: int = field(
        default=0, metadata={"help": "Ramp the CD strength linearly from 0 over this many optimizer steps."}
    )
    cd_power_iters: int = field(
        default=2,
        metadata={
            "help": "Warm-started power iterations per step for the spectral norms (cold start converges)."
        },
    )
    cd_power_tol: float = field(
        default=1e-4,
        metadata={
            "help": "After cd_power_iters, keep iterating until no spectral norm moves by more than this (relative); "
            "keeps the estimates within one percent while weights move fast. 0 = fixed iterations only."
        },
    )
    cd_pairs: list[str] | None = field(
        default=None,
        metadata={
            "help": "Explicit pairs 'in_module:out_module' (e.g. 'blocks.0.fc1:blocks.0.fc2') for models outside "
            "the architecture table; replaces cd_kinds."
        },
    )
    cd_fold_layer_scale: bool = field(
        default=False,
        metadata={
            "help": "Fold Dinov2's layer scale into the matrix it multiplies (the step is taken on the "
            "effective matrix, at rate η·λ whatever the scale)."
        },
    )
    cd_fold_norm: bool = field(
        default=False,
        metadata={"help": "Fold the LayerNorm γ in front of an FFN / value→output pair into its A factor."},
    )
    cd_mode: str = field(
        default="plain",
        metadata={
            "help": "Which alignment CD decays: 'plain' (all of it, the spec's form), 'outlier_rows' (only output "
            "channels whose gain exceeds cd_threshold× the median) or 'balanced' (plain, plus decay of hidden "
            "units that carry more than cd_threshold× the median). Equations: hf_cd.cd.colinearity."
        },
    )
    cd_threshold: float = field(
        default=2.0,
        metadata={"help": "θ of the outlier_rows / balanced modes: θ× the median counts as typical."},
    )
    cd_factors: str = field(
        default="both",
        metadata={
            "help": "Which factor of each pair CD writes: 'both' (the method), 'in' (A only: fc1, v_proj; the "
            "output matrices fc2 / o_proj are left alone) or 'out' (B only)."
        },
    )
    cd_rate_schedule: str = field(
        default="follow_lr",
        metadata={
            "help": "How CD's per-step rate follows the lr schedule: 'follow_lr' (lr of the step × λ, the method) "
            "or 'peak_lr' (the peak lr × λ at every step, so the decay does not fade as the lr anneals)."
        },
    )
    cd_check_finite: bool = field(
        default=True,
        metadata={
            "help": "Stop with an error naming the pair when a CD weight holds NaN/Inf (one sync per step)."
        },
    )
    tweo_weight: float = field(
        default=0.0,
        metadata={"help": "Weight of the TWEO activation penalty on block outputs (baseline; 0 disables)."},
    )
    tweo_tau: float = field(default=3.0, metadata={"help": "TWEO threshold τ."})
    tweo_p: float = field(default=4.0, metadata={"help": "TWEO exponent p."})
    qat_bits: str | None = field(
        default=None,
        metadata={
            "help": "Quantization-aware training at these encoder bits, WxAy (e.g. W4A4, W6A6): weights and "
            "activations fake-quantized in every forward at the sites and bits PTQ uses, step sizes learned "
            "(LSQ) from qat_init's calibration. CD acts on the latent float weights. Unset: float training."
        },
    )
    qat_init: str = field(
        default="percentile",
        metadata={
            "help": "PTQ pipeline whose calibration gives the initial step sizes (percentile, minmax, repq or "
            "per_tensor)."
        },
    )
    qat_num_calibration: int = field(
        default=32, metadata={"help": "Calibration images for qat_init (drawn from the training data)."}
    )
    qat_distill: float = field(
        default=0.0,
        metadata={
            "help": "Weight α of distillation from the float model: loss = (1 − α)·cross-entropy + α·KL(float "
            "logits ‖ QAT logits). 0 (default): labels only."
        },
    )
    qat_step_lr: float | None = field(
        default=None,
        metadata={
            "help": "Learning rate of the QAT step sizes (no weight decay, the same schedule); default: learning_rate."
        },
    )
    remove_unused_columns: bool = field(
        default=False,
        metadata={
            "help": "Keep dataset columns the model's forward does not name: image datasets transform `image` "
            "into `pixel_values` lazily, so dropping it would break them."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        # Counts of work: 0 would save an untrained model (epochs) or train a step anyway (max_steps).
        if self.max_steps == 0 or self.max_steps < -1:
            raise ValueError(
                f"max_steps must be a positive number of optimizer steps, or -1 to train num_train_epochs; "
                f"got {self.max_steps}."
            )
        if self.max_steps == -1 and not self.num_train_epochs > 0:
            raise ValueError(
                f"num_train_epochs must be > 0 (or give --max_steps N), got {self.num_train_epochs}: the run "
                "would save an untrained model."
            )
        for name in (
            "per_device_train_batch_size",
            "per_device_eval_batch_size",
            "gradient_accumulation_steps",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}.")
        if self.cd_strength < 0:
            raise ValueError(f"cd_strength must be ≥ 0 (0 turns CD off), got {self.cd_strength}.")
        if isinstance(self.cd_kinds, str):
            self.cd_kinds = [k.strip() for k in self.cd_kinds.split(",") if k.strip()]
        unknown = [k for k in self.cd_kinds if k not in PAIR_KINDS]
        if unknown:
            raise ValueError(f"Unknown cd_kinds {unknown}; choose from {', '.join(PAIR_KINDS)}.")
        if self.cd_mode not in CD_MODES:
            raise ValueError(f"Unknown cd_mode {self.cd_mode!r}; choose from {', '.join(CD_MODES)}.")
        if self.cd_threshold <= 0:
            raise ValueError(f"cd_threshold must be > 0, got {self.cd_threshold}.")
        if self.cd_rate_schedule not in CD_RATE_SCHEDULES:
            raise ValueError(
                f"Unknown cd_rate_schedule {self.cd_rate_schedule!r}; choose from {', '.join(CD_RATE_SCHEDULES)}."
            )
        if self.cd_factors not in CD_FACTORS:
            raise ValueError(f"Unknown cd_factors {self.cd_factors!r}; choose from {', '.join(CD_FACTORS)}.")
        if self.cd_every < 1:
            raise ValueError(f"cd_every must be ≥ 1, got {self.cd_every}.")
        if self.cd_warmup_steps < 0:
            raise ValueError(f"cd_warmup_steps must be ≥ 0, got {self.cd_warmup_steps}.")
        if self.cd_power_tol < 0:
            raise ValueError(f"cd_power_tol must be ≥ 0, got {self.cd_power_tol}.")
        if self.cd_power_iters < 1:
            raise ValueError(f"cd_power_iters must be ≥ 1, got {self.cd_power_iters}.")
        if self.tweo_weight < 0 or self.tweo_tau <= 0 or self.tweo_p <= 0:
            raise ValueError(
                f"TWEO needs weight ≥ 0, tau > 0 and p > 0; got {self.tweo_weight}, {self.tweo_tau}, {self.tweo_p}."
            )
        self._check_qat()

    def _check_qat(self) -> None:
        self.qat_bits = None if str(self.qat_bits).strip().lower() in ("", "none", "null") else self.qat_bits
        if not 0.0 <= self.qat_distill <= 1.0:
            raise ValueError(f"qat_distill is a weight in [0, 1], got {self.qat_distill}.")
        if self.qat_step_lr is not None and not self.qat_step_lr > 0:
            raise ValueError(f"qat_step_lr must be > 0 (or unset: learning_rate), got {self.qat_step_lr}.")
        if self.qat_num_calibration < 1:
            raise ValueError(f"qat_num_calibration must be ≥ 1, got {self.qat_num_calibration}.")
        if self.qat_bits is not None:
            try:
                self.qat_config()
            except (ValueError, TypeError) as error:
                raise ValueError(f"qat_bits={self.qat_bits} qat_init={self.qat_init}: {error}") from None

    def qat_config(self, **quant_config):
        """The `hf_cd.quant.QATConfig` of ``qat_bits`` / ``qat_init`` (``None`` without QAT).

        ``quant_config`` adds or overrides `QuantConfig` fields (e.g. ``extra`` pipeline options, ``protocol``).
        """
        if self.qat_bits is None:
            return None
        from hf_cd.quant import QATConfig  # not at import: `import hf_cd` does not pay for hf_cd.quant

        values = {
            "num_calibration": self.qat_num_calibration,
            "seed": self.data_seed if self.data_seed is not None else self.seed,
            "progress": not self.disable_tqdm,
            **quant_config,
        }
        return QATConfig.from_bits(self.qat_bits, init=self.qat_init, **values)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        for name in _secret_fields(self):
            if name in state:
                state[name] = None
        return state

    def __copy__(self) -> CDConfig:
        clone = type(self).__new__(type(self))
        clone.__dict__.update(self.__dict__)
        return clone

    def __deepcopy__(self, memo: dict) -> CDConfig:
        import copy

        clone = type(self).__new__(type(self))
        memo[id(self)] = clone
        clone.__dict__.update(copy.deepcopy(self.__dict__, memo))
        return clone

    def cd_callback_kwargs(self) -> dict:
        """Arguments for `CDCallback` taken from this config."""
        return {
            "strength": self.cd_strength,
            "kinds": list(self.cd_kinds),
            "every": self.cd_every,
            "power_iters": self.cd_power_iters,
            "power_tol": self.cd_power_tol,
            "warmup_steps": self.cd_warmup_steps,
            "pairs": list(self.cd_pairs) if self.cd_pairs else None,
            "fold_layer_scale": self.cd_fold_layer_scale,
            "fold_norm": self.cd_fold_norm,
            "mode": self.cd_mode,
            "threshold": self.cd_threshold,
            "factors": self.cd_factors,
            "rate_schedule": self.cd_rate_schedule,
            "check_finite": self.cd_check_finite,
        }

    def cd_settings(self) -> dict:
        """The method's settings as a model card and ``config.json`` record them."""
        settings = {k: v for k, v in self.cd_callback_kwargs().items() if k != "check_finite"}
        settings.update({"tweo_weight": self.tweo_weight, "tweo_tau": self.tweo_tau, "tweo_p": self.tweo_p})
        if self.qat_bits is not None:  # only QAT runs: float runs keep the settings they always had
            settings.update(
                {
                    "qat_bits": self.qat_bits,
                    "qat_init": self.qat_init,
                    "qat_num_calibration": self.qat_num_calibration,
                    "qat_distill": self.qat_distill,
                    "qat_step_lr": self.qat_step_lr if self.qat_step_lr is not None else self.learning_rate,
                }
            )
        return settings
