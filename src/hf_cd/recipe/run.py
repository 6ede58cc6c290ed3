"""`run_recipe`: one run from data to saved model, results.json, plots and card."""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datasets import DatasetDict
from transformers import set_seed

from hf_cd import hub, quant
from hf_cd._version import __version__
from hf_cd.data import (
    ImagePreprocessing,
    collate_fn,
    label_mapping,
    with_image_transforms,
)
from hf_cd.data.loading import subsample_stratified
from hf_cd.diagnostics import (
    plot_activation_stats,
    plot_alignment,
)
from hf_cd.extras import has_extra_package
from hf_cd.files import check_writable_dir, staged_files
from hf_cd.finite import require_finite_weights
from hf_cd.quant.results import ACCURACY_UNIT, rows_as_fractions
from hf_cd.recipe.arguments import (
    LORA_ADAPTER_DIR,
    QuantArguments,
    RecipeArgumentError,
    RecipeArguments,
)
from hf_cd.recipe.comparison import check_comparable, compare_results, load_compared_results
from hf_cd.recipe.data import (
    SeededAugmentation,
    check_resumable_augmentation,
    eval_transformed,
    first_batch,
    load_recipe_data,
)
from hf_cd.recipe.evaluation import (
    accuracy_metric,
    check_qat_arguments,
    check_quant_arguments,
    measure_diagnostics,
    predictions_from_logits,
    run_qat_evaluation,
    run_quantized_evaluation,
)
from hf_cd.recipe.model import (
    add_lora,
    build_model,
    checkpoint_config,
    describe_model,
    describe_normalization,
    preset_normalization,
)
from hf_cd.recipe.report import (
    ACTIVATION_PLOT,
    ALIGNMENT_PLOT,
    RESULTS_FILE,
    moment_labels,
    plot_title,
    rounded,
    write_json_atomic,
    write_model_card,
)
from hf_cd.training.checkpoints import checkpoint_dirs, latest_complete_checkpoint
from hf_cd.training.config import CDConfig
from hf_cd.training.locking import LOCK_FILE, OS_LOCK_FILE, OutputDirLock
from hf_cd.training.trainer import CDTrainer, no_transformers_progress_bars, respect_umask

logger = logging.getLogger(__name__)


RESUME_LATEST = ("latest", "last", "true")
"""Values of ``--resume_from_checkpoint`` that mean "the newest checkpoint-* in output_dir"."""

# --- the run -------------------------------------------------------------------------------------


def resolve_checkpoint(training_args: CDConfig) -> str | None:
    """The checkpoint to resume from: an explicit path, or ``latest`` → newest ``checkpoint-*`` in output_dir."""
    requested = training_args.resume_from_checkpoint
    output_dir = training_args.output_dir
    if requested is None or str(requested).lower() in ("", "false", "none"):
        if checkpoint_dirs(output_dir):
            logger.warning(
                "%s holds checkpoints of an earlier run; this run starts over. Pass --resume_from_checkpoint "
                "latest to continue that run instead.",
                output_dir,
            )
        return None
    if str(requested).lower() in RESUME_LATEST:
        last = latest_complete_checkpoint(output_dir, expect_optimizer=not training_args.save_only_model)
        if last is None:
            found = checkpoint_dirs(output_dir)
            what = (
                f"only incomplete checkpoints ({', '.join(p.name for p in found)}; see the warning above)"
                if found
                else "no checkpoint-* directory"
            )
            raise RecipeArgumentError(
                f"--resume_from_checkpoint {requested}: {output_dir!r} holds {what}. "
                "Give a checkpoint path, or the output_dir of the run to continue."
            )
        return last
    if not os.path.isdir(requested):
        raise RecipeArgumentError(f"--resume_from_checkpoint {requested!r} is not a directory.")
    return str(requested)


@dataclass
class RecipeRun:
    """What `run_recipe` leaves behind: the trainer (with the trained model) and, on the main process, results."""

    trainer: CDTrainer
    results: dict[str, Any] | None


def run_recipe(args: RecipeArguments) -> RecipeRun:
    """Train, evaluate, quantize, diagnose and save as ``args`` say (see the module docstring).

    The main process holds the ``output_dir`` lock (`hf_cd.training.locking`) for the whole run, so a second
    run on the same directory is refused with the first one's pid.
    """
    if args.training.process_index != 0:
        return _run_recipe(args)
    check_run_output_dir(args.training.output_dir)
    with OutputDirLock(args.training.output_dir):
        return _run_recipe(args)


RUN_OUTPUT_MARKERS: tuple[str, ...] = (
    RESULTS_FILE,
    LOCK_FILE,
    OS_LOCK_FILE,
    "trainer_state.json",
    "training_args.bin",
    "all_results.json",
    "train_results.json",
)
"""Files a recipe run (or the Trainer it drives) leaves in output_dir: a folder holding one is an earlier run's."""


def check_run_output_dir(output_dir: str | os.PathLike) -> None:
    """Refuse an output_dir that holds files no run wrote: the run would overwrite its README.md, config.json...

    Why: a run writes weights, config, card and plots straight into output_dir. An existing folder
    is taken only when it is empty or an earlier run's (it holds a `RUN_OUTPUT_MARKERS` file or a
    ``checkpoint-*`` folder), so ``--output_dir .`` inside a project is refused before any work.
    """
    folder = Path(output_dir).expanduser()
    check_writable_dir(folder, "--output_dir")
    if not folder.is_dir() or not any(folder.iterdir()):
        return
    if any((folder / name).exists() for name in RUN_OUTPUT_MARKERS) or checkpoint_dirs(folder):
        return
    raise RecipeArgumentError(
        f"--output_dir {str(output_dir)!r} holds files that no hf-cd run wrote (no {RESULTS_FILE}, trainer_state.json "
        "or checkpoint-*); a run would overwrite its README.md, config.json and weights. Give an empty or new "
        "folder."
    )


def _earlier_quantized_rows(results_path: Path) -> list[dict[str, Any]]:
    """The quantized rows an earlier run on this output_dir left in results.json (reused where they match)."""
    try:
        saved = json.loads(results_path.read_text())
        earlier = saved.get("quantized") or {}
    except (OSError, ValueError, AttributeError):
        return []
    rows = earlier.get("rows") or earlier.get("earlier_rows") or []
    rows = [row for row in rows if isinstance(row, dict) and row.get("fingerprint")]
    # fractions, as results.json holds them; a file from before accuracy_unit held percent
    return rows if saved.get("accuracy_unit") == ACCURACY_UNIT else rows_as_fractions(rows)


def _training_record(train_output) -> dict[str, Any]:
    """``train_loss`` over the whole run (also after a resume), or ``None`` with the reason when unknown."""
    metrics = train_output.metrics
    loss = metrics.get("train_loss")
    record: dict[str, Any] = {
        "train_loss": None if loss is None or math.isnan(loss) else loss,
        "train_loss_steps": train_output.global_step,
        "train_steps_this_session": metrics.get("train_steps_this_session"),
    }
    if "train_loss_this_session" in metrics:
        record["train_loss_this_session"] = metrics["train_loss_this_session"]
    if record["train_loss"] is None:
        record["train_loss_steps"] = None
        record["train_loss_note"] = (
            "unknown: resumed from a checkpoint that does not record the loss of the steps before it "
            "(train_loss_this_session covers this session's steps only)"
        )
    return record


def _run_recipe(args: RecipeArguments) -> RecipeRun:
    started = time.perf_counter()
    model_args, data_args, training_args, quant_args = args
    output_dir = Path(training_args.output_dir)
    checkpoint = resolve_checkpoint(training_args)
    is_main = training_args.process_index == 0
    earlier_rows = _earlier_quantized_rows(output_dir / RESULTS_FILE) if is_main else []
    data_seed = training_args.data_seed if training_args.data_seed is not None else training_args.seed
    check_quant_arguments(quant_args, data_seed)
    check_qat_arguments(model_args, training_args)
    check_resumable_augmentation(training_args)
    compared = _compared_results(quant_args, output_dir)  # on every rank, so that every rank refuses alike

    if model_args.model_name_or_path:
        checkpoint_config(model_args)  # a missing model fails now, not after the data has loaded
    raw = load_recipe_data(data_args, data_seed)
    eval_subset = (
        subsample_stratified(raw["test"], quant_args.quant_max_eval_samples, data_seed)
        if is_main or compared is not None
        else None
    )
    if compared is not None:
        check_comparable(
            *compared,
            dataset_name=data_args.dataset_name,
            test_samples=len(raw["test"]),
            quant_eval_samples=len(eval_subset) if quant_args.quant_eval else None,
            num_calibration=min(quant_args.quant_num_calibration, len(raw["train"]))
            if quant_args.quant_eval
            else None,
        )
    labels = label_mapping(raw)
    logger.info(
        "Data: %s with %d classes; %s images.",
        data_args.dataset_name,
        labels["num_labels"],
        " / ".join(f"{split} {len(raw[split]):,}" for split in raw),
    )
    set_seed(training_args.seed)  # the same initial weights on every rank and on resume
    normalization = preset_normalization(model_args, raw["train"], data_seed)
    model, image_processor = build_model(model_args, labels, normalization)
    require_finite_weights(model, "before training starts")  # before the diagnostics' SVDs meet it
    num_channels = model.config.num_channels
    evaluation = with_image_transforms(
        DatasetDict({"validation": raw["validation"], "test": raw["test"]}), image_processor, num_channels
    )
    train_dataset = SeededAugmentation(
        raw["train"],
        ImagePreprocessing.from_image_processor(image_processor, num_channels),
        scale=tuple(data_args.crop_scale),
        ratio=tuple(data_args.crop_ratio),
        flip_probability=data_args.flip_probability,
        seed=data_seed,
    )
    run_warnings = [w for w in (few_steps_warning(len(train_dataset), training_args),) if w]
    for warning in run_warnings if is_main else ():
        logger.warning(warning)
    diagnostics_batch = first_batch(evaluation["validation"], data_args.diagnostics_samples)
    before = measure_diagnostics(model, diagnostics_batch, training_args) if is_main else None
    described_model = describe_model(model, model_args)
    trained = add_lora(model, model_args) if model_args.use_lora else model

    trainer = CDTrainer(
        model=trained,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=evaluation["validation"],
        data_collator=collate_fn,
        processing_class=image_processor,
        compute_metrics=accuracy_metric,
        preprocess_logits_for_metrics=predictions_from_logits,
        callbacks=[SeededAugmentation.EpochCallback(train_dataset)],
        # QAT's initial step sizes: calibrated on the training split as the PTQ rows are
        qat_calibration_data=eval_transformed(raw["train"], image_processor, num_channels)
        if training_args.qat_bits
        else None,
    )
    logger.info("Model: %s, %.2f M parameters.", model_args.source, model.num_parameters() / 1e6)
    train_started = time.perf_counter()
    train_output = trainer.train(resume_from_checkpoint=checkpoint)
    train_seconds = time.perf_counter() - train_started
    if model_args.use_lora:  # the adapter alone; the merged, deployable model follows after the test
        trainer.save_model(str(output_dir / LORA_ADAPTER_DIR))
    else:
        trainer.save_model(str(output_dir))
    trainer.save_state()

    test_started = time.perf_counter()
    test_metrics = trainer.evaluate(evaluation["test"], metric_key_prefix="test")
    test_seconds = time.perf_counter() - test_started
    end_process_group(together=True)  # the test evaluation was the last collective: what follows is rank 0's
    if not is_main:
        return RecipeRun(trainer, None)
    if model_args.use_lora:
        # What deploys is the merged model: it is quantized, diagnosed and saved like any other.
        model = trainer.model.merge_and_unload()
        with no_transformers_progress_bars(), staged_files(output_dir) as staging:
            model.save_pretrained(staging)
            image_processor.save_pretrained(staging)
        respect_umask(output_dir)

    qat_model = trainer.model if trainer.is_qat else None
    if qat_model is not None:  # the PTQ rows and the diagnostics start from the latent float weights
        model = quant.float_model(qat_model)
    state = trainer.state
    results: dict[str, Any] = {
        "hf_cd_version": __version__,
        "accuracy_unit": ACCURACY_UNIT,  # every accuracy below is in [0, 1]
        "dataset": {
            "name": data_args.dataset_name,
            "label": data_args.label_column_name,
            **{  # a Hub dataset's subset and pinned revision, when given
                key: value
                for key, value in (
                    ("config_name", data_args.dataset_config_name),
                    ("revision", data_args.dataset_revision),
                )
                if value is not None
            },
            "num_labels": labels["num_labels"],
            "train_samples": len(raw["train"]),
            "validation_samples": len(raw["validation"]),
            "test_samples": len(raw["test"]),
            "normalization": describe_normalization(image_processor, model_args, normalization),
            **(
                {  # only when asked for, so default runs keep their results.json as it was
                    "corrupt_images_skipped": {
                        split: len(found)
                        for split, found in getattr(raw, "corrupt_images", {}).items()
                        if found
                    }
                }
                if data_args.skip_corrupt_images
                else {}
            ),
        },
        "model": described_model,
        "training": {
            "global_step": state.global_step,
            "max_steps": state.max_steps,
            "epochs": state.epoch,
            **_training_record(train_output),
            "learning_rate": training_args.learning_rate,
            "per_device_train_batch_size": training_args.per_device_train_batch_size,
            "world_size": training_args.world_size,
            "resumed_from": checkpoint,
            "resume_changes": trainer.resume_changes,
            "seed": training_args.seed,
        },
        "cd_settings": trainer.cd_settings,
        "test": {"accuracy": test_metrics["test_accuracy"], "loss": test_metrics["test_loss"]},
        "validation": _last_validation(state.log_history),
        "quantized": {"status": "pending", "earlier_rows": earlier_rows},
        "warnings": run_warnings,
        "diagnostics": {"num_images": len(diagnostics_batch["pixel_values"]), "before": before.summary()},
        "output_dir": str(output_dir),
        "model_card": None,
        "wall_time_s": {"train": train_seconds, "test_eval": test_seconds},
    }
    results_path = output_dir / RESULTS_FILE
    write_json_atomic(results_path, results)  # full-precision results survive an interrupted quantization

    logger.info(
        "Test accuracy %.2f%%; results so far in %s.", 100 * results["test"]["accuracy"], results_path
    )
    model.eval()
    quant_started = time.perf_counter()

    def write_running(record: dict[str, Any]) -> None:  # each finished row reaches results.json at once
        results["quantized"] = record
        write_json_atomic(results_path, results)

    results["quantized"] = run_quantized_evaluation(
        model,
        eval_transformed(eval_subset, image_processor, num_channels),
        eval_transformed(raw["train"], image_processor, num_channels),
        quant_args,
        data_seed,
        progress=not training_args.disable_tqdm,
        done_rows=earlier_rows,
        on_record=write_running,
    )
    if qat_model is not None:
        results["qat"] = run_qat_evaluation(
            qat_model,
            eval_transformed(eval_subset, image_processor, num_channels),
            results["quantized"],
            output_dir,
            training_args,
            progress=not training_args.disable_tqdm,
        )
    results["wall_time_s"]["quant_eval"] = time.perf_counter() - quant_started

    after = measure_diagnostics(model, diagnostics_batch, training_args)
    results["diagnostics"]["after"] = after.summary()
    title, (start, end) = plot_title(results), moment_labels(results)
    if has_extra_package("matplotlib"):
        plot_alignment({start: before.alignment, end: after.alignment}, output_dir / ALIGNMENT_PLOT, title)
        plot_activation_stats(
            {start: before.activations, end: after.activations}, output_dir / ACTIVATION_PLOT, title
        )
        results["plots"] = {
            "alignment": str(output_dir / ALIGNMENT_PLOT),
            "activation_max": str(output_dir / ACTIVATION_PLOT),
        }
    else:  # the numbers are in results.json either way
        logger.warning("No plots: they need matplotlib, pip install 'hf-cd[plots]'.")
        results["plots"] = {}
    if compared is not None:
        compared_file, compared_run = compared
        results["comparison"] = compare_results(results, compared_run, compared_file)
    card = write_model_card(output_dir, rounded(results))  # the card shows results.json's numbers
    results["model_card"] = None if card is None else str(card)
    results["wall_time_s"]["total"] = time.perf_counter() - started
    write_json_atomic(results_path, results)
    if training_args.push_to_hub:
        # The Trainer pushed at save time, before the test and quantized numbers existed: push the
        # finished card, weights and results.json (and nothing else) now.
        hub.push_cd_model(
            trainer.hub_model_id,
            output_dir,
            private=training_args.hub_private_repo,
            token=training_args.hub_token,
        )
    return RecipeRun(trainer, rounded(results))  # as results.json holds them


def _compared_results(quant_args: QuantArguments, output_dir: Path) -> tuple[Path, dict[str, Any]] | None:
    """``--compare_with``'s results, read before any work; this run's own results.json is refused."""
    if quant_args.compare_with is None:
        return None
    file, other = load_compared_results(quant_args.compare_with)
    if file.resolve() == (output_dir / RESULTS_FILE).resolve():
        raise RecipeArgumentError(
            f"--compare_with {quant_args.compare_with!r} is this run's own results.json (--output_dir), which "
            "the run rewrites: give another run's."
        )
    return file, other


def end_process_group(together: bool = False) -> None:
    """Destroy the distributed process group this run started, if any; ``together`` waits for every rank first.

    Why: after the test evaluation only rank 0 works (quantized evaluation, diagnostics, card), and a
    rank that leaves while a peer still holds the gloo group open can abort in the group's destructor or
    hang at exit. So every rank leaves at the same point, as a plain DDP script ends: a barrier, then
    the group is destroyed on all ranks before rank 0 goes on alone (the pattern of pytorch/pytorch#75097).
    Without ``together`` (the command's ``finally``, after an error) no rank waits for peers that may
    never arrive. Garbage (FSDP/DTensor cycles that may hold gloo work) is collected first, while the
    group is alive: freed at interpreter exit it can abort the process (pytorch/pytorch#65231).
    """
    import gc

    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    gc.collect()
    if together and dist.get_world_size() > 1:
        dist.barrier()
    dist.destroy_process_group()


FEW_OPTIMIZER_STEPS = 100
"""Below this many optimizer steps a run warns: a ViT from scratch is barely past warm-up by then."""


def planned_optimizer_steps(num_train_samples: int, training_args: CDConfig) -> int:
    """The optimizer steps the Trainer will take (``max_steps``, or epochs × batches per epoch)."""
    if training_args.max_steps is not None and training_args.max_steps > 0:
        return int(training_args.max_steps)
    per_step = training_args.per_device_train_batch_size * max(training_args.world_size, 1)
    batches = (
        num_train_samples // per_step
        if training_args.dataloader_drop_last
        else math.ceil(num_train_samples / per_step)
    )
    return math.ceil(
        training_args.num_train_epochs * max(batches // training_args.gradient_accumulation_steps, 1)
    )


def few_steps_warning(num_train_samples: int, training_args: CDConfig) -> str | None:
    """A warning when the run is too short to train much, saying which options lengthen it."""
    steps = planned_optimizer_steps(num_train_samples, training_args)
    if steps >= FEW_OPTIMIZER_STEPS:
        return None
    how = (
        f"--max_steps {training_args.max_steps}"
        if training_args.max_steps is not None and training_args.max_steps > 0
        else f"{training_args.num_train_epochs:g} epoch(s) of {num_train_samples:,} images at "
        f"{training_args.per_device_train_batch_size * max(training_args.world_size, 1)} per step"
    )
    return (
        f"Only {steps} optimizer steps ({how}): too few to train a model well (a ViT from scratch needs "
        f"hundreds). Raise --num_train_epochs or lower --per_device_train_batch_size."
    )


def _last_validation(log_history: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    for entry in reversed(log_history):
        if "eval_accuracy" in entry:
            return {
                "accuracy": entry["eval_accuracy"],
                "loss": entry.get("eval_loss"),
                "epoch": entry.get("epoch"),
            }
    return None
