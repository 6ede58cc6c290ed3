#!/usr/bin/env bash
# Run HERE (the CPU machine, which can reach PyPI) before a `device` call: it fills two
# git-ignored folders that the call carries (`carry: [".whl", ".data"]`):
#   .whl/  wheels the device lacks (it has torch, transformers, accelerate, peft, but no `datasets`)
#   .data/ Debian's Fashion-MNIST IDX files (~31 MB), read with HF_CD_FASHION_MNIST_DIR
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
grep -qx '/.data/' .git/info/exclude 2>/dev/null || echo '/.data/' >> .git/info/exclude
mkdir -p .whl .data/fashion-mnist
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform any -d .whl "datasets==$(.venv/bin/python -c 'import datasets; print(datasets.__version__)')" \
  "dill==0.4.1" "multiprocess==0.70.19"
cp /usr/share/datasets/fashion-mnist/*-ubyte.gz .data/fashion-mnist/
du -sh .whl .data
