"""`CDTrainer`: a `transformers.Trainer` that trains with Colinearity Decay (and, as a baseline, TWEO).

The glue only: CD itself runs in `CDCallback` (so any Trainer can use it); this class adds the
callback from a `CDConfig`, adds the TWEO penalty to the training loss when asked, logs both,
and records the settings on ``model.config.hf_cd`` so every checkpoint states how it was trained.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

import torch
from transformers import PreTrainedModel, Trainer, TrainingArguments
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME

from hf_cd._version import __version__
from hf_cd.architectures import unwrap_model
from hf_cd.callback import CDCallback
from hf_cd.config import CDConfig
from hf_cd.tweo import BlockOutputCollector, tweo_penalty

logger = logging.getLogger(__name__)


def respect_umask(folder: str | os.PathLike, pattern: str = "*.safetensors") -> None:
    """Give weight files the mode every other file gets (0644 under the usual umask 022).

    Why: safetensors writes through a private temporary file, so ``model.safetensors`` lands with
    mode 0600 while ``config.json`` beside it gets 0644, and a shared or served folder cannot be read.
    """
    umask = os.umask(0)
    os.umask(umask)
    for path in Path(folder).glob(pattern):
        os.chmod(path, 0o666 & ~umask)


@contextlib.contextmanager
def no_transformers_progress_bars():
    """Silence transformers' own bars (e.g. "Writing model shards") inside a run that draws its own."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _as_cd_config(args: TrainingArguments | None) -> CDConfig:
    if args is None:
        return CDConfig(output_dir="trainer_output")
    if isinstance(args, CDConfig):
        return args
    values = args.to_dict()
    values["hub_token"] = args.hub_token  # to_dict masks it
    return CDConfig(**values)


class CDTrainer(Trainer):
    """`Trainer` with the decoupled CD update after each optimizer step, configured by `CDConfig`.

    Pass a `CDCallback` in ``callbacks`` to override the config's CD settings; with
    ``cd_strength=0`` and ``tweo_weight=0`` it is a plain Trainer.
    """

    def __init__(
        self, model=None, args: TrainingArguments | None = None, *positional, callbacks=None, **kwargs
    ):
        args = _as_cd_config(args)
        callbacks = list(callbacks or [])
        if args.cd_strength > 0 and not any(isinstance(cb, CDCallback) for cb in callbacks):
            callbacks.append(CDCallback(**args.cd_callback_kwargs()))
        super().__init__(model, args, *positional, callbacks=callbacks, **kwargs)
        self._tweo = BlockOutputCollector(unwrap_model(self.model)) if args.tweo_weight > 0 else None
        self._tweo_sum: torch.Tensor | None = None
        self._tweo_steps = 0
        config = getattr(unwrap_model(self.model), "config", None)
        if config is not None:
            config.hf_cd = self.cd_settings

    @property
    def cd_callback(self) -> CDCallback | None:
        """Looked up each time: resuming from a checkpoint replaces the callback object."""
        return next((cb for cb in self.callback_handler.callbacks if isinstance(cb, CDCallback)), None)

    @property
    def cd_settings(self) -> dict:
        """How this model is trained, for ``config.json`` and the model card."""
        callback = self.cd_callback
        settings = self.args.cd_settings()
        if callback is not None:
            settings.update({k: v for k, v in callback.settings().items() if k != "check_finite"})
        else:
            settings["strength"] = 0.0
        return {"library": "hf-cd", "version": __version__, **settings}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self._tweo is None or not model.training:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        with self._tweo.collect() as block_outputs:
            loss, outputs = super().compute_loss(model, inputs, True, num_items_in_batch)
            penalty = tweo_penalty(block_outputs, self.args.tweo_tau, self.args.tweo_p)
        detached = penalty.detach()
        self._tweo_sum = detached if self._tweo_sum is None else self._tweo_sum + detached
        self._tweo_steps += 1
        if self._loss_is_scaled_for_ga(num_items_in_batch):
            # The Trainer will not divide this loss by the accumulation steps; the penalty is a
            # per-micro-batch mean, so scale it here to keep its weight independent of accumulation.
            penalty = penalty / self.current_gradient_accumulation_steps
        loss = loss + self.args.tweo_weight * penalty
        return (loss, outputs) if return_outputs else loss

    def _loss_is_scaled_for_ga(self, num_items_in_batch) -> bool:
        """Mirror of the Trainer's own rule in `training_step`."""
        explicit = getattr(self, "loss_is_scaled_for_ga", None)
        if explicit is not None:
            return bool(explicit)
        return bool(self.model_accepts_loss_kwargs and num_items_in_batch is not None) or (
            self.compute_loss_func is not None
        )

    # -- checkpoints ---------------------------------------------------------------------------
    # `save_pretrained` writes checkpoints in the original (legacy) key format, but the Trainer's
    # resume path loads them with a raw `load_state_dict`, which silently misses the renamed ViT /
    # DeiT / Dinov2 keys (transformers 5.x). Loading through `from_pretrained` applies the same
    # key conversion as the Hub path, so a resumed run really starts from the checkpoint.

    def _plain_checkpoint(self, checkpoint: str | None) -> bool:
        model = self.model
        return (
            checkpoint is not None
            and isinstance(model, PreTrainedModel)
            and not (self.is_fsdp_enabled or self.is_deepspeed_enabled or hasattr(model, "peft_config"))
            and any(
                os.path.isfile(os.path.join(checkpoint, n))
                for n in (SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME)
            )
        )

    def _load_converted_weights(self, checkpoint: str) -> None:
        model = self.model
        dtype = next(model.parameters()).dtype
        reloaded = type(model).from_pretrained(checkpoint, config=model.config, dtype=dtype)
        result = model.load_state_dict(reloaded.state_dict(), strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise RuntimeError(
                f"Checkpoint {checkpoint} does not match the model: missing {result.missing_keys[:5]}, "
                f"unexpected {result.unexpected_keys[:5]}. Was it written by another architecture?"
            )

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        if model is None and self._plain_checkpoint(resume_from_checkpoint):
            return self._load_converted_weights(resume_from_checkpoint)
        return super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _load_best_model(self):
        if self._plain_checkpoint(self.state.best_model_checkpoint):
            return self._load_converted_weights(self.state.best_model_checkpoint)
        return super()._load_best_model()

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        # every checkpoint and the final model: no nested "Writing model shards" bar under the
        # training bar, and weights readable like the config beside them
        with no_transformers_progress_bars():
            super()._save(output_dir, state_dict)
        respect_umask(output_dir if output_dir is not None else self.args.output_dir)

    # -- model card ----------------------------------------------------------------------------

    def create_model_card(
        self,
        model_name: str | None = None,
        dataset: str | list[str] | None = None,
        finetuned_from: str | None = None,
        **kwargs,
    ) -> None:
        """Write the hf-cd card (`hf_cd.hub`), not the generic one, so `push_to_hub` uploads it.

        The card holds the CD settings. It also holds the quantized accuracy when ``output_dir``
        holds this run's ``results.json``. ``license``, ``language`` and ``tags`` go into its
        metadata; the other `Trainer.create_model_card` arguments describe the generic card and are ignored.
        """
        if not self.is_world_process_zero():
            return
        from hf_cd import hub  # hub loads hf_cd.quant, which `import hf_cd` should not pay for

        dataset_name = dataset[0] if isinstance(dataset, (list, tuple)) and dataset else dataset
        results = hub.trainer_results(self, dataset=dataset_name or None, finetuned_from=finetuned_from)
        repo_id = self.hub_model_id or self.args.hub_model_id or model_name
        tags = kwargs.get("tags") or ()
        hub.write_model_card(
            self.args.output_dir,
            results,
            repo_id=repo_id,
            license=kwargs.get("license"),
            language=kwargs.get("language"),
            tags=[tags] if isinstance(tags, str) else list(tags),
        )

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" not in logs:  # evaluation and end-of-training logs: the window stays for the next one
            return super().log(logs, start_time)
        callback = self.cd_callback
        if callback is not None:
            logs.update(callback.pop_log_metrics())
        if self._tweo_steps:
            logs["tweo/penalty"] = (self._tweo_sum / self._tweo_steps).item()
            self._tweo_sum, self._tweo_steps = None, 0
        super().log(logs, start_time)
