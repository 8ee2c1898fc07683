#!/usr/bin/env bash
# One call on a lent GPU machine (torch/timm there; openslide, zarr... carried as wheels in .whl/).
# Makes the synthetic slides there, runs the GPU suite, leaves JSON + markdown in $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, timm, openslide, zarr; print('torch', torch.__version__, 'timm', timm.__version__, 'openslide', openslide.__library_version__, 'zarr', zarr.__version__, torch.cuda.get_device_name())" || exit 1
nproc
OUT=${OUT:-benchmarks/results}
python3 benchmarks/run_suite.py --gpu --tag "gpu-${TAG:-lent}" --out "$OUT" --data /tmp/bench-data "$@" 2>&1 | tee "$OUT/gpu-run.log"
