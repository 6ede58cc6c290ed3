"""`evaluate_quantized`: top-1 accuracy of the float model and of every (pipeline, bits) quantized copy."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from hf_cd.architectures import classifiers
from hf_cd.files import atomic_write_text, check_output_file
from hf_cd.quant.api import calibration_images_for
from hf_cd.quant.calibration import forward_images
from hf_cd.quant.config import BaseQuantConfig, parse_bits_list
from hf_cd.quant.inputs import check_pixel_values, check_reiterable, iterate_batches, num_batches
from hf_cd.quant.prepare import check_quantizable
from hf_cd.quant.registry import pipeline_for
from hf_cd.quant.results import FULL_PRECISION, QuantResults, result_row
from hf_cd.quant.spec import (
    QuantConfig,
    config_to_dict,
    config_to_spec,
    parse_quant_spec,
    parse_spec_string,
    to_typed,
)

logger = logging.getLogger(__name__)

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
    digest: Any = None,
) -> tuple[float, int, torch.Tensor | None]:
    """Accuracy, image count and (``capture_features``) classifier inputs; ``digest`` (a hashlib
    object) is fed every image and label, which fingerprints the evaluation data."""
    modes = {module: module.training for module in model.modules()}
    model.eval()
    correct = total = 0
    features: list[torch.Tensor] = []
    handle = _classifier_input_hook(model, features) if capture_features else None
    try:
        batches = iterate_batches(eval_data, batch_size, need_labels=True)
        for index, (pixel_values, labels) in enumerate(
            tqdm(
                batches,
                total=num_batches(eval_data, batch_size),
                desc=description,
                unit="batch",
                disable=not progress,
                leave=False,
            )
        ):
            check_pixel_values(pixel_values, model, "Evaluation images", value_range=index == 0)
            if digest is not None:
                _update_digest(digest, pixel_values)
                _update_digest(digest, labels)
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


def _update_digest(digest: Any, tensor: torch.Tensor) -> None:
    tensor = tensor.detach().cpu().contiguous()
    digest.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
    digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())


def model_fingerprint(model: nn.Module) -> str:
    """A hash of every tensor in ``model.state_dict()`` (names, dtypes, shapes and values)."""
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(unwrap_state(model).items()):
        digest.update(name.encode())
        _update_digest(digest, tensor)
    return digest.hexdigest()


def unwrap_state(model: nn.Module) -> dict[str, torch.Tensor]:
    from hf_cd.architectures import unwrap_model

    return unwrap_model(model).state_dict()


def _row_fingerprint(parts: dict[str, Any], settings: dict[str, Any], feature_cosine: bool) -> str:
    settings = {k: v for k, v in settings.items() if k != "progress"}
    payload = json.dumps(
        {**parts, "settings": settings, "feature_cosine": feature_cosine}, sort_keys=True, default=str
    )
    return hashlib.blake2b(payload.encode(), digest_size=12).hexdigest()


def check_rows(configs: Sequence[BaseQuantConfig]) -> None:
    """Each row's pipeline checks its config, so every row's problem is reported before any row runs."""
    for row_config in configs:
        pipeline_for(row_config).check(row_config)


def row_configs(
    pipelines: Sequence[str | BaseQuantConfig],
    bits: Sequence[tuple[int, int]],
    config: BaseQuantConfig | None,
    extra: Mapping[str, Any] | None = None,
) -> list[tuple[str, BaseQuantConfig, dict[str, Any]]]:
    """``(pipeline name, config, settings)`` of every row: each method at each bits, with ``config``'s
    shared settings; ``extra`` (``--quant_extra``, or a deprecated `QuantConfig`'s) gives every method
    its own options and leaves the others' alone.

    ``settings`` is the row as the one-config spelling wrote it (shared settings, ``pipeline``,
    ``extra``): what a row's fingerprint hashes, so rows persisted before the typed configs are reused.
    """
    base = config or BaseQuantConfig()
    extra = {**(base.extra if isinstance(base, QuantConfig) else {}), **(extra or {})}
    rows = []
    for entry in pipelines:
        for w_bits, a_bits in bits:
            shared = {**base.shared(), "w_bits": w_bits, "a_bits": a_bits}
            if isinstance(entry, BaseQuantConfig):
                row = to_typed(entry).replace(**shared)
                name, settings = row.name, config_to_dict(row)
            else:
                name, options = parse_spec_string(entry)
                row = parse_quant_spec(entry, extra=extra, **shared)
                settings = {**shared, "pipeline": name, "extra": {**extra, **options}}
            rows.append((name, row, settings))
    return rows


def _is_rows_file(path: Path) -> bool:
    """A ``results_file`` written before (``{"rows": [...]}``); an empty or half-written one counts too."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError):
        return False
    try:
        payload = json.loads(text)
    except ValueError:
        return not text.strip() or text.lstrip().startswith('{"rows"')
    return isinstance(payload, dict) and isinstance(payload.get("rows"), list)


def read_done_rows(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The rows a `results_file` holds (none when it does not exist or does not parse)."""
    path = Path(path)
    if not path.is_file():
        return []
    try:
        rows = json.loads(path.read_text()).get("rows", [])
    except (ValueError, AttributeError):
        logger.warning("%s does not parse; its rows are measured again.", path)
        return []
    return [row for row in rows if isinstance(row, dict)]


def _write_rows_atomic(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    atomic_write_text(path, json.dumps({"rows": list(rows)}, indent=2) + "\n")


def mean_feature_cosine(reference: torch.Tensor, quantized: torch.Tensor) -> float:
    """Mean over images of the cosine between the float and the quantized model's classifier input."""
    if reference.shape != quantized.shape:
        raise ValueError(f"Feature shapes differ: {tuple(reference.shape)} vs {tuple(quantized.shape)}.")
    return float(torch.nn.functional.cosine_similarity(reference, quantized, dim=-1).mean())


def evaluate_quantized(
    model: nn.Module,
    eval_data: Any,
    calib_data: Any,
    pipelines: Sequence[str | BaseQuantConfig] = DEFAULT_PIPELINES,
    bits: Iterable[tuple[int, int]] = DEFAULT_BITS,
    config: BaseQuantConfig | None = None,
    feature_cosine: bool = False,
    *,
    extra: Mapping[str, Any] | None = None,
    results_file: str | os.PathLike | None = None,
    done_rows: Sequence[dict[str, Any]] = (),
    on_row: Callable[[list[dict[str, Any]]], None] | None = None,
) -> QuantResults:
    """Quantize ``model`` with every pipeline at every ``(w_bits, a_bits)`` and measure top-1 accuracy.

    Args:
        model: the float model (left unchanged).
        eval_data: labelled images: ``(pixel_values, labels)`` tensors, a DataLoader / list of batch
            dicts with ``labels``, or a ``datasets.Dataset``; read once per row, batch by batch.
        calib_data: calibration images (see `quantize`); the same draw serves every row.
        pipelines: methods, each a config (``RotateConfig(solver=GPTAQConfig())``) or its spelling
            (``"repq"``, ``"rotate_gptaq:rotate_activations=dynamic_per_token"``); one alone is a list of one.
        bits: ``(w_bits, a_bits)`` pairs for the encoder, or ``"W4A4"``-style labels.
        config: the shared settings of every row (bit protocol, embedding / classifier bits,
            calibration count, seed, batch size, …), e.g. ``BaseQuantConfig(num_calibration=64)``;
            its ``w_bits`` and ``a_bits`` are replaced per row.
        extra: options for several methods at once (``{"rotate_activations": "dynamic_per_token"}``,
            the recipe's ``--quant_extra``): each method takes its own keys and leaves the others.
        feature_cosine: also report, per fake-quant row, ``feature_cosine``: the mean cosine between
            the float and the quantized model's classifier input (the backbone feature a linear
            probe reads). It shows damage that top-1 accuracy hides until it flips predictions.
        results_file: a JSON file that receives every row as soon as it is measured (written
            atomically), so an interrupted evaluation keeps what it finished; rows already in it for
            the same model weights, settings and data are not measured again (a log line says how
            many). Such runs add a ``fingerprint`` key to each row.
        done_rows: rows of an earlier call (e.g. read back from a results file of one's own); those
            whose ``fingerprint`` matches this call's model, settings and data are reused.
        on_row: called after each row with the rows to persist (to keep them elsewhere, e.g. in a
            results.json of one's own): those done so far, then the reusable earlier rows not reached yet.

    The full-precision row is always measured: it is the reference, and its pass fingerprints the
    evaluation data.

    Returns:
        `QuantResults`: the full-precision row, then one row per (pipeline, bits) in the order given;
        the keys are documented in `hf_cd.quant.results`. Every quantized row names its ``protocol``
        and, in ``config``, the method and options it ran (`hf_cd.quant.spec.config_to_spec`).
    """
    base = config or BaseQuantConfig()
    if isinstance(pipelines, (str, BaseQuantConfig)):
        pipelines = [pipelines]
    bits = parse_bits_list(bits)
    check_reiterable(eval_data, "eval_data")
    check_quantizable(model)
    rows_planned = row_configs(pipelines, bits, base, extra)
    configs = [row_config for _, row_config, _ in rows_planned]
    results_path = None if results_file is None else Path(results_file)
    if results_path is not None:  # a file that is not a rows file is someone else's: never overwritten
        check_output_file(results_path, "results_file", ours=_is_rows_file)
        done_rows = [*done_rows, *read_done_rows(results_path)]
    persist = results_path is not None or on_row is not None or bool(done_rows)
    check_rows(configs)
    calibrated = [c for c in configs if c.quantizes_activations]
    images = (
        calibration_images_for(calibrated[0], calib_data, model) if calibrated else None
    )  # one draw for all rows

    start = time.perf_counter()
    data_digest = hashlib.blake2b(digest_size=16) if persist else None
    reference, num_eval, reference_features = _evaluate(
        model, eval_data, base.batch_size, base.progress, "full precision eval", feature_cosine, data_digest
    )
    fingerprint_parts = (
        {
            "model": model_fingerprint(model),
            "eval_data": data_digest.hexdigest(),
            "calibration": None if images is None else _digest_of(images),
        }
        if persist
        else None
    )
    fingerprints = [
        _row_fingerprint(fingerprint_parts, settings, feature_cosine) if persist else None
        for _, _, settings in rows_planned
    ]
    done = {
        row["fingerprint"]: row for row in done_rows if row.get("fingerprint") in set(fingerprints) - {None}
    }
    dtype_bits = torch.finfo(next(model.parameters()).dtype).bits
    rows: list[dict[str, Any]] = []

    def finished(row: dict[str, Any], fingerprint: str | None) -> None:
        if fingerprint is not None:
            row["fingerprint"] = fingerprint
        rows.append(row)
        if results_path is None and on_row is None:
            return
        emitted = {r.get("fingerprint") for r in rows}
        kept = rows + [r for fp, r in done.items() if fp not in emitted]  # never lose an earlier row
        if results_path is not None:
            _write_rows_atomic(results_path, kept)
        if on_row is not None:
            on_row(kept)

    finished(
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
        ),
        None,
    )
    reused = 0
    for (name, row_config, _), fingerprint in zip(rows_planned, fingerprints):
        if fingerprint in done:
            reused += 1
            finished(dict(done[fingerprint]), fingerprint)
            continue
        pipeline = pipeline_for(row_config)
        fields = {**pipeline.row_fields(row_config), "config": config_to_spec(row_config)}
        row_images = images if row_config.quantizes_activations else None
        # a real runtime measures itself: accuracy and latency against its own float model
        measured = pipeline.evaluate(model, row_config, row_images, eval_data)
        if measured is not None:
            finished(
                result_row(
                    pipeline=name,
                    runtime=pipeline.runtime_for(row_config),
                    seed=row_config.seed,
                    reference_accuracy=reference,
                    protocol=row_config.protocol,
                    **{**fields, **measured},
                ),
                fingerprint,
            )
            continue
        start = time.perf_counter()
        quantized = pipeline(model, row_config, row_images)
        quantize_seconds = time.perf_counter() - start
        start = time.perf_counter()
        accuracy, count, features = _evaluate(
            quantized,
            eval_data,
            base.batch_size,
            base.progress,
            f"{name} {row_config.label} eval",
            feature_cosine,
        )
        cosine = (
            {} if features is None else {"feature_cosine": mean_feature_cosine(reference_features, features)}
        )
        eval_seconds = time.perf_counter() - start
        state = getattr(quantized, "hf_cd_quant", None)
        del quantized
        finished(
            result_row(
                pipeline=name,
                runtime=pipeline.runtime_for(row_config),
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
            ),
            fingerprint,
        )
    if persist:
        logger.info(
            "Quantized evaluation: %d of %d rows reused from an earlier run (same model, settings and data), "
            "%d measured.",
            reused,
            len(configs),
            len(configs) - reused,
        )
    results = QuantResults(rows)
    results.num_reused = reused
    return results


def _digest_of(tensor: torch.Tensor) -> str:
    digest = hashlib.blake2b(digest_size=16)
    _update_digest(digest, tensor)
    return digest.hexdigest()
