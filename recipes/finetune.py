"""``hf-cd train`` as a script, for ``accelerate launch recipes/finetune.py`` (same as ``accelerate launch -m hf_cd.cli train``).

    hf-cd train --config recipes/configs/fashion_mnist_vit_tiny_cpu.yaml            # the installed command
    accelerate launch --multi_gpu --num_processes 8 recipes/finetune.py --config ...
    accelerate launch --multi_gpu --num_processes 8 -m hf_cd.cli train --config ...  # the same run

Every option is a flag (``--help`` lists them by group); a YAML ``--config`` sets defaults that flags
override. A bad option, dataset or model prints one line and exits 2; ``--debug`` (or ``HF_CD_DEBUG=1``)
shows the traceback. The work itself lives in `hf_cd.recipe`, so this script stays a thin entry point.
"""

from __future__ import annotations

import sys

from hf_cd.recipe.cli import main

if __name__ == "__main__":
    main(sys.argv[1:])
