"""The result row format shared by `evaluate_quantized`, the benchmarks and the Hub card.

One row per (pipeline, bits), plus the full-precision row. Keys (stable; new keys may be added,
these are never renamed):

==================  ============================================================================
``pipeline``        registered pipeline name, or ``full_precision``
``runtime``         what ran it: ``float``, ``fake_quant`` (built-ins), or a real runtime's name
``w_bits``          encoder weight bits (≥ 16 = float; the full-precision row has the dtype's bits)
``a_bits``          encoder activation bits, incl. the attention matmul inputs
``embedding_bits``  patch-embedding weight and input bits (``repq_vit``: the weight's; the input is at 8)
``classifier_bits`` classifier weight and input bits (``repq_vit``: the weight's; the input is at ``a_bits``)
``protocol``        the bit protocol of patch embedding and classifier (`hf_cd.quant.config.PROTOCOLS`):
                    ``deploy`` or ``repq_vit`` (RepQ-ViT's published one); ``None`` for full precision
``activation_mode`` how encoder activations are quantized: ``static_per_tensor`` (calibrated ranges, what
                    an integer runtime's static graph runs) or ``dynamic_per_token`` (ranges per token
                    at run time: ``rotate``'s option, torchao's int8); ``None`` for full precision
``accuracy``        top-1 accuracy in percent (0–100) in these rows and benchmark records; the files
                    hf-cd writes for other programs (``results.json``, ``hf-cd quantize --output``,
                    the card's ``model-index``) hold it as a fraction in [0, 1], as ``evaluate`` and
                    the Trainer do (`rows_as_fractions`)
``accuracy_drop``   full-precision accuracy minus this one, in points (0 for full precision)
``num_eval``        images evaluated
``num_calibration`` calibration images used (0 for full precision)
``seed``            seed of the calibration draw
``quantize_seconds`` wall time of `quantize` (copy, calibration, weight quantization)
``eval_seconds``    wall time of the evaluation pass
``config``          the method and options the row ran, as ``NAME:key=value`` spells them
                    (`hf_cd.quant.spec.config_to_spec`; ``None`` for full precision); added after the
                    columns above, like the runtimes' keys below
``fingerprint``     only when results are persisted (``results_file`` / ``done_rows`` / ``on_row``):
                    a hash of the model weights, evaluation and calibration data and the row's
                    settings; a row with the same fingerprint is reused instead of measured again
==================  ============================================================================

Real-runtime rows (``runtime`` ``onnxruntime`` / ``torchao``) add these; ``<B>`` is a batch size
(1 and 32 for ONNX Runtime on the CPU, 256 for torchao on the GPU):

=============================  =================================================================
``float_accuracy``             accuracy of the same runtime's float model (ORT float32, bf16)
``latency_ms_batch<B>``        median wall time of one batch through the quantized model, in ms
``float_latency_ms_batch<B>``  the same for the runtime's float model, timed interleaved with it
``speedup_vs_float_batch<B>``  float latency over quantized latency at batch ``<B>``
``speedup_vs_float``           the speed-up at the largest batch measured (> 1: int8 is faster)
``num_threads``                ONNX Runtime intra-op threads, the same for float and int8
``throughput_images_per_s``    torchao: images per second at the timing batch (and
                               ``float_throughput_images_per_s`` for bf16)
=============================  =================================================================
"""

from __future__ import annotations

from typing import Any

from hf_cd.table import Table

RESULT_COLUMNS: tuple[str, ...] = (
    "pipeline",
    "runtime",
    "w_bits",
    "a_bits",
    "embedding_bits",
    "classifier_bits",
    "protocol",
    "activation_mode",
    "accuracy",
    "accuracy_drop",
    "num_eval",
    "num_calibration",
    "seed",
    "quantize_seconds",
    "eval_seconds",
)
FULL_PRECISION = "full_precision"


def result_row(
    *,
    pipeline: str,
    runtime: str,
    w_bits: int,
    a_bits: int,
    embedding_bits: int,
    classifier_bits: int,
    accuracy: float,
    num_eval: int,
    num_calibration: int,
    seed: int,
    quantize_seconds: float,
    eval_seconds: float,
    reference_accuracy: float | None = None,
    protocol: str | None = None,
    activation_mode: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """One row in `RESULT_COLUMNS` order; ``reference_accuracy`` (full precision) gives ``accuracy_drop``.

    ``protocol`` is ``None`` only for the full-precision row (nothing is quantized there).
    """
    row = {
        "pipeline": pipeline,
        "runtime": runtime,
        "w_bits": int(w_bits),
        "a_bits": int(a_bits),
        "embedding_bits": int(embedding_bits),
        "classifier_bits": int(classifier_bits),
        "protocol": protocol,
        "activation_mode": activation_mode,
        "accuracy": float(accuracy),
        "accuracy_drop": None if reference_accuracy is None else float(reference_accuracy) - float(accuracy),
        "num_eval": int(num_eval),
        "num_calibration": int(num_calibration),
        "seed": int(seed),
        "quantize_seconds": round(float(quantize_seconds), 3),
        "eval_seconds": round(float(eval_seconds), 3),
    }
    row.update(extra)
    return row


ACCURACY_KEYS: tuple[str, ...] = ("accuracy", "accuracy_drop", "float_accuracy")
"""The row keys that hold an accuracy (or a difference of two): percent in rows, a fraction in files."""
ACCURACY_UNIT = "fraction"
"""What ``accuracy_unit`` says in a file whose accuracies are in [0, 1] (files without it hold percent)."""


def _scaled(rows, factor: float) -> list[dict[str, Any]]:
    """Rows with their accuracies times ``factor``, to 10 decimals (0.285714 × 100 is not 28.571400000000004)."""
    return [
        {
            key: (round(value * factor, 10) if key in ACCURACY_KEYS and _is_number(value) else value)
            for key, value in row.items()
        }
        for row in rows
    ]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def rows_as_fractions(rows) -> list[dict[str, Any]]:
    """Rows with accuracies in [0, 1], for ``results.json`` and the other files programs read."""
    return _scaled(rows, 0.01)


def rows_as_percent(rows) -> list[dict[str, Any]]:
    """Rows read back from such a file, with accuracies in percent again (what `evaluate_quantized` compares)."""
    return _scaled(rows, 100.0)


class QuantResults(Table):
    """The rows of `evaluate_quantized` (a `Table`: ``to_dicts()``, ``to_markdown()``, ``to_pandas()``)."""

    def __init__(self, rows=(), columns=None):
        rows = [dict(row) for row in rows]
        if columns is None:  # the stable columns first, then any a row adds (real-runtime latency)
            added = dict.fromkeys(key for row in rows for key in row if key not in RESULT_COLUMNS)
            columns = [*RESULT_COLUMNS, *added]
        super().__init__(rows, columns)
        self.num_reused = 0
        """Rows `evaluate_quantized` took from an earlier run instead of measuring them."""

    def accuracy(self, pipeline: str, w_bits: int | None = None, a_bits: int | None = None) -> float:
        """The accuracy of one row, e.g. ``results.accuracy("repq", 4, 4)`` or ``results.accuracy("full_precision")``."""
        matches = [
            row
            for row in self.rows
            if row["pipeline"] == pipeline
            and (w_bits is None or row["w_bits"] == w_bits)
            and (a_bits is None or row["a_bits"] == a_bits)
        ]
        if len(matches) != 1:
            raise KeyError(
                f"{len(matches)} rows match pipeline={pipeline!r}, w_bits={w_bits}, a_bits={a_bits}."
            )
        return matches[0]["accuracy"]

    @property
    def full_precision_accuracy(self) -> float:
        return self.accuracy(FULL_PRECISION)
