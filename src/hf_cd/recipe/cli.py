"""``hf-cd train`` (and ``recipes/finetune.py``): logging, one-line errors, the end-of-run summary.

Why a module: the script stays a two-line entry point, and tests call the same `main` a user runs.
A bad option, dataset or model prints the library's own message on one line and exits with status 2;
``--debug`` (or ``HF_CD_DEBUG=1``) shows the traceback instead.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence

from hf_cd.architectures import UnsupportedArchitectureError
from hf_cd.callback import UnsupportedTrainingSetupError
from hf_cd.data.errors import CorruptImageError, DatasetSchemaError, EmptySplitError, UnknownDatasetError
from hf_cd.hub.errors import HubAccessError, ModelCardError, UnsafeWeightsError
from hf_cd.pretrained import PretrainedSourceError
from hf_cd.quant.inputs import CalibrationDataError
from hf_cd.quant.registry import UnknownPipelineError
from hf_cd.quant.runtimes.base import RuntimeUnavailableError
from hf_cd.recipe.arguments import (
    DEBUG_FLAG,
    PROG,
    RecipeArgumentError,
    parse_recipe_args,
    split_debug_flag,
)
from hf_cd.recipe.report import format_summary
from hf_cd.recipe.run import RecipeRun, run_recipe

DEBUG_ENV = "HF_CD_DEBUG"
USAGE_EXIT_CODE = 2  # what argparse uses for a bad command line

USER_ERRORS: tuple[type[BaseException], ...] = (
    RecipeArgumentError,
    UnknownDatasetError,
    DatasetSchemaError,
    EmptySplitError,
    CorruptImageError,
    UnknownPipelineError,
    UnsupportedArchitectureError,
    UnsupportedTrainingSetupError,
    CalibrationDataError,
    RuntimeUnavailableError,
    PretrainedSourceError,
    HubAccessError,
    ModelCardError,
    UnsafeWeightsError,
)
"""Errors about the user's input (options, data, model, Hub access), whose message says what to fix."""


def debug_requested(argv: Sequence[str]) -> bool:
    return split_debug_flag(argv)[0] or os.environ.get(DEBUG_ENV, "").strip().lower() in (
        "1",
        "true",
        "yes",
        "on",
    )


def one_line(error: BaseException) -> str:
    """The error's message with its lines joined, so the shell shows it whole on one line."""
    text = " ".join(part.strip() for part in str(error).splitlines() if part.strip())
    return text or type(error).__name__


def exit_on_user_error(error: BaseException, debug: bool) -> None:
    """Re-raise with ``--debug``; else print the one-line message and exit 2.

    The one call site of the error style, for every ``hf-cd`` subcommand (`hf_cd.cli`).
    """
    if debug:
        raise error
    print(
        f"error: {one_line(error)}  [{DEBUG_FLAG} or {DEBUG_ENV}=1 shows the traceback]",
        file=sys.stderr,
        flush=True,
    )
    raise SystemExit(USAGE_EXIT_CODE) from None


def main(argv: Sequence[str] | None = None, prog: str = PROG) -> RecipeRun:
    """Parse, run and print the summary; a bad option, dataset or model exits 2 with one line on stderr."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = debug_requested(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("hf_cd").setLevel(logging.INFO)  # parsing logs too (a config's model source replaced)
    try:
        args = parse_recipe_args(argv, prog=prog)
        if args.training.process_index != 0:
            logging.getLogger("hf_cd").setLevel(logging.WARNING)
        run = run_recipe(args)
    except USER_ERRORS as error:
        exit_on_user_error(error, debug)
    if run.results is not None:
        print(format_summary(run.results), flush=True)
    return run
