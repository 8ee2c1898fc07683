#!/usr/bin/env bash
# The GPU suite in one call on a lent machine (one H200, 16 cores; torch, torchvision, timm there),
# in under 8 minutes:
#   1. installs the carried wheels (.whl/, made here by benchmarks/fetch_gpu_wheels.sh) into /tmp/site;
#   2. checks every import the suite needs, and stops at once naming what is missing;
#   3. makes the synthetic slides in /tmp/bench-data (in parallel, ~30 s);
#   4. runs the GPU suite (bf16; the decode-sensitive cases once with --decode cpu and once with
#      --decode gpu: run_suite.py checks that `wsi-embed bench --help` has --decode; a tree without it
#      runs each case once and says so in the results, see the TODO there) within BUDGET_S seconds
#      (default 420, data included; cases that would start too late are skipped and listed), then the
#      loader-only comparison against REF (default 1c1135e, "today's loader"): a git worktree when
#      this copy has the git history, else the folder benchmarks/data/ref-$REF/ (make it here with:
#      mkdir -p benchmarks/data/ref-1c1135e && git archive 1c1135e wsi_embed | tar -x -C
#      benchmarks/data/ref-1c1135e, and carry it);
#   5. if time is left (DECODE_CHECK=0 skips it), benchmarks/gpu_decode_check.py: nvJPEG against
#      libjpeg-turbo, pixels and speed;
#   6. leaves gpu-$TAG.json, gpu-$TAG.md, gpu-$TAG.log (and gpu-$TAG-decode-check.json) in one
#      folder: $OUT on the device machine, else benchmarks/results.
# Carry: .whl, benchmarks/data/ref-1c1135e and sample_data/CMU-1-Small-Region.svs (all ignored by git).
# Extra arguments go to benchmarks/run_suite.py (e.g. --only "sustained").
set -uo pipefail
cd "$(dirname "$0")/.."
T0=$SECONDS
TAG=${TAG:-h200}
REF=${REF:-1c1135e}
BUDGET_S=${BUDGET_S:-420}
RESULTS=${OUT:-benchmarks/results}
mkdir -p "$RESULTS"
exec > >(tee "$RESULTS/gpu-$TAG.log") 2>&1

[ -f sample_data/CMU-1-Small-Region.svs ] \
  || { echo "sample_data/CMU-1-Small-Region.svs is missing (the synthetic slides are made of its pixels): carry it"; exit 1; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "cannot install the carried wheels (.whl/): run benchmarks/fetch_gpu_wheels.sh and carry .whl"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
echo "cores: $(nproc)"
python3 - <<'PY' || exit 1
import importlib, sys
need = ["torch", "torchvision", "timm", "numpy", "PIL", "openslide", "tiffslide", "tifffile", "imagecodecs",
        "simplejpeg", "zarr", "numcodecs", "google_crc32c", "pydicom", "typer", "rich", "skimage", "psutil", "yaml",
        "fsspec", "donfig", "wsi_embed.cli", "wsi_embed.bench"]
missing, versions = [], {}
for name in need:
    try:
        module = importlib.import_module(name)
        versions[name] = getattr(module, "__version__", "")
    except Exception as exc:  # report them all, not the first
        missing.append(f"{name} ({type(exc).__name__}: {exc})")
if missing:
    sys.exit("missing on this machine (add wheels with EXTRA=... benchmarks/fetch_gpu_wheels.sh): " + "; ".join(missing))
import torch
if not torch.cuda.is_available():
    sys.exit("torch sees no CUDA device")
print("versions:", {k: v for k, v in versions.items() if v}, "gpu:", torch.cuda.get_device_name())
PY

if command -v git >/dev/null && git rev-parse --verify -q "$REF^{commit}" >/dev/null 2>&1; then
  COMPARE=(--compare-ref "$REF")
elif [ -f "benchmarks/data/ref-$REF/wsi_embed/__init__.py" ]; then
  COMPARE=(--compare-tree "benchmarks/data/ref-$REF")
else
  echo "note: no git history and no benchmarks/data/ref-$REF/ here: the loader comparison is skipped"
  COMPARE=()
fi
python3 benchmarks/run_suite.py --gpu --tag "gpu-$TAG" --out "$RESULTS" --data /tmp/bench-data \
  --budget-s "$BUDGET_S" ${COMPARE[@]+"${COMPARE[@]}"} "$@"
rc=$?
LEFT=$((470 - (SECONDS - T0)))
if [ "${DECODE_CHECK:-1}" != 0 ] && [ -f benchmarks/gpu_decode_check.py ] && [ "$LEFT" -gt 20 ]; then
  timeout "$LEFT" python3 benchmarks/gpu_decode_check.py --device cuda --out "$RESULTS/gpu-$TAG-decode-check.json" \
    || echo "gpu_decode_check.py did not finish (exit $?) in the $LEFT s left"
fi
echo "gpu_run.sh: $((SECONDS - T0)) s in all; results in $RESULTS (gpu-$TAG.json, .md, .log)"
exit $rc
