"""Regenerate the README pictures from the sample slide (tiny random-weights ViT: the point is the
layout, not the biology): ``PYTHONPATH=. .venv/bin/python docs/images/make_images.py``."""

from __future__ import annotations

import io
import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
MAX_BYTES = 300_000


def small_png(src: Path | Image.Image, dst: Path, width: int = 900) -> None:
    image = Image.open(src) if isinstance(src, Path) else src
    image = image.convert("RGB")
    if image.width > width:
        image = image.resize((width, round(image.height * width / image.width)), Image.Resampling.LANCZOS)
    for colours in (256, 128, 64):
        buf = io.BytesIO()
        image.quantize(colours, method=Image.Quantize.MEDIANCUT).save(buf, format="PNG", optimize=True)
        if buf.tell() < MAX_BYTES:
            break
    dst.write_bytes(buf.getvalue())


def main() -> None:
    sys.path.insert(0, str(ROOT))
    from tests.browser import Browser

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out"
        subprocess.run([sys.executable, "-m", "wsi_embed.cli", "embed", str(ROOT / "sample_data" / "CMU-1-Small-Region.svs"),
                        "--out", str(out), "--model", "timm:test_vit", "--weights", "random", "--workers", "0",
                        "--clusters", "4"], check=True, cwd=ROOT)
        small_png(out / "CMU-1-Small-Region.qc.png", HERE / "qc.png")
        small_png(out / "CMU-1-Small-Region.timm-test_vit.map.png", HERE / "map.png")
        with Browser(1200, 760) as b:
            b.open(out / "report.html")
            b.settle(1.0)
            shot = Image.open(io.BytesIO(b.screenshot()))
        small_png(shot, HERE / "report.png", width=1200)


if __name__ == "__main__":
    main()
