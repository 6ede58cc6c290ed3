#!/usr/bin/env bash
# Source THERE, at the start of every `device` command (after carrying .whl and .data):
#   source bench/device/setup.sh && python bench/cd_overhead.py
# Installs the carried wheels into /tmp/site, puts src/ on the path and points the
# Fashion-MNIST loader at the carried IDX files. Prints the versions the run will use.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || return 1
export PYTHONPATH="/tmp/site:$PWD/src:$PWD/tests:${PYTHONPATH:-}"
export HF_CD_FASHION_MNIST_DIR="$PWD/.data/fashion-mnist" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
python3 - <<'PY'
import torch, transformers, accelerate, peft, datasets
print(f"torch {torch.__version__} cuda {torch.version.cuda} {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no gpu'}")
print(f"transformers {transformers.__version__} accelerate {accelerate.__version__} peft {peft.__version__} datasets {datasets.__version__}")
try:
    import torchao
    print(f"torchao {torchao.__version__}")
except Exception as error:  # only the torchao pipelines need it; they say so themselves
    print(f"torchao unavailable: {type(error).__name__}: {error}")
PY
