"""``python -m hf_cd``: the ``hf-cd`` command (`hf_cd.cli`)."""

import sys

from hf_cd.cli import main

sys.exit(main())
