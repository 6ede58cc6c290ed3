"""`CDConfig`: `TrainingArguments` plus every Colinearity Decay and TWEO knob (TRL's SFTConfig pattern).

Being a dataclass with ``metadata["help"]`` on each field, it works unchanged with
`HfArgumentParser` from the command line and from YAML.
"""

from __future__ import annotations

import functools
import operator
import types
import typing
from dataclasses import Field, dataclass, field, fields, make_dataclass
from typing import Any

from transformers import TrainingArguments

from hf_cd.cd.settings import CDSettings, CDSettingsError

CD_ARGUMENT_PREFIX = "cd_"
"""`CDConfig` names each `CDSettings` field ``cd_<name>`` (``--cd_strength``, ``cd_kinds:`` in YAML)."""


def _argument_type(hint: Any) -> Any:
    """HfArgumentParser's spelling of a `CDSettings` type: a list where the frozen settings hold a tuple."""
    if typing.get_origin(hint) is tuple:
        return list[typing.get_args(hint)[0]]
    if isinstance(hint, types.UnionType):
        return functools.reduce(operator.or_, map(_argument_type, typing.get_args(hint)))
    return hint


def _argument(setting: Field, hint: Any) -> tuple[str, Any, Field]:
    """A `CDSettings` field as the ``cd_``-prefixed `TrainingArguments` field the CLI and YAML set."""
    metadata = {"help": setting.metadata["help"]}  # HfArgumentParser hands metadata to add_argument
    if isinstance(setting.default, tuple):
        default = field(default_factory=functools.partial(list, setting.default), metadata=metadata)
    else:
        default = field(default=setting.default, metadata=metadata)
    return CD_ARGUMENT_PREFIX + setting.name, _argument_type(hint), default


_SETTING_TYPES = typing.get_type_hints(CDSettings)
CDArguments = make_dataclass(
    "CDArguments",
    [_argument(setting, _SETTING_TYPES[setting.name]) for setting in fields(CDSettings)],
    repr=False,  # CDConfig keeps TrainingArguments' __repr__, which masks the token
    eq=False,
)
"""The ``cd_*`` fields of `CDConfig`, generated from `CDSettings` so the list is written once."""
CDArguments.__module__ = __name__  # make_dataclass's own `module=` needs Python 3.12


def cd_setting_name(argument: str) -> str | None:
    """``"cd_strength"`` → ``"strength"``: the `CDSettings` field behind a `CDConfig` field (None for others)."""
    name = argument.removeprefix(CD_ARGUMENT_PREFIX)
    return (
        name if argument.startswith(CD_ARGUMENT_PREFIX) and name in CDSettings.__dataclass_fields__ else None
    )


def _secret_fields(config: TrainingArguments) -> list[str]:
    """The fields that hold credentials (``hub_token``): TrainingArguments masks every ``*_token``."""
    return [f.name for f in fields(config) if f.name.endswith("_token")]


@dataclass(
    repr=False
)  # keep TrainingArguments' __repr__, which masks the token (the generated one would not)
class CDConfig(CDArguments, TrainingArguments):
    """Training arguments for `CDTrainer`: the usual `TrainingArguments` plus ``cd_*``, ``tweo_*`` and ``qat_*``.

    The ``cd_*`` fields are those of `CDSettings`, prefixed (`CDArguments`); `colinearity_decay` reads
    them back as one validated `CDSettings`.

    The Hub token never leaves the process through this object: ``repr`` masks it and a pickle
    (``training_args.bin``, written into ``output_dir`` and every checkpoint, and uploaded by
    ``push_to_hub``) stores ``None`` instead. A copy (`copy.copy`, `copy.deepcopy`) keeps it.
    """

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
        settings = self.colinearity_decay
        for setting in fields(settings):  # normalized: "ffn,value_output" → a list, pairs as "a:b" strings
            value = getattr(settings, setting.name)
            setattr(
                self, CD_ARGUMENT_PREFIX + setting.name, list(value) if isinstance(value, tuple) else value
            )
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

        ``quant_config`` sets the shared settings (`BaseQuantConfig` fields, e.g. ``protocol``) and
        ``extra``: options of the ``qat_init`` method keyed as ``NAME:key=value`` spells them
        (``{"repq_weights": "symmetric"}``), read by `hf_cd.quant.parse_quant_spec`.
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

    @property
    def colinearity_decay(self) -> CDSettings:
        """The ``cd_*`` fields as one validated `CDSettings`, what `CDCallback` takes.

        A bad value raises `CDSettingsError` naming the ``cd_*`` field.
        """
        values = {f.name: getattr(self, CD_ARGUMENT_PREFIX + f.name) for f in fields(CDSettings)}
        try:
            return CDSettings(**values)
        except CDSettingsError as error:
            raise CDSettingsError(CD_ARGUMENT_PREFIX + error.setting, error.problem) from None

    def cd_callback_kwargs(self) -> dict:
        """`colinearity_decay` as keyword arguments of `CDCallback` (``CDCallback(**kwargs)``)."""
        return self.colinearity_decay.as_dict()

    def cd_settings(self) -> dict:
        """The method's settings as a model card and ``config.json`` record them."""
        settings = self.colinearity_decay.model_settings()
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
