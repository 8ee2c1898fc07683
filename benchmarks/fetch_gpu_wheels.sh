#!/usr/bin/env bash
# Wheels for benchmarks/gpu_run.sh, into .whl/ (ignored by git, carried to the GPU machine).
# The GPU machine (python 3.12) has torch, torchvision and timm and is taken to have numpy, pillow,
# numcodecs, imagecodecs, scikit-image, psutil and pyyaml (gpu_run.sh checks every import first and
# names what is missing). It lacks the packages below, fetched for CPython 3.12 on manylinux x86_64
# at the versions this project is tested with (.venv), without their dependencies (the pure-python
# ones are listed). EXTRA="pkg==v ..." adds more, e.g. EXTRA="imagecodecs==2026.3.6 numcodecs==0.16.6"
# if the import check names them.
#   bash benchmarks/fetch_gpu_wheels.sh            # then: du -sh .whl  (the carry limit is 64 MiB)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DEST=${DEST:-.whl}
mkdir -p "$DEST"
PKGS=(
  # what the GPU machine lacks
  openslide-python==1.4.7 openslide-bin==4.0.1.2 tiffslide==3.0.1 zarr==3.1.6 typer==0.29.2
  simplejpeg==1.9.0 pydicom==3.0.2 google-crc32c==1.9.0
  # their pure-python dependencies
  tifffile==2026.3.3 fsspec==2026.9.0 donfig==0.8.1.post1 click==8.5.1 rich==15.0.0 shellingham==1.5.4
  markdown-it-py==4.3.0 mdurl==0.1.2 pygments==2.21.0 annotated-doc==0.0.7 typing_extensions==4.16.0
  packaging==26.4
)
# shellcheck disable=SC2206
EXTRA_PKGS=(${EXTRA:-})
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --dest "$DEST" \
  --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64 --platform any \
  "${PKGS[@]}" "${EXTRA_PKGS[@]}"
ls -1 "$DEST"
du -sh "$DEST"
