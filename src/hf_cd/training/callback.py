"""`CDCallback`: Colinearity Decay for any `transformers.Trainer`, as a `TrainerCallback`.

A thin adapter: it finds the pairs when training begins, and after each real optimizer step
hands `hf_cd.cd.decay.ColinearityDecay` the learning rate each parameter's group used. It is an
`ExportableState`, so its step count and power-iteration vectors travel in
``trainer_state.json`` and a resumed run continues bit for bit.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import fields, replace

import torch
from torch import nn
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from hf_cd.architectures import unwrap_model
from hf_cd.cd.decay import ColinearityDecay, StepStats
from hf_cd.cd.pairs import MatrixPair, find_pairs
from hf_cd.cd.settings import CDSettings
from hf_cd.cd.weights import ModelWeights

logger = logging.getLogger(__name__)


class UnsupportedTrainingSetupError(NotImplementedError):
    """The distributed setup keeps weights where a decoupled update cannot reach them."""


def check_training_setup(args, model) -> None:
    """Refuse DeepSpeed and FSDP1 up front, saying why and what to use instead."""
    uses_deepspeed = bool(getattr(args, "deepspeed", None)) or type(model).__name__ == "DeepSpeedEngine"
    try:
        from accelerate.state import AcceleratorState
        from accelerate.utils import DistributedType

        state = AcceleratorState._shared_state
        uses_deepspeed |= bool(state) and state.get("distributed_type") == DistributedType.DEEPSPEED
    except ImportError:  # pragma: no cover
        pass
    if uses_deepspeed:
        raise UnsupportedTrainingSetupError(
            "Colinearity Decay does not support DeepSpeed: ZeRO keeps the fp32 master weights inside the "
            "optimizer, so a decoupled update written to the model's weights is overwritten at the next step. "
            "Use DDP or FSDP2 (accelerate's fsdp_version: 2) instead."
        )
    from torch.distributed.fsdp import FullyShardedDataParallel

    if any(isinstance(module, FullyShardedDataParallel) for module in model.modules()):
        raise UnsupportedTrainingSetupError(
            "Colinearity Decay needs whole weight matrices, which FSDP1's flat parameters hide. "
            "Use FSDP2 (accelerate's fsdp_version: 2), whose DTensor parameters hf_cd gathers and writes back."
        )


class _LogWindow:
    """Device-side sums of step statistics between two logging steps (one host sync per log)."""

    def __init__(self, kinds: Sequence[str]):
        self.kinds = list(kinds)
        self.alignment_sum: torch.Tensor | None = None
        self.alignment_count: torch.Tensor | None = None
        self.update_sq_norm: torch.Tensor | None = None
        self.steps = 0
        self.strength = 0.0

    def add(self, stats: StepStats, strength: float) -> None:
        if self.steps == 0:
            self.alignment_sum = stats.alignment_sum.clone()
            self.alignment_count = stats.alignment_count.clone()
            self.update_sq_norm = stats.update_sq_norm.clone()
        else:
            self.alignment_sum += stats.alignment_sum
            self.alignment_count += stats.alignment_count
            self.update_sq_norm += stats.update_sq_norm
        self.steps += 1
        self.strength = strength

    def pop(self) -> dict[str, float]:
        if self.steps == 0:
            return {}
        alignment = self.alignment_sum / self.alignment_count.clamp_min(1)
        update_norm = (self.update_sq_norm / self.steps).sqrt()
        values = torch.cat([alignment, update_norm.reshape(1)]).tolist()
        logs = {f"cd/alignment_{kind}": values[i] for i, kind in enumerate(self.kinds)}
        logs["cd/update_norm"] = values[-1]
        logs["cd/strength"] = self.strength
        self.steps = 0
        return logs


class CDCallback(TrainerCallback, ExportableState):
    """Apply the decoupled Colinearity Decay update after every real optimizer step.

    Takes a `CDSettings`, keyword arguments that build one, or both (the keywords replace those
    fields)::

        CDCallback(strength=1.0, kinds=["ffn"])
        CDCallback(CDSettings(strength=1.0, kinds=("ffn",)))
        CDCallback(args.colinearity_decay, check_finite=False)  # a CDConfig's cd_* fields

    `CDSettings` documents each setting. They read as attributes too (``callback.strength``), and
    setting one (``callback.strength = 0.5``) replaces ``settings`` with a new, validated `CDSettings`.
    """

    def __init__(self, settings: CDSettings | None = None, **changes):
        if settings is not None and not isinstance(settings, CDSettings):
            raise TypeError(
                f"CDCallback takes a CDSettings or keywords, e.g. CDCallback(strength=1.0); got {settings!r}."
            )
        self.settings = replace(settings, **changes) if settings is not None else CDSettings(**changes)
        self.num_updates = 0
        self.engine_state: dict | None = None  # set by Trainer when resuming, consumed by `setup`
        self.decay: ColinearityDecay | None = None
        self._window: _LogWindow | None = None
        self._group_of_param: dict[str, int] | None = None
        self._optimizer_id: int | None = None

    def __getattr__(self, name: str):
        # Reached only when normal lookup fails: `callback.strength` and the like read the settings.
        settings = self.__dict__.get("settings")
        if settings is not None and name in _SETTING_NAMES:
            return getattr(settings, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __setattr__(self, name: str, value) -> None:
        if name in _SETTING_NAMES:  # `callback.strength = 0.5`: a new, validated CDSettings
            name, value = "settings", replace(self.settings, **{name: value})
        super().__setattr__(name, value)

    # -- set-up -------------------------------------------------------------------------------

    def find_pairs(self, model: nn.Module | ModelWeights) -> list[MatrixPair]:
        settings = self.settings
        return find_pairs(
            model,
            settings.kinds,
            pairs=settings.pairs,
            fold_layer_scale=settings.fold_layer_scale,
            fold_norm=settings.fold_norm,
        )

    def setup(self, model) -> ColinearityDecay:
        """Build the engine for ``model`` (idempotent), restoring checkpointed vectors if any.

        The wrappers are stripped once and the model walked once (`ModelWeights`): finding the pairs,
        checking them and building the engine all read that walk.
        """
        model = unwrap_model(model)
        if self.decay is not None and self.decay.model is model:
            return self.decay
        weights = ModelWeights.of(model)
        settings = self.settings
        self.decay = ColinearityDecay(
            weights,
            self.find_pairs(weights),
            power_iters=settings.power_iters,
            power_tol=settings.power_tol or None,
            check_finite=settings.check_finite,
            mode=settings.mode,
            threshold=settings.threshold,
            factors=settings.factors,
        )
        if self.decay.skipped_frozen:
            logger.info(
                "CD skips %d frozen pairs: %s", len(self.decay.skipped_frozen), self.decay.skipped_frozen
            )
        if self.engine_state:
            missing = self.decay.load_state_dict(self.engine_state)
            if missing:
                logger.warning("CD state has no power-iteration vectors for %s; they cold-start.", missing)
            self.engine_state = None
        self._window = _LogWindow(self.decay.kinds)
        self._group_of_param = None
        return self.decay

    def current_strength(self) -> float:
        """λ·every, ramped linearly over the warm-up (the step being applied counts as done)."""
        settings = self.settings
        ramp = 1.0 if settings.warmup_steps == 0 else min(1.0, self.num_updates / settings.warmup_steps)
        return settings.strength * settings.every * ramp

    def _learning_rates(self, optimizer) -> dict[str, float]:
        """The lr each CD parameter's group used in the step just taken (groups may differ per parameter)."""
        if self._group_of_param is None or self._optimizer_id != id(optimizer):
            group_of_id = {
                id(p): i for i, group in enumerate(optimizer.param_groups) for p in group["params"]
            }
            self._group_of_param = {}
            for name in self.decay.written_param_names:
                index = group_of_id.get(id(self.decay.params[name]))
                if index is None:
                    logger.warning("CD parameter %s is in no optimizer group; CD leaves it alone.", name)
                else:
                    self._group_of_param[name] = index
            self._optimizer_id = id(optimizer)
        groups = optimizer.param_groups
        key = (
            "initial_lr" if self.settings.rate_schedule == "peak_lr" else "lr"
        )  # initial_lr: set by LR schedulers
        return {
            name: groups[index].get(key, groups[index]["lr"]) for name, index in self._group_of_param.items()
        }

    # -- Trainer events -------------------------------------------------------------------------

    def _restore_from_trainer_state(self, state) -> None:
        """Resume from the checkpoint's ``trainer_state.json`` even when the Trainer's
        ``restore_callback_states_from_checkpoint`` is off (its default): losing the step count and
        the power-iteration vectors would make a resumed run differ from an uninterrupted one."""
        stored = (getattr(state, "stateful_callbacks", None) or {}).get(type(self).__name__)
        if isinstance(stored, list):
            stored = stored[0] if stored else None
        attributes = (stored or {}).get("attributes", {})
        if self.decay is None and attributes.get("num_updates", 0) > self.num_updates:
            self.num_updates = int(attributes["num_updates"])
            self.engine_state = attributes.get("engine_state")

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.settings.strength == 0 or model is None:
            return
        check_training_setup(args, model)
        self._restore_from_trainer_state(state)
        self.setup(model)

    def on_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        if self.settings.strength == 0 or optimizer is None:
            return
        if getattr(optimizer, "step_was_skipped", False):  # fp16 scaler found inf/nan gradients
            return
        self.num_updates += 1
        if self.num_updates % self.settings.every:
            return
        decay = self.setup(model)
        learning_rates = self._learning_rates(optimizer)
        strength = self.current_strength()
        stats = decay.step(lambda name: learning_rates.get(name, 0.0), strength)
        self._window.add(stats, strength)

    def pop_log_metrics(self) -> dict[str, float]:
        """The ``cd/*`` scalars averaged since the last call (`CDTrainer.log` merges them)."""
        return self._window.pop() if self._window is not None else {}

    def on_log(self, args, state, control, logs=None, **kwargs):
        # With a plain Trainer, reporters that run before this callback miss these keys; CDTrainer
        # merges them in `log` so that every reporter sees them.
        if logs is None or "loss" not in logs:  # training logs only; evaluation logs keep their own keys
            return
        metrics = self.pop_log_metrics()
        if metrics:
            logs.update(metrics)
            if state.log_history:
                state.log_history[-1].update(metrics)

    # -- ExportableState ------------------------------------------------------------------------

    def state(self) -> dict:
        return {
            "args": self.settings.as_dict(),  # CDCallback(**args) rebuilds it, as ExportableState.from_state does
            "attributes": {
                "num_updates": self.num_updates,
                "engine_state": self.decay.state_dict() if self.decay is not None else self.engine_state,
            },
        }


_SETTING_NAMES = frozenset(f.name for f in fields(CDSettings))
