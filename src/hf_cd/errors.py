"""One error style for every hf-cd command: one line on stderr, exit status 2, ``--debug`` for the traceback.

Why one module: the recipe, ``python -m hf_cd.quant``, ``python -m hf_cd.export`` and
``python -m hf_cd.pretrained`` each failed their own way (a one-liner, a traceback with exit 1, a
bare `SystemExit` message). Each entry point now runs its work inside `command_errors`, and each
argument parser reports through `one_line_parser_errors`, so a user sees the same thing everywhere.
No message leaves the process with a secret in it (`redact`).
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TypeVar

DEBUG_FLAG = "--debug"
DEBUG_ENV = "HF_CD_DEBUG"
USAGE_EXIT_CODE = 2  # what argparse uses for a bad command line

SECRET_MARK = "<hidden>"
_TOKEN_SHAPE = re.compile(r"hf_[A-Za-z0-9]{6,}")
_SECRET_FLAG = re.compile(r"^--?[\w-]*(token|password|secret)[\w-]*$", re.IGNORECASE)


class CommandLineError(ValueError):
    """A command-line argument that cannot work; the message names it and the fix."""


def user_errors() -> tuple[type[BaseException], ...]:
    """Errors about the user's input (options, data, model, files, Hub access) whose message says what to fix.

    Imported here, lazily, so that this module stays importable from anywhere in hf_cd.
    """
    from hf_cd.architectures import UnsupportedArchitectureError
    from hf_cd.cd.decay import NonFiniteWeightsError
    from hf_cd.data.errors import CorruptImageError, DatasetSchemaError, EmptySplitError, UnknownDatasetError
    from hf_cd.extras import MissingExtraError
    from hf_cd.files import OutputPathError
    from hf_cd.hub.errors import HubAccessError, ModelCardError, UnsafeWeightsError
    from hf_cd.pretrained import PretrainedSourceError
    from hf_cd.quant.inputs import CalibrationDataError
    from hf_cd.quant.registry import UnknownPipelineError
    from hf_cd.quant.runtimes.base import RuntimeUnavailableError
    from hf_cd.quant.runtimes.onnx_export import OnnxExportError, OnnxParityError
    from hf_cd.recipe.arguments import RecipeArgumentError
    from hf_cd.training.callback import UnsupportedTrainingSetupError
    from hf_cd.training.locking import OutputDirLockedError
    from hf_cd.training.resume import ResumeSettingsError

    return (
        CommandLineError,
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
        NonFiniteWeightsError,
        OutputPathError,
        OutputDirLockedError,
        OnnxExportError,
        OnnxParityError,
        ResumeSettingsError,
        MissingExtraError,
    )


# --- secrets -------------------------------------------------------------------------------------


def secret_values(argv: Sequence[str] | None = None) -> list[str]:
    """The values of ``--*token*`` / ``--*password*`` / ``--*secret*`` flags in ``argv``, and ``$HF_TOKEN``."""
    argv = list(sys.argv if argv is None else argv)
    found = []
    for i, arg in enumerate(argv):
        name, equals, value = arg.partition("=")
        if _SECRET_FLAG.match(name):
            if equals:
                found.append(value)
            elif i + 1 < len(argv):
                found.append(argv[i + 1])
    found += [os.environ[name] for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN") if os.environ.get(name)]
    return [value for value in found if value]


def redact(text: str, secrets: Sequence[str] = ()) -> str:
    """``text`` without the given secrets, the command line's token values, or anything shaped like an HF token."""
    for secret in sorted({*secrets, *secret_values()}, key=len, reverse=True):
        if len(secret) >= 4:
            text = text.replace(secret, SECRET_MARK)
    return _TOKEN_SHAPE.sub("hf_" + SECRET_MARK, text)


def redacted_argv(argv: Sequence[str]) -> list[str]:
    """``argv`` with the value of every secret flag (``--hub_token X``, ``--hub_token=X``) replaced."""
    out: list[str] = []
    hide_next = False
    for arg in argv:
        if hide_next:
            out.append(SECRET_MARK)
            hide_next = False
            continue
        name, equals, _ = arg.partition("=")
        if _SECRET_FLAG.match(name):
            out.append(f"{name}={SECRET_MARK}" if equals else arg)
            hide_next = not equals
        else:
            out.append(redact(arg))
    return out


# --- the error style -----------------------------------------------------------------------------


def split_debug_flag(argv: Sequence[str]) -> tuple[bool, list[str]]:
    """Whether a bare ``--debug`` (no value after it) was given, and the arguments without it.

    Why bare only: ``--debug underflow_overflow`` is TrainingArguments' own option and goes to the Trainer.
    """
    argv = list(argv)
    bare = [
        i
        for i, arg in enumerate(argv)
        if arg == DEBUG_FLAG and (i + 1 == len(argv) or argv[i + 1].startswith("-"))
    ]
    return bool(bare), [arg for i, arg in enumerate(argv) if i not in bare]


def debug_requested(argv: Sequence[str]) -> bool:
    """A bare ``--debug`` on the command line, or ``HF_CD_DEBUG=1`` in the environment."""
    return split_debug_flag(argv)[0] or os.environ.get(DEBUG_ENV, "").strip().lower() in (
        "1",
        "true",
        "yes",
        "on",
    )


def one_line(error: BaseException) -> str:
    """The error's message with its lines joined (and secrets removed), so the shell shows it whole."""
    text = " ".join(part.strip() for part in str(error).splitlines() if part.strip())
    return redact(text) or type(error).__name__


def report(error: BaseException | str) -> None:
    """Print the one-line form of ``error`` to stderr."""
    text = error if isinstance(error, str) else one_line(error)
    print(f"error: {text}  [{DEBUG_FLAG} or {DEBUG_ENV}=1 shows the traceback]", file=sys.stderr, flush=True)


@contextlib.contextmanager
def command_errors(argv: Sequence[str]) -> Iterator[None]:
    """Run a command's work: a user error becomes one line on stderr and exit status 2 (unless ``--debug``).

    A `SystemExit` whose payload is a message (``raise SystemExit("text")``) is treated the same way.
    """
    debug = debug_requested(argv)
    try:
        yield
    except user_errors() as error:
        if debug:
            raise
        report(error)
        raise SystemExit(USAGE_EXIT_CODE) from None
    except SystemExit as exit_:
        if isinstance(exit_.code, str):
            if debug:
                raise
            report(redact(exit_.code))
            raise SystemExit(USAGE_EXIT_CODE) from None
        raise


_Result = TypeVar("_Result")


def run_command(
    work: Callable[[list[str]], _Result],
    argv: Sequence[str] | None = None,
    deprecated_flags: Mapping[str, str] | None = None,
    prog: str = "hf-cd",
) -> _Result:
    """Run a command's ``work`` on its arguments (``sys.argv[1:]`` by default) in the one error style.

    ``--debug`` is taken out (and turns on tracebacks), flags of earlier releases are renamed with a
    deprecation warning, and a user error becomes one line on stderr and exit status 2.
    """
    from hf_cd.deprecation import rename_deprecated_flags

    argv = list(sys.argv[1:] if argv is None else argv)
    with command_errors(argv):
        rest = split_debug_flag(argv)[1]
        if deprecated_flags:
            rest = rename_deprecated_flags(rest, deprecated_flags, prog)
        return work(rest)


def one_line_parser_errors(parser):
    """Make ``parser`` raise `CommandLineError` instead of printing its usage and exiting (also its sub-parsers).

    `command_errors` then prints the one line every hf-cd command prints.
    """

    def error(message: str):
        raise CommandLineError(f"{parser.prog}: {message} (`{parser.prog} --help` lists the options).")

    parser.error = error
    return parser
