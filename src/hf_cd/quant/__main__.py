"""Entry point of ``python -m hf_cd.quant``."""

from hf_cd.quant.cli import main

raise SystemExit(main())
