"""``python -m hf_cd.quant``: quantize a saved model with every pipeline and report top-1 accuracy.

    hf-cd quantize --model_name_or_path runs/vit-cd --dataset_name fashion_mnist --quant_bits W8A8 W4A4 --output ptq.json

(``python -m hf_cd.quant`` is the same command.) ``--dataset_name`` is anything
`hf_cd.data.load_image_dataset` reads (a Hub id, a registered name, an imagefolder tree, parquet /
arrow / csv files, a ``save_to_disk`` directory with ``image`` / ``label``), or a ``save_to_disk``
directory already holding ``pixel_values`` / ``labels``. Options are spelt as in ``hf-cd train``;
the dashed spellings of earlier releases still work, with a warning. Images are prepared with the image processor saved
beside the model (a ViT-style resize and 0.5 / 0.5 normalization when there is none).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from hf_cd.data.errors import DatasetSchemaError
from hf_cd.data.loading import warn_if_capped
from hf_cd.errors import (
    CommandLineError,
    one_line,
    one_line_parser_errors,
    redacted_argv,
    run_command,
)
from hf_cd.files import atomic_write_text, check_output_file
from hf_cd.quant.config import PROTOCOLS, BaseQuantConfig, parse_bits
from hf_cd.quant.evaluate import DEFAULT_BITS, DEFAULT_PIPELINES, check_rows, evaluate_quantized, row_configs
from hf_cd.quant.prepare import check_quantizable
from hf_cd.quant.registry import available_pipelines
from hf_cd.quant.results import ACCURACY_UNIT, rows_as_fractions
from hf_cd.recipe.arguments import check_model_source

logger = logging.getLogger("hf_cd.quant")


def _bits_pair(text: str) -> tuple[int, int]:
    try:
        return parse_bits(text)
    except (TypeError, ValueError) as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(
            f'--quant_extra must be a JSON object, e.g. \'{{"rotate_solver": "gptaq"}}\': {error}'
        ) from error
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"--quant_extra must be a JSON object (key: value), got {text!r}.")
    return value


DEPRECATED_FLAGS: dict[str, str] = {
    "--model": "--model_name_or_path",
    "--dataset": "--dataset_name",
    "--eval-split": "--eval_split",
    "--calibration-split": "--calibration_split",
    "--pipelines": "--quant_pipelines",
    "--bits": "--quant_bits",
    "--embedding-bits": "--embedding_bits",
    "--classifier-bits": "--classifier_bits",
    "--extra": "--quant_extra",
    "--num-calibration": "--quant_num_calibration",
    "--batch-size": "--quant_batch_size",
    "--max-eval-samples": "--quant_max_eval_samples",
    "--no-progress": "--no_progress",
}
"""The flags of earlier releases → the names ``hf-cd train`` uses for the same things."""


def add_saved_model_argument(parser: argparse.ArgumentParser) -> None:
    """``--model_name_or_path DIR`` (``args.model``), spelt as ``hf-cd train`` spells the model source."""
    parser.add_argument(
        "--model_name_or_path",
        dest="model",
        metavar="DIR",
        required=True,
        help="directory of a from_pretrained image classifier (the output_dir of `hf-cd train`)",
    )


def build_parser(prog: str = "hf-cd quantize") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_saved_model_argument(parser)
    parser.add_argument(
        "--dataset_name",
        dest="dataset",
        default="fashion_mnist",
        help="Hub dataset id, registered name or local folder (default: fashion_mnist)",
    )
    parser.add_argument("--dataset_config_name", default=None, help="the Hub dataset's configuration")
    parser.add_argument("--dataset_revision", default=None, help="branch, tag or commit of a Hub dataset")
    parser.add_argument("--image_column_name", default=None, help="image column (default: image)")
    parser.add_argument("--label_column_name", default=None, help="label column (default: label)")
    parser.add_argument("--eval_split", default="test")
    parser.add_argument("--calibration_split", default="train")
    parser.add_argument(
        "--quant_pipelines",
        dest="pipelines",
        nargs="+",
        default=list(DEFAULT_PIPELINES),
        help=f"any of {available_pipelines()}, each optionally with its options: "
        "NAME:key=value,... (e.g. rotate_gptaq:rotate_activations=dynamic_per_token)",
    )
    parser.add_argument(
        "--quant_bits",
        dest="bits",
        nargs="+",
        type=_bits_pair,
        default=list(DEFAULT_BITS),
        help="bit widths, e.g. W8A8 W4A4 (or 8,8 4,4)",
    )
    parser.add_argument(
        "--protocol",
        choices=list(PROTOCOLS),
        default="deploy",
        help="bits of the patch embedding and classifier: "
        + "; ".join(f"{name}: {what}" for name, what in PROTOCOLS.items()),
    )
    parser.add_argument(
        "--embedding_bits", type=int, default=8, help="patch-embedding bits (deploy protocol)"
    )
    parser.add_argument("--classifier_bits", type=int, default=8, help="classifier bits (deploy protocol)")
    parser.add_argument(
        "--quant_extra",
        dest="extra",
        type=_json_object,
        default={},
        help="options for several pipelines at once as a JSON object (each takes its own keys), e.g. "
        '\'{"rotate_activations": "dynamic_per_token", "rotate_solver": "gptaq"}\'',
    )
    parser.add_argument(
        "--quant_num_calibration", dest="num_calibration", type=int, default=32, help="calibration images"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quant_batch_size", dest="batch_size", type=int, default=64)
    parser.add_argument(
        "--quant_max_eval_samples",
        dest="max_eval_samples",
        type=int,
        default=None,
        help="evaluate on a stratified subset of at most this many images of --eval_split",
    )
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, … (default: cuda if available)")
    parser.add_argument("--output", type=Path, default=None, help="write the rows and settings as JSON here")
    parser.add_argument("--markdown", type=Path, default=None, help="write the markdown table here")
    parser.add_argument("--no_progress", action="store_true")
    return one_line_parser_errors(parser)


def _has_pixel_values(path: Path) -> bool:
    """A save_to_disk directory whose rows are already model-ready tensors."""
    if not ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
        return False
    from datasets import load_from_disk

    loaded = load_from_disk(str(path))
    first = next(iter(loaded.values())) if hasattr(loaded, "keys") else loaded
    if "pixel_values" in first.column_names and "labels" not in first.column_names:
        raise DatasetSchemaError(
            f"{path} holds pixel_values but no labels column (it has {', '.join(first.column_names)}): "
            "save the labels beside the images as `labels`."
        )
    return "pixel_values" in first.column_names


def _image_processor(model_dir: Path, model) -> Any:
    from transformers import ViTImageProcessorPil as ViTImageProcessor

    from hf_cd.data.transforms import load_image_processor

    try:
        return load_image_processor(model_dir)
    except (OSError, ValueError):
        size = model.config.image_size
        channels = model.config.num_channels
        logger.warning(
            "No image processor saved in %s; using a ViT-style one (resize to %s, normalize with mean 0.5 / std 0.5). "
            "Save the processor you trained with beside the model to use it instead.",
            model_dir,
            size,
        )
        return ViTImageProcessor(
            size={"height": size, "width": size}, image_mean=[0.5] * channels, image_std=[0.5] * channels
        )


def load_splits(args: argparse.Namespace, model) -> tuple[Any, Any]:
    """``(eval_split, calibration_split)`` as datasets with ``pixel_values`` / ``labels`` rows."""
    path = Path(args.dataset)
    if path.is_dir() and _has_pixel_values(path):
        from datasets import DatasetDict, load_from_disk

        loaded = load_from_disk(str(path))
        if not isinstance(loaded, DatasetDict):
            raise SystemExit(
                f"{path} holds one split; save a DatasetDict with {args.eval_split!r} and {args.calibration_split!r}."
            )
        splits = {}
        for name in (args.eval_split, args.calibration_split):
            if name not in loaded:
                raise SystemExit(f"{path} has no split {name!r}; it has {sorted(loaded)}.")
            split = loaded[name]
            if args.max_eval_samples is not None and name == args.eval_split:
                warn_if_capped("evaluation images", args.max_eval_samples, len(split))
                split = split.select(range(min(args.max_eval_samples, len(split))))
            splits[name] = split.with_format("torch")
        return splits[args.eval_split], splits[args.calibration_split]
    try:
        from hf_cd.data import load_image_dataset, with_image_transforms
    except ImportError as error:  # pragma: no cover - only before hf_cd.data existed
        raise SystemExit(
            f"hf_cd.data.load_image_dataset is not available ({error}); pass --dataset DIR, a save_to_disk "
            "directory whose splits hold pixel_values and labels."
        ) from error
    dataset = load_image_dataset(
        args.dataset,
        label=getattr(args, "label_column_name", None),
        image_column=getattr(args, "image_column_name", None),
        config_name=getattr(args, "dataset_config_name", None),
        revision=getattr(args, "dataset_revision", None),
        max_eval_samples=args.max_eval_samples,
        seed=args.seed,
    )
    for name in (args.eval_split, args.calibration_split):
        if name not in dataset:
            raise SystemExit(f"Dataset {args.dataset!r} has no split {name!r}; it has {sorted(dataset)}.")
    # Every split gets the deterministic eval transform: calibration must not see augmented images.
    transformed = with_image_transforms(
        dataset, _image_processor(Path(args.model), model), model.config.num_channels, train_split="(none)"
    )
    return transformed[args.eval_split], transformed[args.calibration_split]


def _provenance(device: str, argv: Sequence[str] | None) -> dict[str, str]:
    """Date, code version, device and command, so a results file says where its numbers came from."""
    import datetime
    import platform
    import shlex

    import transformers

    from hf_cd._version import __version__, source_commit

    if device.startswith("cuda") and torch.cuda.is_available():
        description = torch.cuda.get_device_name(torch.device(device))
    else:
        description = f"CPU: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    arguments = list(argv) if argv is not None else sys.argv[1:]
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": source_commit(),
        "device": description,
        "command": " ".join(["hf-cd quantize", *(shlex.quote(a) for a in redacted_argv(arguments))]),
        "hf_cd": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def _is_our_json(path: Path) -> bool:
    """A JSON file this command wrote before (its rows and command), which a new run may replace."""
    try:
        payload = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(payload, dict) and {"rows", "command", "hf_cd"} <= payload.keys()


def _is_our_markdown(path: Path) -> bool:
    try:
        with path.open(encoding="utf-8") as handle:
            return handle.readline().startswith(MARKDOWN_TITLE)
    except (OSError, UnicodeDecodeError):
        return False


MARKDOWN_TITLE = "# Post-training quantization:"


def _checked_config(args: argparse.Namespace) -> BaseQuantConfig:
    """The settings, and every (pipeline, bits) row they make, checked before the model loads."""
    if args.max_eval_samples is not None and args.max_eval_samples < 1:
        raise CommandLineError(
            f"--quant_max_eval_samples must be a positive integer, got {args.max_eval_samples}."
        )
    try:
        config = BaseQuantConfig(
            protocol=args.protocol,
            embedding_bits=args.embedding_bits,
            classifier_bits=args.classifier_bits,
            num_calibration=args.num_calibration,
            seed=args.seed,
            batch_size=args.batch_size,
            progress=not args.no_progress,
        )
        # an unknown method or option, or e.g. an 8-bit runtime asked for W4A4: refused before the model loads
        check_rows([row for _, row, _ in row_configs(args.pipelines, args.bits, config, args.extra)])
    except (TypeError, ValueError) as error:
        raise CommandLineError(one_line(error)) from None
    return config


def main(argv: Sequence[str] | None = None, prog: str = "hf-cd quantize") -> int:
    """Quantize and evaluate as the flags say; a bad flag, path, model or dataset is one line and exit status 2."""
    return run_command(lambda rest: _main(rest, prog), argv, DEPRECATED_FLAGS, prog)


def _main(argv: list[str], prog: str) -> int:
    args = build_parser(prog).parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    # Everything that can be wrong is checked before the model loads and any row is measured.
    config = _checked_config(args)
    if args.output is not None:
        check_output_file(args.output, "--output", ours=_is_our_json)
    if args.markdown is not None:
        check_output_file(args.markdown, "--markdown", ours=_is_our_markdown)
    check_model_source(str(args.model), "--model_name_or_path")
    from transformers import AutoModelForImageClassification

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    model = AutoModelForImageClassification.from_pretrained(args.model).to(device).eval()
    check_quantizable(model)  # NaN/Inf weights or an unknown architecture, before the data loads
    eval_split, calibration_split = load_splits(args, model)
    results = evaluate_quantized(
        model,
        eval_split,
        calibration_split,
        pipelines=args.pipelines,
        bits=args.bits,
        config=config,
        extra=args.extra,
    )
    table = results.to_markdown(float_format=".2f")
    print(table)
    provenance = _provenance(device, argv)
    if args.output is not None:
        settings = {
            **{k: v for k, v in config.shared().items() if k not in ("w_bits", "a_bits")},
            "extra": args.extra,
        }
        payload = {
            **provenance,
            "model": str(args.model),
            "dataset": str(args.dataset),
            "eval_split": args.eval_split,
            "calibration_split": args.calibration_split,
            "pipelines": list(args.pipelines),
            "bits": [list(pair) for pair in args.bits],
            "config": settings,
            "accuracy_unit": ACCURACY_UNIT,  # fractions in [0, 1], as results.json; the printed table is percent
            "rows": rows_as_fractions(results.to_dicts()),
        }
        atomic_write_text(args.output, json.dumps(payload, indent=2) + "\n")
    if args.markdown is not None:
        header = "\n".join(
            f"- **{key}**: `{provenance[key]}`" for key in ("date", "commit", "device", "command")
        )
        atomic_write_text(
            args.markdown,
            f"{MARKDOWN_TITLE} {args.model} on {args.dataset} ({args.eval_split})\n\n{header}\n\n{table}\n",
        )
    return 0
