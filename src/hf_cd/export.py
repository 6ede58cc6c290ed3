"""Export a trained ViT / DeiT / Dinov2 classifier to a deployable file: float or int8 ONNX.

    hf-cd export --model_name_or_path runs/vit-cd --format onnx --output vit-cd.onnx
    hf-cd export --model_name_or_path runs/vit-cd --int8 --dataset_name fashion_mnist --output vit-cd-int8.onnx

(``python -m hf_cd.export`` is the same command; the dashed flags of earlier releases still work.)

The int8 file is the one ``evaluate_quantized(..., pipelines=("onnxruntime-int8",))`` measures:
the same export, the same `quantize_static` settings, calibrated on the same images (the
``--quant_num_calibration`` images drawn with ``--seed`` from the calibration split, as `hf_cd.quant`
draws them). Labels, input size and the quantization settings are written into the file's
ONNX metadata. Input ``pixel_values`` (batch, channels, height, width), output ``logits``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from hf_cd.errors import (
    CommandLineError,
    one_line_parser_errors,
    run_command,
)
from hf_cd.files import atomic_path, check_output_file
from hf_cd.quant.api import calibration_images_for
from hf_cd.quant.cli import add_saved_model_argument
from hf_cd.quant.config import BaseQuantConfig
from hf_cd.quant.prepare import check_quantizable
from hf_cd.quant.runtimes.onnx_export import DEFAULT_OPSET, EXPORT_ATTENTION_IMPLEMENTATIONS, export_onnx
from hf_cd.quant.runtimes.onnx_static_quant import (
    CALIBRATION_METHODS,
    OnnxRuntimeInt8Config,
    add_metadata,
    onnx_metadata,
    written_by_hf_cd,
)
from hf_cd.quant.runtimes.onnxruntime_int8 import OnnxRuntimeInt8Pipeline
from hf_cd.quant.spec import to_typed
from hf_cd.recipe.arguments import check_model_source

EXPORT_FORMATS: tuple[str, ...] = ("onnx",)
INT8_PIPELINE = "onnxruntime-int8"

logger = logging.getLogger("hf_cd.export")


def export_model(
    model: nn.Module,
    output: str | Path,
    *,
    format: str = "onnx",
    int8: bool = False,
    calib_data: Any = None,
    config: BaseQuantConfig | None = None,
) -> Path:
    """Write ``model`` to ``output`` as a float32 or int8 (``int8=True``) ONNX file; returns the path.

    Args:
        model: a ViT / DeiT / Dinov2 image classifier from transformers (left unchanged).
        output: the ``.onnx`` file to write.
        format: ``"onnx"`` (the only format so far).
        int8: statically quantize for ONNX Runtime's int8 CPU kernels (needs ``calib_data``).
        calib_data: calibration images in any form `hf_cd.quant.quantize` reads.
        config: an `OnnxRuntimeInt8Config`: calibration count, seed, batch size, embedding /
            classifier bits and the ONNX settings (another method's config gives its shared settings).
    """
    if format not in EXPORT_FORMATS:
        raise ValueError(f"Unknown export format {format!r}; supported: {', '.join(EXPORT_FORMATS)}.")
    config = to_typed(config) if config is not None else OnnxRuntimeInt8Config()
    if not isinstance(config, OnnxRuntimeInt8Config):
        config = OnnxRuntimeInt8Config(**config.shared())
    settings = config = config.replace(w_bits=8, a_bits=8)
    output = check_output_file(output, "output", ours=written_by_hf_cd)
    check_quantizable(model)  # NaN/Inf weights and unknown architectures, before any export work
    if int8 and calib_data is None:
        raise ValueError(
            "int8 export calibrates activation ranges: pass calib_data (e.g. 32 training images), or "
            "--dataset_name NAME on the command line."
        )
    # The file appears only once it passed the parity check and holds its metadata.
    with atomic_path(output) as tmp:
        if not int8:
            export_onnx(
                model,
                tmp,
                opset=settings.opset,
                dynamo=settings.dynamo,
                attn_implementation=settings.attention_implementation,
                atol=settings.parity_atol,
            )
            add_metadata(tmp, onnx_metadata(model, None, None, 0))
        else:
            images = calibration_images_for(config, calib_data)
            OnnxRuntimeInt8Pipeline()(model, config, images).save(tmp)
    return output


DEPRECATED_FLAGS: dict[str, str] = {
    "--model": "--model_name_or_path",
    "--calibration-dataset": "--dataset_name",
    "--calibration-split": "--calibration_split",
    "--num-calibration": "--quant_num_calibration",
    "--batch-size": "--quant_batch_size",
    "--calibration-method": "--calibration_method",
    "--activation-type": "--activation_type",
    "--embedding-bits": "--embedding_bits",
    "--classifier-bits": "--classifier_bits",
    "--attention-implementation": "--attention_implementation",
    "--qdq-only": "--qdq_only",
    "--torchscript-exporter": "--torchscript_exporter",
}
"""The flags of earlier releases → the names ``hf-cd train`` / ``hf-cd quantize`` use for the same things."""


def build_parser(prog: str = "hf-cd export") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_saved_model_argument(parser)
    parser.add_argument("--format", choices=EXPORT_FORMATS, default="onnx")
    parser.add_argument("--output", type=Path, required=True, help="the .onnx file to write")
    parser.add_argument("--int8", action="store_true", help="static int8 quantization (ONNX Runtime QDQ)")
    parser.add_argument(
        "--dataset_name",
        dest="calibration_dataset",
        default=None,
        help="calibration dataset for --int8 (anything `hf-cd quantize --dataset_name` reads)",
    )
    parser.add_argument("--calibration_split", default="train")
    parser.add_argument("--quant_num_calibration", dest="num_calibration", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quant_batch_size", dest="batch_size", type=int, default=32)
    parser.add_argument("--calibration_method", choices=CALIBRATION_METHODS, default="minmax")
    parser.add_argument("--activation_type", choices=("uint8", "int8"), default="uint8")
    parser.add_argument(
        "--embedding_bits", type=int, default=8, help="8, or 16+ to keep the patch embedding float"
    )
    parser.add_argument(
        "--classifier_bits", type=int, default=8, help="8, or 16+ to keep the classifier float"
    )
    parser.add_argument(
        "--opset", type=int, default=DEFAULT_OPSET, help="ONNX opset (20: GELU as one op ORT fuses)"
    )
    parser.add_argument(
        "--attention_implementation",
        choices=[name for name in EXPORT_ATTENTION_IMPLEMENTATIONS if name],
        default="eager",
        help="transformers attention the exported copy runs (eager: no softmax NaN guard in the graph)",
    )
    parser.add_argument(
        "--qdq_only",
        action="store_true",
        help="--int8 with standard ONNX ops only (QDQ), for runtimes other than ONNX Runtime; by default "
        "each int8 linear is ONNX Runtime's MatMulIntegerToFloat with its bias inside (faster)",
    )
    parser.add_argument(
        "--torchscript_exporter", action="store_true", help="use torch's deprecated TorchScript exporter"
    )
    return one_line_parser_errors(parser)


def _calibration_split(args: argparse.Namespace, model: nn.Module) -> Any:
    """The calibration split, prepared with the model's image processor exactly as `python -m hf_cd.quant` does."""
    from hf_cd.quant.cli import load_splits

    split_args = argparse.Namespace(
        dataset=args.calibration_dataset,
        eval_split=args.calibration_split,
        calibration_split=args.calibration_split,
        max_eval_samples=None,
        seed=args.seed,
        model=args.model,
    )
    return load_splits(split_args, model)[1]


def main(argv: Sequence[str] | None = None, prog: str = "hf-cd export") -> int:
    """Export as the flags say; a bad flag, path, model or dataset is one line on stderr and exit status 2."""
    return run_command(lambda rest: _main(rest, prog), argv, DEPRECATED_FLAGS, prog)


def _main(argv: list[str], prog: str) -> int:
    args = build_parser(prog).parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.int8 and args.calibration_dataset is None:
        raise CommandLineError(
            "--int8 calibrates activation ranges: pass --dataset_name NAME (e.g. fashion_mnist)."
        )
    for flag, value in (
        ("--quant_num_calibration", args.num_calibration),
        ("--quant_batch_size", args.batch_size),
    ):
        if value < 1:
            raise CommandLineError(f"{flag} must be a positive integer, got {value}.")
    check_output_file(args.output, "--output", ours=written_by_hf_cd)
    check_model_source(args.model, "--model_name_or_path")
    try:  # every setting is checked before the model loads
        config = OnnxRuntimeInt8Config(
            calibration_method=args.calibration_method,
            activation_type=args.activation_type,
            opset=args.opset,
            attention_implementation=args.attention_implementation,
            fuse_linear_bias=not args.qdq_only,
            dynamo=not args.torchscript_exporter,
            embedding_bits=args.embedding_bits,
            classifier_bits=args.classifier_bits,
            num_calibration=args.num_calibration,
            seed=args.seed,
            batch_size=args.batch_size,
            progress=False,
        )
        if args.int8:
            OnnxRuntimeInt8Pipeline().check(config)
    except (TypeError, ValueError) as error:
        raise CommandLineError(str(error)) from None
    from transformers import AutoModelForImageClassification

    model = AutoModelForImageClassification.from_pretrained(args.model).eval()
    check_quantizable(model)  # NaN/Inf weights or an unknown architecture, before the data loads
    calib_data = _calibration_split(args, model) if args.int8 else None
    path = export_model(
        model, args.output, format=args.format, int8=args.int8, calib_data=calib_data, config=config
    )
    kind = (
        f"int8 QDQ, {args.calibration_method} calibration on {args.num_calibration} images of "
        f"{args.calibration_dataset}/{args.calibration_split} (seed {args.seed})"
        if args.int8
        else "float32"
    )
    print(f"wrote {path} ({path.stat().st_size / 2**20:.2f} MiB, {kind})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
