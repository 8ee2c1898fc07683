"""Where weight files live, and getting them over the network without hanging."""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import socket
import sys
import threading
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from wsi_embed.errors import WeightsUnavailable

if TYPE_CHECKING:
    from .registry import EncoderConfig

log = logging.getLogger(__name__)

WEIGHTS_DIR_ENV = "WSI_EMBED_WEIGHTS_DIR"
CHECK_TIMEOUT_S = 5.0
# A stalled transfer fails after this long without a byte, instead of hanging.
READ_TIMEOUT_S = 60.0


class Unreachable(Exception):
    """The host of a URL did not answer; the message says how it failed."""


def hub_checkpoint_dir() -> Path:
    """torch's checkpoint cache (``$TORCH_HOME/hub/checkpoints``), as torchvision uses it.

    Worked out as ``torch.hub.get_dir`` does, without importing torch (listing models and the
    resume check must stay quick); a directory set in-process with ``torch.hub.set_dir`` wins."""
    if "torch" in sys.modules:
        return Path(sys.modules["torch"].hub.get_dir()) / "checkpoints"
    cache = os.environ.get("XDG_CACHE_HOME", os.path.join("~", ".cache"))
    home = os.environ.get("TORCH_HOME", os.path.join(cache, "torch"))
    return Path(os.path.expanduser(home)) / "hub" / "checkpoints"


def weights_dir() -> Path | None:
    value = os.environ.get(WEIGHTS_DIR_ENV)
    return Path(value).expanduser() if value else None


def published_candidates(cfg: EncoderConfig) -> list[tuple[str, Path]]:
    """Where ``auto`` looks for ``cfg.weights_file``, in order."""
    if not cfg.weights_file:
        return []
    found = []
    wdir = weights_dir()
    if wdir is not None:
        found.append(("weights-dir", wdir / cfg.weights_file))
    found.append(("published-cache", hub_checkpoint_dir() / cfg.weights_file))
    return found


def find_published(cfg: EncoderConfig) -> tuple[str, Path] | None:
    """The first candidate that is a file with something in it (an empty one is a failed copy)."""
    return next(((s, p) for s, p in published_candidates(cfg) if p.is_file() and p.stat().st_size > 0), None)


def _safe_alternative(filename: str) -> str | None:
    # timm prefers a .safetensors twin of a .bin file when the hub has one.
    if filename == "pytorch_model.bin":
        return "model.safetensors"
    if filename.endswith(".bin"):
        return filename[:-4].replace("pytorch_model", "model") + ".safetensors"
    return None


def timm_cached_file(pcfg: Mapping[str, Any]) -> Path | None:
    """The file timm would load without network, if it is cached here.

    ``pcfg`` is timm's pretrained_cfg, or the part of it a registry entry keeps
    (``EncoderConfig.timm_source``: hf_hub_id, hf_hub_filename, url). Imports neither timm nor torch:
    the Hugging Face cache ($HF_HUB_CACHE / $HF_HOME) is looked up with huggingface_hub's own
    offline lookup, the torch hub cache as :func:`hub_checkpoint_dir` works it out."""
    hub_id = pcfg.get("hf_hub_id")
    if hub_id:
        from huggingface_hub import try_to_load_from_cache

        repo, _, revision = hub_id.partition("@")
        first = pcfg.get("hf_hub_filename") or "pytorch_model.bin"
        for name in filter(None, (_safe_alternative(first), first)):
            hit = try_to_load_from_cache(repo, name, revision=revision or None)
            if isinstance(hit, str):
                return Path(hit)
    url = pcfg.get("url")
    if url:
        local = hub_checkpoint_dir() / url_basename(url)
        if local.is_file():
            return local
    return None


@functools.lru_cache(maxsize=64)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    """sha256 of a weights file, computed once per process while the file is unchanged."""
    st = os.stat(path)
    return _sha256(str(path), st.st_size, st.st_mtime_ns)


def url_basename(url: str) -> str:
    return os.path.basename(urllib.parse.urlparse(url).path)


def url_cache_path(url: str) -> Path:
    """Where ``--weights URL`` is cached: a folder per URL in the hub cache, so two URLs ending in
    the same file name (``.../exp1/checkpoint.pth``, ``.../exp2/checkpoint.pth``) never stand for
    each other, nor for a published file of that name."""
    key = hashlib.sha256(url.encode()).hexdigest()[:16]
    return hub_checkpoint_dir() / "wsi-embed-urls" / key / url_basename(url)


def check_reachable(url: str, timeout: float = CHECK_TIMEOUT_S) -> None:
    """Raise ``Unreachable`` unless the URL's server answers within ``timeout`` seconds.

    A HEAD request (through any configured proxy) runs in a daemon thread so that
    slow DNS, which ignores socket timeouts, cannot stretch the wait either.
    Any HTTP answer counts as reachable except 404/410.
    """
    outcome: list[BaseException | None] = []

    def probe() -> None:
        req = urllib.request.Request(url, method="HEAD", headers={"User-Agent": "wsi-embed"})
        try:
            urllib.request.urlopen(req, timeout=timeout).close()
            outcome.append(None)
        except urllib.error.HTTPError as e:
            outcome.append(Unreachable(f"HTTP {e.code} {e.reason}") if e.code in (404, 410) else None)
        except BaseException as e:  # noqa: BLE001 - reported, not swallowed
            reason = getattr(e, "reason", None) or e
            outcome.append(Unreachable(f"{type(reason).__name__}: {reason}"))

    thread = threading.Thread(target=probe, name="wsi-embed-reachability", daemon=True)
    thread.start()
    thread.join(timeout + 1.0)
    if not outcome:
        raise Unreachable(f"no answer within {timeout:g} s")
    if outcome[0] is not None:
        raise outcome[0]


def download(url: str, dst: Path, sha256_prefix: str | None = None) -> None:
    """Download ``url`` to ``dst``; torch writes ``dst.<uuid>.partial`` and renames at the end."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    log.info("downloading %s -> %s", url, dst)
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(READ_TIMEOUT_S)  # torch's urlopen takes no timeout
    try:
        import torch

        torch.hub.download_url_to_file(
            url, str(dst), hash_prefix=sha256_prefix, progress=sys.stderr.isatty()
        )
    except Exception as e:  # noqa: BLE001
        raise WeightsUnavailable(
            f"downloading {url} to {dst} failed ({type(e).__name__}: {e}); no file was left "
            f"there. Retry, or download it by hand into {dst.parent}."
        ) from e
    finally:
        socket.setdefaulttimeout(previous)
