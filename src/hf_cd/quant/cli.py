"""``python -m hf_cd.quant``: quantize a saved model with every pipeline and report top-1 accuracy.

    python -m hf_cd.quant --model runs/vit-cd --dataset fashion_mnist --bits 8,8 6,6 4,4 --output ptq.json

``--dataset`` is anything `hf_cd.data.load_image_dataset` reads (a registered name, an imagefolder
tree, a ``save_to_disk`` directory with ``image`` / ``label``), or a ``save_to_disk`` directory
already holding ``pixel_values`` / ``labels``. Images are prepared with the image processor saved
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
    command_errors,
    one_line,
    one_line_parser_errors,
    redacted_argv,
    split_debug_flag,
)
from hf_cd.files import atomic_write_text, check_output_file
from hf_cd.quant.config import PROTOCOLS, QuantConfig, parse_bits
from hf_cd.quant.evaluate import DEFAULT_BITS, DEFAULT_PIPELINES, check_rows, evaluate_quantized
from hf_cd.quant.prepare import check_quantizable
from hf_cd.quant.registry import available_pipelines, get_pipeline
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
            f'--extra must be a JSON object, e.g. \'{{"rotate_solver": "gptaq"}}\': {error}'
        ) from error
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"--extra must be a JSON object (key: value), got {text!r}.")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m hf_cd.quant",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", required=True, help="directory of a from_pretrained image classifier")
    parser.add_argument(
        "--dataset", default="fashion_mnist", help="dataset name or directory (default: fashion_mnist)"
    )
    parser.add_argument("--eval-split", default="test")
    parser.add_argument("--calibration-split", default="train")
    parser.add_argument(
        "--pipelines", nargs="+", default=list(DEFAULT_PIPELINES), help=f"any of {available_pipelines()}"
    )
    parser.add_argument(
        "--bits", nargs="+", type=_bits_pair, default=list(DEFAULT_BITS), help="W,A pairs, e.g. 8,8 4,4"
    )
    parser.add_argument(
        "--protocol",
        choices=list(PROTOCOLS),
        default="deploy",
        help="bits of the patch embedding and classifier: "
        + "; ".join(f"{name}: {what}" for name, what in PROTOCOLS.items()),
    )
    parser.add_argument(
        "--embedding-bits", type=int, default=8, help="patch-embedding bits (deploy protocol)"
    )
    parser.add_argument("--classifier-bits", type=int, default=8, help="classifier bits (deploy protocol)")
    parser.add_argument(
        "--extra",
        type=_json_object,
        default={},
        help="pipeline options as a JSON object (QuantConfig.extra), e.g. "
        '\'{"rotate_activations": "dynamic_per_token", "rotate_solver": "gptaq"}\'',
    )
    parser.add_argument("--num-calibration", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-eval-samples", type=int, default=None, help="evaluate on a stratified subset")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, … (default: cuda if available)")
    parser.add_argument("--output", type=Path, default=None, help="write the rows and settings as JSON here")
    parser.add_argument("--markdown", type=Path, default=None, help="write the markdown table here")
    parser.add_argument("--no-progress", action="store_true")
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
    from transformers import AutoImageProcessor, ViTImageProcessor

    try:
        return AutoImageProcessor.from_pretrained(model_dir)
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
    dataset = load_image_dataset(args.dataset, max_eval_samples=args.max_eval_samples, seed=args.seed)
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
        "command": " ".join(["python -m hf_cd.quant", *(shlex.quote(a) for a in redacted_argv(arguments))]),
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


def _checked_config(args: argparse.Namespace) -> QuantConfig:
    """The settings, and every (pipeline, bits) row they make, checked before the model loads."""
    if args.max_eval_samples is not None and args.max_eval_samples < 1:
        raise CommandLineError(f"--max-eval-samples must be a positive integer, got {args.max_eval_samples}.")
    for pipeline in args.pipelines:
        get_pipeline(pipeline)  # UnknownPipelineError lists the known ones
    try:
        config = QuantConfig(
            protocol=args.protocol,
            embedding_bits=args.embedding_bits,
            classifier_bits=args.classifier_bits,
            num_calibration=args.num_calibration,
            seed=args.seed,
            batch_size=args.batch_size,
            progress=not args.no_progress,
            extra=args.extra,
        )
        # e.g. an 8-bit runtime asked for W4A4: refused before the model loads
        check_rows(
            [config.replace(pipeline=p, w_bits=w, a_bits=a) for p in args.pipelines for w, a in args.bits]
        )
    except (TypeError, ValueError) as error:
        raise CommandLineError(one_line(error)) from None
    return config


def main(argv: Sequence[str] | None = None) -> int:
    """Quantize and evaluate as the flags say; a bad flag, path, model or dataset is one line and exit status 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    with command_errors(argv):
        return _main(split_debug_flag(argv)[1])


def _main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    # Everything that can be wrong is checked before the model loads and any row is measured.
    config = _checked_config(args)
    if args.output is not None:
        check_output_file(args.output, "--output", ours=_is_our_json)
    if args.markdown is not None:
        check_output_file(args.markdown, "--markdown", ours=_is_our_markdown)
    check_model_source(str(args.model), "--model")
    from transformers import AutoModelForImageClassification

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    model = AutoModelForImageClassification.from_pretrained(args.model).to(device).eval()
    check_quantizable(model)  # NaN/Inf weights or an unknown architecture, before the data loads
    eval_split, calibration_split = load_splits(args, model)
    results = evaluate_quantized(
        model, eval_split, calibration_split, pipelines=args.pipelines, bits=args.bits, config=config
    )
    table = results.to_markdown(float_format=".2f")
    print(table)
    provenance = _provenance(device, argv)
    if args.output is not None:
        settings = {k: v for k, v in config.to_dict().items() if k not in ("w_bits", "a_bits", "pipeline")}
        payload = {
            **provenance,
            "model": str(args.model),
            "dataset": str(args.dataset),
            "eval_split": args.eval_split,
            "calibration_split": args.calibration_split,
            "pipelines": list(args.pipelines),
            "bits": [list(pair) for pair in args.bits],
            "config": settings,
            "rows": results.to_dicts(),
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
