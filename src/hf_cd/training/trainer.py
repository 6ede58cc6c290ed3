"""`CDTrainer`: a `transformers.Trainer` that trains with Colinearity Decay (and, as a baseline, TWEO).

The glue only: CD itself runs in `CDCallback` (so any Trainer can use it); this class adds the
callback from a `CDConfig`, adds the TWEO penalty to the training loss when asked, logs both,
and records the settings on ``model.config.hf_cd`` so every checkpoint states how it was trained.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import replace

import torch
from transformers import PreTrainedModel, Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import ExportableState, TrainerState
from transformers.trainer_utils import TrainOutput
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME

from hf_cd._version import __version__
from hf_cd.architectures import unwrap_model
from hf_cd.files import staged_files
from hf_cd.finite import non_finite_parameters, require_finite_weights  # noqa: F401 (re-exported)
from hf_cd.training.callback import CDCallback
from hf_cd.training.checkpoints import respect_umask
from hf_cd.training.config import CDConfig, cd_setting_name
from hf_cd.training.locking import OutputDirLock
from hf_cd.training.resume import RunSettings, compare_on_resume, run_settings
from hf_cd.training.tweo import BlockOutputCollector, tweo_penalty

logger = logging.getLogger(__name__)

QAT_STATE_FILE = "hf_cd_qat.safetensors"
"""What a QAT run's checkpoint (and final save) holds besides the latent float weights: every step size
and zero-point, by the name it has in the QAT model."""


def write_safetensors_atomic(path: str, tensors: dict[str, torch.Tensor]) -> None:
    """Write ``tensors`` to ``path`` through a temporary file in the same folder, so it appears whole or not at all."""
    from safetensors.torch import save_file

    temporary = f"{path}.tmp-{os.getpid()}"
    try:
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in tensors.items()},
            temporary,
            metadata={"format": "pt"},
        )
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


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


class _LoadedWeightsCheck(TrainerCallback):
    """Refuse to start from NaN/Inf weights (a broken checkpoint), naming them, before any step runs.

    Without it the NaN spreads through the first step into every weight and the error blames the
    first CD pair ("training has diverged"), wherever the NaN really was.
    """

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is None or not getattr(args, "cd_check_finite", True):
            return
        require_finite_weights(model, "before training starts")


class TrainLossTracker(TrainerCallback, ExportableState):
    """The sum of training losses since step 0, carried through checkpoints so a resumed run can report
    the loss over the whole run, not only over the steps it ran itself (the Trainer's ``train_loss``).

    ``known`` is False when the run resumed from a checkpoint written without it: the steps before
    are then not covered, and the end-of-training log says so.
    """

    def __init__(self):
        self.loss_sum = 0.0  # over the steps before this train() call
        self.steps = 0
        self.known = True
        self.session = (0.0, 0)  # (loss sum, global step) of this call, set by CDTrainer before each save

    def on_train_begin(self, args, state, control, **kwargs):
        stored = (getattr(state, "stateful_callbacks", None) or {}).get(type(self).__name__)
        if isinstance(stored, list):
            stored = stored[-1] if stored else None
        attributes = (stored or {}).get("attributes", {})
        self.known = not state.global_step or attributes.get("steps") == state.global_step
        if state.global_step and self.known:
            self.loss_sum, self.steps = float(attributes["loss_sum"]), int(attributes["steps"])
        else:
            self.loss_sum, self.steps = 0.0, state.global_step
        self.session = (0.0, state.global_step)

    def state(self) -> dict:
        session_sum, global_step = self.session
        if not self.known:  # nothing true to store: a later resume reports its own steps only
            return {"args": {}, "attributes": {"loss_sum": 0.0, "steps": -1}}
        return {"args": {}, "attributes": {"loss_sum": self.loss_sum + session_sum, "steps": global_step}}


class CDTrainer(Trainer):
    """`Trainer` with the decoupled CD update after each optimizer step, configured by `CDConfig`.

    Pass a `CDCallback` in ``callbacks`` to override the config's CD settings. With
    ``cd_strength=0`` and ``tweo_weight=0`` (a baseline) nothing of CD is added: no callback, no
    ``hf_cd`` block in ``config.json`` and the Trainer's own model card. What stays is the
    ``output_dir`` lock and three fixes of the Trainer's own behaviour that a baseline needs as much
    as a CD run: resumed checkpoints load through ``from_pretrained`` (transformers 5 resumes ViT
    keys silently wrong), ``train_loss`` covers the whole run after a resume, and NaN weights are
    refused before the first step. With ``qat_bits`` the model is prepared for QAT
    (`hf_cd.quant.prepare_qat`) on ``qat_calibration_data`` (else ``train_dataset``) unless it already
    is; CD then decays its latent float weights.
    """

    def __init__(
        self,
        model=None,
        args: TrainingArguments | None = None,
        *positional,
        callbacks=None,
        qat_calibration_data=None,
        **kwargs,
    ):
        args = _as_cd_config(args)
        self._qat_teacher = None
        if args.qat_bits is not None and model is not None:
            model = self._prepare_qat(model, args, qat_calibration_data, kwargs.get("train_dataset"))
        callbacks = list(callbacks or [])
        if args.cd_strength > 0 and not any(isinstance(cb, CDCallback) for cb in callbacks):
            callbacks.append(CDCallback(args.colinearity_decay))
        settings = RunSettings(run_settings(args, unwrap_model(model)) if model is not None else {})
        callbacks = [_LoadedWeightsCheck(), *callbacks, TrainLossTracker(), settings]
        super().__init__(model, args, *positional, callbacks=callbacks, **kwargs)
        self.resume_changes: list[dict] = []
        """Settings changed on resume (`hf_cd.training.resume`): ``{"step", "setting", "from", "to"}``, all resumes."""
        self._tweo = BlockOutputCollector(unwrap_model(self.model)) if args.tweo_weight > 0 else None
        self._tweo_sum: torch.Tensor | None = None
        self._tweo_steps = 0
        config = getattr(unwrap_model(self.model), "config", None)
        if config is not None and self.uses_cd:
            config.hf_cd = self.cd_settings

    @property
    def uses_cd(self) -> bool:
        """Whether this trainer changes training at all: CD, the TWEO baseline's penalty or QAT is on."""
        return self.cd_callback is not None or self._tweo is not None or self.args.qat_bits is not None

    # -- quantization-aware training ---------------------------------------------------------------

    def _prepare_qat(self, model, args: CDConfig, calibration_data, train_dataset):
        """The model to train for ``args.qat_bits`` (`hf_cd.quant.prepare_qat`), and the float teacher if distilling.

        Calibration images: ``qat_calibration_data`` (the recipe passes the eval-transformed training
        split, as PTQ uses), else ``train_dataset``.
        """
        from hf_cd import quant

        if quant.is_qat_model(model):
            prepared = quant.qat.qat_config(model)
            if prepared.label != args.qat_config().label:
                raise ValueError(
                    f"The model was prepared for QAT at {prepared.label} but qat_bits is {args.qat_bits}; "
                    "pass the float model, or the same bits."
                )
            qat_model = model
        else:
            data = calibration_data if calibration_data is not None else train_dataset
            if data is None:
                raise ValueError(
                    f"qat_bits={args.qat_bits} calibrates its initial step sizes on images: pass "
                    "qat_calibration_data=... (or a train_dataset) to CDTrainer."
                )
            qat_model = quant.prepare_qat(model, args.qat_config(), data)
        if args.qat_distill > 0:
            self._qat_teacher = quant.float_model(qat_model).eval().requires_grad_(False)
        return qat_model

    @property
    def is_qat(self) -> bool:
        from hf_cd.quant.qat import is_qat_model

        return self.model is not None and is_qat_model(self.model)

    def create_optimizer(self, model=None):
        """The Trainer's optimizer; for QAT the step sizes get a group of their own (``qat_step_lr``, no decay)."""
        optimizer = super().create_optimizer(model)
        if not self.is_qat or getattr(self, "_qat_group_added", False):
            return optimizer
        from hf_cd.quant.qat import step_size_parameters

        steps = step_size_parameters(self.model)
        if steps:
            ids = {id(p) for p in steps}
            for group in optimizer.param_groups:
                group["params"] = [p for p in group["params"] if id(p) not in ids]
            rate = self.args.qat_step_lr if self.args.qat_step_lr is not None else self.args.learning_rate
            optimizer.add_param_group({"params": steps, "lr": rate, "weight_decay": 0.0})
            self._qat_group_added = True
        return optimizer

    def _distillation_loss(self, inputs, outputs) -> torch.Tensor:
        """KL(float ‖ QAT) of the logits, per image, on the batch the model has just seen."""
        import torch.nn.functional as F

        logits = outputs["logits"] if isinstance(outputs, dict) else outputs.logits
        teacher = self._qat_teacher
        if next(teacher.parameters()).device != logits.device:
            teacher.to(logits.device)
        with torch.no_grad():
            target = teacher(pixel_values=inputs["pixel_values"]).logits
        return F.kl_div(
            F.log_softmax(logits.float(), dim=-1),
            F.log_softmax(target.float(), dim=-1),
            log_target=True,
            reduction="batchmean",
        )

    # -- training ------------------------------------------------------------------------------

    def train(self, resume_from_checkpoint=None, *args, **kwargs) -> TrainOutput:
        """`Trainer.train` holding the ``output_dir`` lock (`hf_cd.training.locking`), with the whole run's train loss.

        ``train_loss`` (the return value and the last log) is the mean over every step since step 0,
        also after resuming (the Trainer's own covers only the steps this call ran, and is then kept
        as ``train_loss_this_session``). A checkpoint at the end of its schedule is loaded, not trained
        one step further.
        """
        if resume_from_checkpoint is True:
            from hf_cd.training.checkpoints import latest_complete_checkpoint

            resume_from_checkpoint = latest_complete_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"No valid checkpoint found in output directory ({self.args.output_dir})")
        lock = OutputDirLock(self.args.output_dir) if self.args.should_save else None
        if lock is not None:
            lock.acquire()
        try:
            self._compare_resumed_settings(resume_from_checkpoint)
            finished = self._finished_checkpoint(resume_from_checkpoint)
            if finished is not None:
                return self._load_finished(resume_from_checkpoint, finished)
            output = super().train(resume_from_checkpoint, *args, **kwargs)
        finally:
            if lock is not None:
                lock.release()
        return TrainOutput(output.global_step, output.metrics.get("train_loss", float("nan")), output.metrics)

    @property
    def _run_settings(self) -> RunSettings:
        return next(cb for cb in self.callback_handler.callbacks if isinstance(cb, RunSettings))

    def _compare_resumed_settings(self, checkpoint) -> None:
        """Refuse a resume that changes what cannot change mid-run; apply, warn and record the rest."""
        record = self._run_settings
        if not isinstance(checkpoint, (str, os.PathLike)):
            self.resume_changes = []
            return
        state_path = os.path.join(checkpoint, "trainer_state.json")
        step = TrainerState.load_from_json(state_path).global_step if os.path.isfile(state_path) else 0
        earlier, changes = compare_on_resume(checkpoint, record.settings, step)
        self.resume_changes = record.changes = [*earlier, *changes]

    def _load_callback_state(self) -> None:
        # With restore_callback_states_from_checkpoint the Trainer rebuilds the callbacks from the
        # checkpoint's arguments: the settings changed on resume must win, as they do by default.
        super()._load_callback_state()
        record = self._run_settings
        record.settings = run_settings(self.args, unwrap_model(self.model))
        record.changes = list(self.resume_changes)
        callback = self.cd_callback
        changed = {cd_setting_name(change["setting"]): change["to"] for change in self.resume_changes}
        changed.pop(None, None)  # TWEO and the Trainer's own settings: read from args, not the callback
        if callback is not None and changed:
            callback.settings = replace(callback.settings, **changed)

    def _finished_checkpoint(self, checkpoint) -> TrainerState | None:
        """The checkpoint's state when it already is at the end of this run's schedule (else ``None``)."""
        if not isinstance(checkpoint, (str, os.PathLike)):
            return None
        path = os.path.join(checkpoint, "trainer_state.json")
        if not os.path.isfile(path):
            return None
        state = TrainerState.load_from_json(path)
        same_schedule = (
            self.args.max_steps == state.max_steps
            if self.args.max_steps > 0
            else float(self.args.num_train_epochs) == float(state.num_train_epochs or 0)
        )
        return state if same_schedule and state.max_steps and state.global_step >= state.max_steps else None

    def _load_finished(self, checkpoint: str, state: TrainerState) -> TrainOutput:
        logger.warning(
            "%s is already at step %d of %d: nothing is left to train; its weights are loaded as they are.",
            checkpoint,
            state.global_step,
            state.max_steps,
        )
        self._load_from_checkpoint(checkpoint)
        self.state = state
        for callback in self.callback_handler.callbacks:  # restore the CD step count and the loss sum
            if isinstance(callback, (CDCallback, TrainLossTracker)):
                callback.on_train_begin(self.args, state, self.control, model=self.model)
        tracker = self.loss_tracker
        metrics = {"train_steps_this_session": 0}
        if tracker.known and state.global_step:
            metrics["train_loss"] = tracker.loss_sum / state.global_step
        self.log(metrics)
        return TrainOutput(state.global_step, metrics.get("train_loss", float("nan")), metrics)

    @property
    def loss_tracker(self) -> TrainLossTracker:
        """Looked up each time, like `cd_callback` (restoring callback states replaces the object)."""
        return next(cb for cb in self.callback_handler.callbacks if isinstance(cb, TrainLossTracker))

    def _save_checkpoint(self, model, trial) -> None:
        self.loss_tracker.session = (
            float(self._total_loss_scalar) + float(self._tr_loss.item()),
            self.state.global_step,
        )
        super()._save_checkpoint(model, trial)

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
            settings.update(callback.settings.model_settings())
        else:
            settings["strength"] = 0.0
        return {"library": "hf-cd", "version": __version__, **settings}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if (self._tweo is None and self._qat_teacher is None) or not model.training:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if self._tweo is None:
            loss, outputs = super().compute_loss(model, inputs, True, num_items_in_batch)
            loss = self._with_distillation(loss, inputs, outputs, num_items_in_batch)
            return (loss, outputs) if return_outputs else loss
        with self._tweo.collect() as block_outputs:
            loss, outputs = super().compute_loss(model, inputs, True, num_items_in_batch)
            penalty = tweo_penalty(block_outputs, self.args.tweo_tau, self.args.tweo_p)
        if self._qat_teacher is not None:
            loss = self._with_distillation(loss, inputs, outputs, num_items_in_batch)
        detached = penalty.detach()
        self._tweo_sum = detached if self._tweo_sum is None else self._tweo_sum + detached
        self._tweo_steps += 1
        if self._loss_is_scaled_for_ga(num_items_in_batch):
            # The Trainer will not divide this loss by the accumulation steps; the penalty is a
            # per-micro-batch mean, so scale it here to keep its weight independent of accumulation.
            penalty = penalty / self.current_gradient_accumulation_steps
        loss = loss + self.args.tweo_weight * penalty
        return (loss, outputs) if return_outputs else loss

    def _with_distillation(self, loss, inputs, outputs, num_items_in_batch) -> torch.Tensor:
        """``(1 − α)·loss + α·KL``; the KL is a per-micro-batch mean, scaled for accumulation as the TWEO penalty."""
        divergence = self._distillation_loss(inputs, outputs)
        if self._loss_is_scaled_for_ga(num_items_in_batch):
            divergence = divergence / self.current_gradient_accumulation_steps
        alpha = self.args.qat_distill
        return (1.0 - alpha) * loss + alpha * divergence

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
        missing, unexpected = result.missing_keys, result.unexpected_keys
        if self.is_qat:  # the step sizes and zero-points are in a file of their own
            missing = self._load_qat_state(checkpoint, missing)
        if missing or unexpected:
            raise RuntimeError(
                f"Checkpoint {checkpoint} does not match the model: missing {missing[:5]}, "
                f"unexpected {unexpected[:5]}. Was it written by another architecture?"
            )

    def _load_qat_state(self, checkpoint: str, missing: list[str]) -> list[str]:
        """Load a checkpoint's `QAT_STATE_FILE` into the QAT model; return the keys still missing."""
        from safetensors.torch import load_file

        path = os.path.join(checkpoint, QAT_STATE_FILE)
        if not os.path.isfile(path):
            raise RuntimeError(
                f"Checkpoint {checkpoint} has no {QAT_STATE_FILE}: it was not written by a QAT run (qat_bits), "
                "so it holds no step sizes to resume from. Resume a QAT run's checkpoint, or start over."
            )
        tensors = load_file(path)
        result = unwrap_model(self.model).load_state_dict(tensors, strict=False)
        if result.unexpected_keys:
            raise RuntimeError(
                f"{path} does not match the QAT model (other bits or init?): unexpected {result.unexpected_keys[:5]}."
            )
        return [key for key in missing if key not in tensors]

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
        # training bar, weights readable like the config beside them, and each file whole or absent
        # (a kill mid-save leaves no half-written model.safetensors for a later command to read)
        qat_tensors = None
        if self.is_qat:  # the latent float weights as a plain checkpoint, the QAT tensors beside them
            from hf_cd.quant.qat import qat_state_dict

            qat_tensors = qat_state_dict(self.model)
            if state_dict is None:
                state_dict = unwrap_model(self.model).state_dict()
            state_dict = {name: tensor for name, tensor in state_dict.items() if name not in qat_tensors}
        target = output_dir if output_dir is not None else self.args.output_dir
        stage = self.args.should_save and not getattr(self, "is_distributed_loading_by_transformers", False)
        with no_transformers_progress_bars():
            if stage:
                with staged_files(target) as staging:
                    super()._save(str(staging), state_dict)
                    if qat_tensors is not None:
                        write_safetensors_atomic(os.path.join(staging, QAT_STATE_FILE), qat_tensors)
                    respect_umask(staging)
            else:
                super()._save(output_dir, state_dict)
                if qat_tensors is not None and self.args.should_save:
                    write_safetensors_atomic(os.path.join(target, QAT_STATE_FILE), qat_tensors)
        respect_umask(target)

    # -- model card ----------------------------------------------------------------------------

    def create_model_card(
        self,
        model_name: str | None = None,
        dataset: str | list[str] | None = None,
        finetuned_from: str | None = None,
        **kwargs,
    ) -> None:
        """Write the hf-cd card (`hf_cd.hub`), not the generic one, so `push_to_hub` uploads it.

        A baseline trainer (no CD, no TWEO, no QAT) writes the Trainer's own card instead. The card
        holds the CD settings. It also holds the quantized accuracy when ``output_dir``
        holds this run's ``results.json``. ``license``, ``language`` and ``tags`` go into its
        metadata; the other `Trainer.create_model_card` arguments describe the generic card and are ignored.
        """
        if not self.uses_cd:
            return super().create_model_card(
                model_name=model_name, dataset=dataset, finetuned_from=finetuned_from, **kwargs
            )
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
        if "train_loss" in logs and "train_steps_this_session" not in logs:
            self._whole_run_train_loss(logs)
        if "loss" not in logs:  # evaluation and end-of-training logs: the window stays for the next one
            return super().log(logs, start_time)
        callback = self.cd_callback
        if callback is not None:
            logs.update(callback.pop_log_metrics())
        if self._tweo_steps:
            logs["tweo/penalty"] = (self._tweo_sum / self._tweo_steps).item()
            self._tweo_sum, self._tweo_steps = None, 0
        super().log(logs, start_time)

    def _whole_run_train_loss(self, logs: dict[str, float]) -> None:
        """Turn the end-of-training log's ``train_loss`` into the mean over the whole run (see `train`)."""
        tracker = self.loss_tracker
        logs["train_steps_this_session"] = self.state.global_step - tracker.steps
        if tracker.steps == 0:
            return  # not resumed: the Trainer's number already covers the whole run
        logs["train_loss_this_session"] = logs["train_loss"]
        if tracker.known:
            logs["train_loss"] = (tracker.loss_sum + float(self._total_loss_scalar)) / max(
                self.state.global_step, 1
            )
        else:  # the steps before the resume are unknown: say so rather than pass part of the run off as all of it
            del logs["train_loss"]
