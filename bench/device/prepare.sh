#!/usr/bin/env bash
# Run HERE (the CPU machine, which can reach PyPI) before a `device` call: it fills two
# git-ignored folders that the call carries (`carry: [".whl", ".data"]`):
#   .whl/  wheels the device lacks or has at another version: datasets (+ dill, multiprocess),
#          transformers at CI's version, torchao
#   .data/ Debian's Fashion-MNIST IDX files (~31 MB), read with HF_CD_FASHION_MNIST_DIR
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
for folder in .whl .data; do  # .gitignore lists both; keep them ignored in any checkout
  git check-ignore -q "$folder/x" || {
    exclude=$(git rev-parse --git-path info/exclude); mkdir -p "$(dirname "$exclude")"
    echo "/$folder/" >> "$exclude"
  }
done
mkdir -p .whl .data/fashion-mnist
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform manylinux_2_24_x86_64 --platform any -d .whl \
  "datasets==$(.venv/bin/python -c 'import datasets; print(datasets.__version__)')" \
  "transformers==$(.venv/bin/python -c 'import transformers; print(transformers.__version__)')" \
  "dill==0.4.1" "multiprocess==0.70.19" "torchao"
# transformers: the device image has an older one (5.17 in 2026-11); CI's version keeps results comparable.
# torchao: not in the device image; needed by the torchao-int8 / torchao-fp8 pipelines only.
cp /usr/share/datasets/fashion-mnist/*-ubyte.gz .data/fashion-mnist/
du -sh .whl .data
