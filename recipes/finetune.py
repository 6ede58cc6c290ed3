"""Fine-tune (or train from scratch) a ViT / DeiT / Dinov2 with Colinearity Decay, then evaluate it.

    python recipes/finetune.py --config recipes/configs/fashion_mnist_vit_tiny_cpu.yaml
    python recipes/finetune.py --config recipes/configs/imagefolder_vit_tiny_cpu.yaml --dataset_name path/to/folder
    python recipes/finetune.py --config recipes/configs/eurosat_vit_base.yaml --learning_rate 5e-5
    accelerate launch --multi_gpu --num_processes 8 recipes/finetune.py --config ...
    python recipes/finetune.py --config ... --resume_from_checkpoint latest   # continue an interrupted run

Every option is a flag (``--help`` lists them by group); a YAML ``--config`` sets defaults that flags
override. A bad option, dataset or model prints one line and exits 2; ``--debug`` (or ``HF_CD_DEBUG=1``)
shows the traceback. The work itself lives in `hf_cd.recipe`, so this script stays a thin entry point.
"""

from __future__ import annotations

import sys

from hf_cd.recipe.cli import main

if __name__ == "__main__":
    main(sys.argv[1:])
