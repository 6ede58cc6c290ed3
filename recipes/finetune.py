"""Fine-tune (or train from scratch) a ViT / DeiT / Dinov2 with Colinearity Decay, then evaluate it.

    python recipes/finetune.py --config recipes/configs/fashion_mnist_vit_tiny_cpu.yaml
    python recipes/finetune.py --config recipes/configs/eurosat_vit_base.yaml --learning_rate 5e-5
    accelerate launch --multi_gpu --num_processes 8 recipes/finetune.py --config ...
    python recipes/finetune.py --config ... --resume_from_checkpoint latest   # continue an interrupted run

Every option is a flag (``--help`` lists them); a YAML ``--config`` sets defaults that flags override.
The work itself lives in `hf_cd.recipe`, so this script stays a thin entry point.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

from hf_cd.recipe import RecipeRun, format_summary, parse_recipe_args, run_recipe


def main(argv: Sequence[str] | None = None) -> RecipeRun:
    args = parse_recipe_args(argv)
    is_main = args.training.process_index == 0
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("hf_cd").setLevel(logging.INFO if is_main else logging.WARNING)
    run = run_recipe(args)
    if run.results is not None:
        print(format_summary(run.results), flush=True)
    return run


if __name__ == "__main__":
    main(sys.argv[1:])
