"""``hf-cd train`` (and ``recipes/finetune.py``): logging, one-line errors, the end-of-run summary.

Why a module: the script stays a two-line entry point, and tests call the same `main` a user runs.
A bad option, dataset or model prints the library's own message on one line and exits with status 2;
``--debug`` (or ``HF_CD_DEBUG=1``) shows the traceback instead.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

from hf_cd.errors import DEBUG_ENV, USAGE_EXIT_CODE, command_errors, debug_requested, one_line, user_errors
from hf_cd.recipe.parser import PROG, parse_recipe_args
from hf_cd.recipe.report import format_summary
from hf_cd.recipe.run import RecipeRun, end_process_group, run_recipe

__all__ = [
    "DEBUG_ENV",
    "USAGE_EXIT_CODE",
    "debug_requested",
    "end_process_group",
    "main",
    "one_line",
    "user_errors",
]


def main(argv: Sequence[str] | None = None, prog: str = PROG) -> RecipeRun:
    """Parse, run and print the summary; a bad option, dataset or model exits 2 with one line on stderr."""
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("hf_cd").setLevel(logging.INFO)  # parsing logs too (a config's model source replaced)
    try:
        with command_errors(argv):
            args = parse_recipe_args(argv, prog=prog)
            if args.training.process_index != 0:
                logging.getLogger("hf_cd").setLevel(logging.WARNING)
            run = run_recipe(args)
    finally:
        end_process_group()
    if run.results is not None:
        print(format_summary(run.results), flush=True)
    return run
