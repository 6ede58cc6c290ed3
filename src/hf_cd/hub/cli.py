"""``hf-cd push``: upload a trained ``output_dir`` to the Hub with its model card (`push_cd_model`).

    hf-cd push --output_dir outputs/run --hub_model_id you/vit-cd --dry_run   # the exact files and card
    hf-cd push --output_dir outputs/run --hub_model_id you/vit-cd --hub_private_repo

The flags are `transformers.TrainingArguments`' names for the same things, so ``hf-cd train
--push_to_hub --hub_model_id ...`` and ``hf-cd push`` read alike. There is no token flag on purpose:
a token on the command line lands in shell history and process lists; ``hf auth login`` or
``HF_TOKEN`` provide it.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path

PROG = "hf-cd push"


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--output_dir",
        required=True,
        metavar="DIR",
        help="the folder `hf-cd train` (or save_pretrained) wrote",
    )
    parser.add_argument("--hub_model_id", required=True, metavar="USER/NAME", help="the Hub repository")
    parser.add_argument(
        "--hub_private_repo",
        action="store_true",
        default=None,
        help="create the repository private (default: the Hub's default for your account or organization)",
    )
    parser.add_argument("--hub_revision", default=None, help="branch to upload to (default: main)")
    parser.add_argument("--commit_message", default="Upload CD-trained model (hf-cd)")
    parser.add_argument(
        "--dry_run",
        action="store_true",
        help="print the files and the card that would be uploaded; send nothing",
    )
    parser.add_argument(
        "--regenerate_card",
        action="store_true",
        help="replace a README.md you wrote with the generated card (by default it is uploaded as it is)",
    )
    return parser


def main(argv: Sequence[str] | None = None, prog: str = PROG) -> int:
    """Push as the flags say; a bad folder or repo id is one line on stderr and exit status 2."""
    from hf_cd.errors import run_command

    return run_command(lambda rest: _main(rest, prog), argv, prog=prog)


def _main(argv: list[str], prog: str) -> int:
    from hf_cd.errors import CommandLineError, one_line_parser_errors
    from hf_cd.hub.transfer import push_cd_model

    parser = one_line_parser_errors(build_parser(prog))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(args.hub_model_id)
    except HFValidationError as error:
        raise CommandLineError(
            f"--hub_model_id {args.hub_model_id!r} is not a Hub repo id (user/name): {error}"
        ) from None
    if not Path(args.output_dir).expanduser().is_dir():
        raise CommandLineError(
            f"--output_dir {args.output_dir} is not a directory; give the output_dir of a trained model."
        )
    upload = push_cd_model(
        args.hub_model_id,
        args.output_dir,
        private=args.hub_private_repo,
        dry_run=args.dry_run,
        regenerate_card=args.regenerate_card,
        revision=args.hub_revision,
        commit_message=args.commit_message,
    )
    if upload.commit_url:
        print(f"uploaded {len(upload.files)} files: {upload.commit_url}")
    return 0
