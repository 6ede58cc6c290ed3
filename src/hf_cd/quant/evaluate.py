"""`evaluate_quantized`: top-1 accuracy of the float model and of every (pipeline, bits) quantized copy."""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from hf_cd.architectures import classifiers
from hf_cd.quant.api import calibration_images_for
from hf_cd.quant.calibration import forward_images
from hf_cd.quant.config import QuantConfig
from hf_cd.quant.inputs import check_reiterable, iterate_batches, num_batches
from hf_cd.quant.prepare import check_quantizable
from hf_cd.quant.registry import get_pipeline
from hf_cd.quant.results import FULL_PRECISION, QuantResults, result_row

DEFAULT_PIPELINES: tuple[str, ...] = ("minmax", "percentile", "repq", "per_tensor")
DEFAULT_BITS: tuple[tuple[int, int], ...] = ((8, 8), (6, 6), (4, 4))


@torch.no_grad()
def evaluate_accuracy(
    model: nn.Module, eval_data: Any, batch_size: int = 64, progress: bool = True, description: str = "eval"
) -> tuple[float, int]:
    """Top-1 accuracy in percent and the number of images, one batch on the device at a time.

    The model is run in eval mode and its train/eval flags are restored afterwards.
    """
    accuracy, total, _ = _evaluate(
        model, eval_data, batch_size, progress, description, capture_features=False
    )
    return accuracy, total


def _classifier_input_hook(model: nn.Module, features: list[torch.Tensor]):
    """Keep the input of the model's first classifier, as the float model computes it (before any quantizer)."""
    heads = list(classifiers(model).values())
    if not heads:
        raise ValueError(f"{type(model).__name__} has no classifier whose input could be compared.")
    return heads[0].register_forward_pre_hook(
        lambda module, args: features.append(args[0].detach().float().cpu()), prepend=True
    )


@torch.no_grad()
def _evaluate(
    model: nn.Module,
    eval_data: Any,
    batch_size: int,
    progress: bool,
    description: str,
    capture_features: bool,
) -> tuple[float, int, torch.Tensor | None]:
    modes = {module: module.training for module in model.modules()}
    model.eval()
    correct = total = 0
    features: list[torch.Tensor] = []
    handle = _classifier_input_hook(model, features) if capture_features else None
    try:
        batches = iterate_batches(eval_data, batch_size, need_labels=True)
        for pixel_values, labels in tqdm(
            batches,
            total=num_batches(eval_data, batch_size),
            desc=description,
            unit="batch",
            disable=not progress,
            leave=False,
        ):
            logits = forward_images(model, pixel_values).logits
            correct += (logits.argmax(-1).cpu() == labels.cpu()).sum().item()
            total += labels.shape[0]
    finally:
        if handle is not None:
            handle.remove()
        for module, training in modes.items():
            module.training = training
    if total == 0:
        raise ValueError("The evaluation data is empty: no labelled images to measure accuracy on.")
    return 100.0 * correct / total, total, torch.cat(features) if capture_features else None


def mean_feature_cosine(reference: torch.Tensor, quantized: torch.Tensor) -> float:
    """Mean over images of the cosine between the float and the quantized model's classifier input."""
    if reference.shape != quantized.shape:
        raise ValueError(f"Feature shapes differ: {tuple(reference.shape)} vs {tuple(quantized.shape)}.")
    return float(torch.nn.functional.cosine_similarity(reference, quantized, dim=-1).mean())


def evaluate_quantized(
    model: nn.Module,
    eval_data: Any,
    calib_data: Any,
    pipelines: Sequence[str] = DEFAULT_PIPELINES,
    bits: Iterable[tuple[int, int]] = DEFAULT_BITS,
    config: QuantConfig | None = None,
    feature_cosine: bool = False,
) -> QuantResults:
    """Quantize ``model`` with every pipeline at every ``(w_bits, a_bits)`` and measure top-1 accuracy.

    Args:
        model: the float model (left unchanged).
        eval_data: labelled images: ``(pixel_values, labels)`` tensors, a DataLoader / list of batch
            dicts with ``labels``, or a ``datasets.Dataset``; read once per row, batch by batch.
        calib_data: calibration images (see `quantize`); the same draw serves every row.
        pipelines: registered pipeline names.
        bits: ``(w_bits, a_bits)`` pairs for the encoder.
        config: the other settings (bit protocol, embedding / classifier bits, calibration count,
            seed, batch size, …); its ``w_bits``, ``a_bits`` and ``pipeline`` are replaced per row.
        feature_cosine: also report, per fake-quant row, ``feature_cosine``: the mean cosine between
            the float and the quantized model's classifier input (the backbone feature a linear
            probe reads). It shows damage that top-1 accuracy hides until it flips predictions.

    Returns:
        `QuantResults`: the full-precision row, then one row per (pipeline, bits) in the order given;
        the keys are documented in `hf_cd.quant.results`. Every quantized row names its ``protocol``.
    """
    base = config or QuantConfig()
    check_reiterable(eval_data, "eval_data")
    check_quantizable(model)
    configs = [base.replace(pipeline=name, w_bits=w, a_bits=a) for name in pipelines for w, a in bits]
    for row_config in configs:  # every row's problem is reported before any row runs
        check = getattr(get_pipeline(row_config.pipeline), "check", None)
        if callable(check):
            check(row_config)
    calibrated = [c for c in configs if c.quantizes_activations]
    images = (
        calibration_images_for(calibrated[0], calib_data) if calibrated else None
    )  # one draw for all rows

    start = time.perf_counter()
    reference, num_eval, reference_features = _evaluate(
        model, eval_data, base.batch_size, base.progress, "full precision eval", feature_cosine
    )
    dtype_bits = torch.finfo(next(model.parameters()).dtype).bits
    rows = [
        result_row(
            pipeline=FULL_PRECISION,
            runtime="float",
            w_bits=dtype_bits,
            a_bits=dtype_bits,
            embedding_bits=dtype_bits,
            classifier_bits=dtype_bits,
            accuracy=reference,
            num_eval=num_eval,
            num_calibration=0,
            seed=base.seed,
            quantize_seconds=0.0,
            eval_seconds=time.perf_counter() - start,
            reference_accuracy=reference,
            **({"feature_cosine": 1.0} if feature_cosine else {}),
        )
    ]
    for row_config in configs:
        pipeline = get_pipeline(row_config.pipeline)
        describe = getattr(pipeline, "row_fields", None)
        fields = describe(row_config) if callable(describe) else {}
        evaluate_itself = getattr(pipeline, "evaluate", None)
        if callable(evaluate_itself):  # a real runtime measures itself: accuracy and latency vs its own float
            row_images = images if row_config.quantizes_activations else None
            measured = evaluate_itself(model, row_config, row_images, eval_data)
            rows.append(
                result_row(
                    pipeline=row_config.pipeline,
                    runtime=pipeline.runtime,
                    seed=row_config.seed,
                    reference_accuracy=reference,
                    protocol=row_config.protocol,
                    **{**fields, **measured},
                )
            )
            continue
        start = time.perf_counter()
        quantized = pipeline(model, row_config, images if row_config.quantizes_activations else None)
        quantize_seconds = time.perf_counter() - start
        start = time.perf_counter()
        accuracy, count, features = _evaluate(
            quantized,
            eval_data,
            base.batch_size,
            base.progress,
            f"{row_config.pipeline} {row_config.label} eval",
            feature_cosine,
        )
        cosine = (
            {} if features is None else {"feature_cosine": mean_feature_cosine(reference_features, features)}
        )
        eval_seconds = time.perf_counter() - start
        state = getattr(quantized, "hf_cd_quant", None)
        del quantized
        rows.append(
            result_row(
                pipeline=row_config.pipeline,
                runtime=pipeline.runtime,
                w_bits=row_config.w_bits,
                a_bits=row_config.a_bits,
                embedding_bits=row_config.embedding_weight_bits,
                classifier_bits=row_config.classifier_weight_bits,
                protocol=row_config.protocol,
                accuracy=accuracy,
                num_eval=count,
                num_calibration=state.num_calibration
                if state is not None
                else (0 if images is None else images.shape[0]),
                seed=row_config.seed,
                quantize_seconds=quantize_seconds,
                eval_seconds=eval_seconds,
                reference_accuracy=reference,
                **fields,
                **cosine,
            )
        )
    return QuantResults(rows)
