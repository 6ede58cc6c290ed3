"""What the recipe measures besides training: accuracy, alignment / outlier diagnostics, quantized accuracy."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import EvalPrediction

from hf_cd import quant
from hf_cd.diagnostics import (
    activation_stats,
    alignment_by_block,
    alignment_summary,
    measure_alignment,
    outlier_summary,
)
from hf_cd.quant.results import rows_as_fractions, rows_as_percent
from hf_cd.quant.saving import QAT_MODEL_DIR
from hf_cd.recipe.arguments import ModelArguments, QuantArguments, RecipeArgumentError
from hf_cd.table import Table
from hf_cd.training.config import CDConfig

logger = logging.getLogger(__name__)


def predictions_from_logits(logits, labels):
    """Keep the argmax only, so evaluation does not hold every logit (SUN397 has 397 classes)."""
    if isinstance(logits, (tuple, list)):  # DeiT with teacher: (logits, cls_logits, distillation_logits)
        logits = logits[0]
    return logits.argmax(dim=-1)


def accuracy_metric(prediction: EvalPrediction) -> dict[str, float]:
    predictions = np.asarray(prediction.predictions)
    labels = np.asarray(prediction.label_ids)
    return {"accuracy": float((predictions == labels).mean())}  # in [0, 1], as evaluate and Trainer cards


# --- diagnostics, quantization -------------------------------------------------------------------


@dataclass
class Diagnostics:
    """Pair alignment and activation outliers of one model state (before or after training)."""

    alignment: Table
    activations: Table

    def summary(self) -> dict[str, Any]:
        return {
            "alignment": alignment_summary(self.alignment),
            "alignment_by_block": {
                kind: {str(block): value for block, value in blocks.items()}
                for kind, blocks in alignment_by_block(self.alignment).items()
            },
            "outliers": outlier_summary(self.activations),
        }


def measure_diagnostics(
    model: torch.nn.Module, batch: Mapping[str, torch.Tensor], training_args: CDConfig
) -> Diagnostics:
    """The pairs CD decays (the same kinds / explicit pairs / layer-scale folding) and the outliers on ``batch``."""
    alignment = measure_alignment(
        model,
        training_args.cd_kinds,
        pairs=training_args.cd_pairs,
        fold_layer_scale=training_args.cd_fold_layer_scale,
        fold_norm=training_args.cd_fold_norm,
    )
    return Diagnostics(alignment, activation_stats(model, batch))


def _check_pipeline(config: quant.BaseQuantConfig) -> None:
    """The pipeline's own check of ``config`` (bits it cannot run, a runtime missing), as `evaluate_quantized` does."""
    quant.pipeline_for(config).check(config)


def check_quant_arguments(quant_args: QuantArguments, seed: int) -> None:
    """Fail before training, not after it, on an unknown pipeline, unsupported bit width or misspelt option.

    The rows are checked first without ``--quant_extra`` and then with it, so an error names the option
    that caused it.
    """
    if not quant_args.quant_eval:
        return
    for pipeline in quant_args.quant_pipelines:
        for w_bits, a_bits in quant_args.bit_pairs():
            try:
                shared = dict(
                    w_bits=w_bits,
                    a_bits=a_bits,
                    num_calibration=quant_args.quant_num_calibration,
                    batch_size=quant_args.quant_batch_size,
                    seed=seed,
                )
                _check_pipeline(quant.parse_quant_spec(pipeline, **shared))
            except ValueError as error:
                raise RecipeArgumentError(
                    f"--quant_pipelines {pipeline} at W{w_bits}A{a_bits}: {error} "
                    "(--no_quant_eval skips the quantized evaluation)"
                ) from error
            if not quant_args.quant_extra:
                continue
            try:
                _check_pipeline(
                    quant.parse_quant_spec(pipeline, extra=dict(quant_args.quant_extra), **shared)
                )
            except (ValueError, TypeError) as error:
                raise RecipeArgumentError(
                    f"--quant_extra (pipeline {pipeline} at W{w_bits}A{a_bits}): {error}"
                ) from error


def run_quantized_evaluation(
    model: torch.nn.Module,
    eval_dataset,
    calibration_dataset,
    quant_args: QuantArguments,
    seed: int,
    progress: bool = True,
    done_rows: Sequence[Mapping[str, Any]] = (),
    on_record: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Quantize the trained model with each pipeline and bit width and evaluate it; a record for results.json.

    ``calibration_dataset`` is the (eval-transformed) train split: `hf_cd.quant` draws
    ``quant_num_calibration`` images from it with ``seed``. Accuracies in the record's rows are
    fractions in [0, 1], as results.json holds them (``done_rows`` too). ``on_record`` receives the record (status ``running``) after each finished row, so the caller can
    write it out; rows in ``done_rows`` (an earlier run's) for the same model, settings and data are
    reused instead of measured again, and the record counts them in ``reused_rows``.
    """
    record: dict[str, Any] = {
        "pipelines": list(quant_args.quant_pipelines),
        "bits": list(quant_args.quant_bits),
        "extra": dict(quant_args.quant_extra),  # the pipelines' options (--quant_extra): which mode ran
        "num_calibration": min(quant_args.quant_num_calibration, len(calibration_dataset)),
        "eval_samples": len(eval_dataset),
        "protocol": quant.DEFAULT_PROTOCOL,  # the bit protocol of every row: what a runtime would deploy
        "rows": [],
    }
    if not quant_args.quant_eval:
        return {**record, "status": "skipped", "reason": "--no_quant_eval"}
    config = quant.BaseQuantConfig(
        num_calibration=quant_args.quant_num_calibration,
        batch_size=quant_args.quant_batch_size,
        seed=seed,
        progress=progress,
    )
    logger.info(
        "Quantized evaluation: %d pipelines × %d bit widths on %d test images.",
        len(quant_args.quant_pipelines),
        len(quant_args.quant_bits),
        len(eval_dataset),
    )
    table = quant.evaluate_quantized(
        model,
        eval_dataset,
        calibration_dataset,
        pipelines=list(quant_args.quant_pipelines),
        bits=quant_args.bit_pairs(),
        config=config,
        extra=dict(quant_args.quant_extra),
        done_rows=rows_as_percent(done_rows),
        on_row=None
        if on_record is None
        else lambda rows: on_record({**record, "status": "running", "rows": rows_as_fractions(rows)}),
    )
    if table.num_reused:
        logger.info(
            "Quantized evaluation: %d of %d rows were already in results.json for this model, settings and "
            "data; they were not measured again.",
            table.num_reused,
            len(table.rows) - 1,
        )
    return {
        **record,
        "status": "done",
        "reason": None,
        "rows": rows_as_fractions(table.to_dicts()),
        "reused_rows": table.num_reused,
    }


def check_qat_arguments(model_args: ModelArguments, training_args: CDConfig) -> None:
    """QAT and LoRA do not combine (the rounded weight would be W0 + B·A): refuse before any work."""
    if training_args.qat_bits and model_args.use_lora:
        raise RecipeArgumentError(
            f"--qat_bits {training_args.qat_bits} with --use_lora: QAT with LoRA is not supported (LoRA keeps "
            "B·A apart from the weight QAT rounds). Drop --use_lora to fine-tune every weight with QAT."
        )


def run_qat_evaluation(
    qat_model: torch.nn.Module,
    eval_dataset,
    quantized: dict[str, Any],
    output_dir,
    training_args: CDConfig,
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluate the trained QAT model (converted) on the quantized evaluation's images, add its row to
    ``quantized["rows"]`` (beside the PTQ rows, so the card's model-index carries it) and save it.

    The row's ``accuracy_drop`` is against the full-precision row, the latent float weights.
    """
    reference = next(  # the rows beside it are fractions (results.json); the row is built in percent
        (
            row["accuracy"]
            for row in rows_as_percent(quantized.get("rows", []))
            if row["pipeline"] == quant.FULL_PRECISION
        ),
        None,
    )
    converted = quant.convert(qat_model)
    row = quant.qat.qat_result_row(
        converted,
        eval_dataset,
        reference_accuracy=reference,
        progress=progress,
        qat_distill=training_args.qat_distill,
    )
    if quantized.get("status") == "done":  # results.json holds fractions, as the PTQ rows beside it
        quantized["rows"] = [*quantized["rows"], *rows_as_fractions([row])]
    saved = quant.save_quantized(converted, Path(output_dir) / QAT_MODEL_DIR)
    logger.info(
        "QAT W%dA%d: %.2f%% on %d test images; saved to %s.",
        row["w_bits"],
        row["a_bits"],
        row["accuracy"],
        row["num_eval"],
        saved,
    )
    return {"row": row, "model_dir": str(saved)}
