"""Turn a ``--weights`` spec (auto | random | PATH | URL) into a loaded module."""

from __future__ import annotations

import logging
import os
import urllib.parse
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from wsi_embed.errors import InvalidOption, WeightsMismatch, WeightsUnavailable

from . import fetch
from .fetch import _safe_alternative, find_published, published_candidates, timm_cached_file  # noqa: F401
from .build import build_module
from .checkpoint import load_strict
from .fetch import sha256_file
from .registry import EncoderConfig

log = logging.getLogger(__name__)

RANDOM_SEED = 0  # `random` is reproducible, so smoke-test outputs can be compared


@dataclass(frozen=True)
class WeightsInfo:
    spec: str
    source: str  # published-cache | weights-dir | download | file | url | random | timm-pretrained
    path: str | None
    url: str | None
    sha256: str | None
    random: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _host(url: str) -> str:
    return urllib.parse.urlparse(url).hostname or url


def _is_url(spec: str) -> bool:
    return spec.lower().startswith(("http://", "https://"))


def resolve(cfg: EncoderConfig, spec: str = "auto") -> tuple[nn.Module, WeightsInfo]:
    """Build ``cfg``'s module and load the weights ``spec`` names into it."""
    spec = str(spec or "").strip()
    if not spec:
        raise InvalidOption("--weights is empty: give auto, random, a file path or an http(s) URL.")
    if spec.lower() == "random":
        return _random(cfg, spec)
    if spec.lower() == "auto":
        if cfg.weights_file:
            return _published(cfg, spec)
        if cfg.family == "timm":
            return _timm_pretrained(cfg, spec)
        raise WeightsUnavailable(f"{cfg.name} has no published weights; use --weights PATH or --weights random.")
    if _is_url(spec):
        return _url(cfg, spec)
    path = Path(spec).expanduser()
    if not path.is_file():  # a path mistake (exit 1), not published weights out of reach (exit 3)
        what = "weights path is a folder, not a file" if path.is_dir() else "weights file not found"
        raise InvalidOption(
            f"{what}: {path} (from --weights {spec}). --weights takes auto, "
            "random, an existing file or an http(s) URL."
        )
    return _from_file(cfg, spec, "file", path, None)


def _random(cfg: EncoderConfig, spec: str) -> tuple[nn.Module, WeightsInfo]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_SEED)
        module = build_module(cfg)
    log.warning(
        "%s: --weights random: the encoder is randomly initialized, so its embeddings are "
        "meaningless (smoke tests only).", cfg.name,
    )
    return module, WeightsInfo(spec, "random", None, None, None, random=True)


def _from_file(cfg: EncoderConfig, spec: str, source: str, path: Path, url: str | None):
    module = build_module(cfg)
    try:
        load_strict(module, cfg, path)
    except WeightsMismatch as exc:
        if source == "file":
            raise
        # a cached or fetched copy that is not what its name says: the fix is the file, not the model
        found = str(exc).split("; ", 1)[0].split(". ", 1)[0]
        raise WeightsMismatch(f"{found}: this file, where wsi-embed keeps {cfg.name}'s weights ({source}), is "
                              f"not them; delete it so that it is fetched again, or put the right file there"
                              f"{' (' + url + ')' if url else ''}") from None
    log.info("%s: loaded weights from %s", cfg.name, path)
    # absolute: a repair run from another folder must find the same file
    return module, WeightsInfo(spec, source, os.path.abspath(path), url, sha256_file(path))


def _published(cfg: EncoderConfig, spec: str) -> tuple[nn.Module, WeightsInfo]:
    hit = find_published(cfg)
    if hit is not None:
        return _from_file(cfg, spec, hit[0], hit[1], cfg.weights_url)
    dst = fetch.hub_checkpoint_dir() / cfg.weights_file
    try:
        fetch.check_reachable(cfg.weights_url)
    except fetch.Unreachable as e:
        raise WeightsUnavailable(offline_message(cfg, str(e))) from None
    fetch.download(cfg.weights_url, dst, cfg.sha256_prefix)
    return _from_file(cfg, spec, "download", dst, cfg.weights_url)


def offline_message(cfg: EncoderConfig, reason: str) -> str:
    dst = fetch.hub_checkpoint_dir() / cfg.weights_file
    wdir = fetch.weights_dir()
    wdir_state = "unset" if wdir is None else f"set to {wdir}, which has no {cfg.weights_file}"
    return (
        f"cannot get the published weights for {cfg.name}: {_host(cfg.weights_url)} is "
        f"unreachable ({reason}) and the file is not cached here. Download {cfg.weights_url} "
        f"on a machine with internet and put it at {dst} (the torch hub cache; $TORCH_HOME "
        f"moves it), or into the folder named by ${fetch.WEIGHTS_DIR_ENV} (now {wdir_state}); "
        "or pass --weights PATH to load a local copy, or --weights random for a smoke test "
        "with meaningless embeddings."
    )


def _url(cfg: EncoderConfig, url: str) -> tuple[nn.Module, WeightsInfo]:
    if cfg.weights_url and url == cfg.weights_url:  # the published file, wherever auto finds it
        return _published(cfg, url)
    if not fetch.url_basename(url):
        raise InvalidOption(f"--weights {url}: the URL names no file to cache it under.")
    dst = fetch.url_cache_path(url)
    if not dst.is_file():
        try:
            fetch.check_reachable(url)
        except fetch.Unreachable as e:
            raise WeightsUnavailable(
                f"cannot download --weights {url} for {cfg.name}: {_host(url)} is unreachable "
                f"({e}) and {dst} does not exist. Download it on a machine with internet and put "
                "it there, or pass --weights PATH to load a local copy, or --weights random for "
                "a smoke test with meaningless embeddings."
            ) from None
        fetch.download(url, dst)
    return _from_file(cfg, url, "url", dst, url)


# --- timm-hosted weights (imagenet-vits16, timm:<name>) ---------------------------


def _timm_pretrained_cfg(tname: str) -> dict[str, Any]:
    import timm

    with torch.device("meta"):
        return dict(timm.create_model(tname, pretrained=False, num_classes=0).pretrained_cfg)


def _timm_pretrained(cfg: EncoderConfig, spec: str) -> tuple[nn.Module, WeightsInfo]:
    import timm

    tname = cfg.kwargs["model_name"]
    pcfg = _timm_pretrained_cfg(tname)
    cached = timm_cached_file(pcfg)
    overlay = None
    if cached is not None:
        # Point timm at the cached file so it never touches the network; it still
        # applies its own filter/classifier handling. .npz files need its custom loader.
        overlay = {"file": str(cached), "custom_load": cached.suffix == ".npz"}
    else:
        probe = _timm_probe_url(pcfg)
        if probe is None:
            raise WeightsUnavailable(
                f"timm has no pretrained weights for {tname} ({cfg.name}); pass --weights PATH "
                "to load a state dict, or --weights random for a smoke test."
            )
        try:
            fetch.check_reachable(probe)
        except fetch.Unreachable as e:
            raise WeightsUnavailable(timm_offline_message(cfg, tname, probe, str(e))) from None
    try:
        # Not num_classes=0 here: timm then loads with strict=False and would only log
        # missing keys. Load strictly with the published head, then drop it.
        module = timm.create_model(tname, pretrained=True, pretrained_cfg_overlay=overlay)
        module.reset_classifier(0)
    except RuntimeError as e:
        detail = _one_line(str(e))
        if cached is not None:
            raise WeightsMismatch(f"{cached} (timm's cached weights) does not fit {cfg.name}: {detail}") from None
        raise WeightsUnavailable(f"timm could not load pretrained weights for {cfg.name}: {detail}") from None
    except Exception as e:  # noqa: BLE001 - hub/network errors of many kinds
        raise WeightsUnavailable(
            f"timm could not load pretrained weights for {cfg.name} ({type(e).__name__}: {e}); "
            "pass --weights PATH or --weights random."
        ) from None
    path = cached or timm_cached_file(pcfg)
    return module, WeightsInfo(
        spec, "timm-pretrained", str(path) if path else None, cfg.weights_url,
        sha256_file(path) if path else None,
    )


def _one_line(text: str, limit: int = 600) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _timm_probe_url(pcfg: dict[str, Any]) -> str | None:
    if pcfg.get("hf_hub_id"):
        from huggingface_hub import constants

        return f"{constants.ENDPOINT}/{pcfg['hf_hub_id'].partition('@')[0]}"
    return pcfg.get("url") or None


def timm_offline_message(cfg: EncoderConfig, tname: str, probe: str, reason: str) -> str:
    from huggingface_hub import constants

    return (
        f"cannot get timm's pretrained weights for {cfg.name}: {_host(probe)} is unreachable "
        f"({reason}) and they are not in the Hugging Face cache ({constants.HF_HUB_CACHE}) or "
        f"the torch hub cache ({fetch.hub_checkpoint_dir()}). On a machine with internet run "
        f"timm.create_model('{tname}', pretrained=True) and copy its cache here ($HF_HOME / "
        "$HF_HUB_CACHE point at it); or pass --weights PATH to load a local state dict, or "
        "--weights random for a smoke test with meaningless embeddings."
    )
