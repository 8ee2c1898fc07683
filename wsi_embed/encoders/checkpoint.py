"""Read a weights file, fit it strictly to a module, and explain a misfit."""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from wsi_embed.errors import WeightsMismatch

from .build import build_module
from .registry import EncoderConfig, list_configs

log = logging.getLogger(__name__)

WRAPPER_KEYS = ("state_dict", "model", "teacher")  # plain / timm & DeiT / DINO checkpoints
PREFIXES = ("module.", "backbone.")  # DataParallel / SSL wrappers
SHOW = 5


def _reason(e: Exception) -> str:
    # torch's weights_only message is a long advert for weights_only=False; the
    # actual cause follows "WeightsUnpickler error:".
    text = str(e)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1]
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    return line if len(line) <= 200 else line[:197] + "..."


def _is_state_dict(obj: object) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    )


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a bare or wrapped checkpoint, with wrapper prefixes stripped."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj = load_file(str(path), device="cpu")
        else:
            import argparse

            # training checkpoints (DINO's, timm's) keep their argparse options beside the weights
            with torch.serialization.safe_globals([argparse.Namespace]):
                obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many kinds for a bad file
        raise WeightsMismatch(
            f"cannot read {path} as a PyTorch checkpoint ({type(e).__name__}: {_reason(e)}). "
            "Expected a state dict saved with torch.save (read with weights_only=True, so no "
            "pickled Python objects) or a .safetensors file; for a full training checkpoint, "
            "re-save just its state dict."
        ) from None
    if not _is_state_dict(obj) and isinstance(obj, Mapping):
        for key in WRAPPER_KEYS:
            if _is_state_dict(obj.get(key)):
                obj = obj[key]
                break
    if not _is_state_dict(obj):
        what = f"a dict with keys {sorted(map(str, obj))[:SHOW]}" if isinstance(obj, Mapping) else type(obj).__name__
        raise WeightsMismatch(
            f"{path} is not a state dict: it holds {what}; expected a dict of tensors, or a dict "
            f"with one of {', '.join(repr(k) for k in WRAPPER_KEYS)} holding one."
        )
    return _strip_prefixes(dict(obj))


def _strip_prefixes(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    changed = True
    while changed:
        changed = False
        for prefix in PREFIXES:
            inside = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
            if inside:
                if len(inside) < len(sd):  # e.g. DINO's projection head beside the backbone
                    log.info("ignoring %d keys outside %r", len(sd) - len(inside), prefix)
                sd, changed = inside, True
    return sd


def _drop(sd: dict[str, torch.Tensor], prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in sd.items() if not any(k == p or k.startswith(p + ".") for p in prefixes)}


Signature = dict[str, tuple[int, ...]]


def _signature(sd: Mapping[str, torch.Tensor]) -> Signature:
    # BatchNorm's counter is optional when loading, so it never decides a fit.
    return {k: tuple(v.shape) for k, v in sd.items() if not k.endswith("num_batches_tracked")}


@functools.lru_cache(maxsize=None)
def _arch_signature(family: str, builder_kwargs: tuple) -> tuple[tuple[str, tuple[int, ...]], ...]:
    cfg = next(c for c in list_configs() if (c.family, c.builder_kwargs) == (family, builder_kwargs))
    with torch.device("meta"):  # shapes only: no memory, no init cost
        module = build_module(cfg)
    return tuple(sorted(_signature(module.state_dict()).items()))


def fitting_models(sd: Mapping[str, torch.Tensor]) -> list[EncoderConfig]:
    """Registered models whose architecture takes exactly these keys and shapes."""
    found = []
    for cfg in list_configs():
        mine = dict(_arch_signature(cfg.family, cfg.builder_kwargs))
        if _signature(_drop(dict(sd), cfg.ignore_prefixes)) == mine:
            found.append(cfg)
    return found


def _examples(items: list[str]) -> str:
    items = sorted(items, key=lambda k: (k.count("."), k))  # top-level keys say most
    shown = ", ".join(items[:SHOW])
    return shown + (f", ... ({len(items) - SHOW} more)" if len(items) > SHOW else "")


def mismatch_message(path: Path, cfg: EncoderConfig, module: nn.Module, sd: Mapping[str, torch.Tensor]) -> str:
    want, have = _signature(module.state_dict()), _signature(sd)
    missing = sorted(set(want) - set(have))
    unexpected = sorted(set(have) - set(want))
    shapes = sorted(
        f"{k}: file {list(have[k])} vs model {list(want[k])}"
        for k in set(want) & set(have)
        if want[k] != have[k]
    )
    parts = [f"{path} does not fit {cfg.name} ({cfg.architecture}):"]
    if missing:
        parts.append(f"{len(missing)} missing keys ({_examples(missing)});")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys ({_examples(unexpected)});")
    if shapes:
        parts.append(f"{len(shapes)} shape mismatches ({_examples(shapes)});")
    fits = [c for c in fitting_models(sd) if c.name != cfg.name]
    head = sorted({k.split(".")[0] for k in unexpected}) if unexpected and not missing and not shapes else []
    if fits:
        which = " or ".join(f"{c.name} ({c.architecture})" for c in fits)
        parts.append(f"this file looks like weights for {which}; use --model {fits[0].name}"
                     + (f" if that is what it is; if it is {cfg.name}'s trunk with a classification head, "
                        f"save it without its {', '.join(k + '.*' for k in head)} keys." if head else "."))
    else:
        parts.append("no registered model matches this file's keys and shapes.")
    return " ".join(parts)


def load_strict(module: nn.Module, cfg: EncoderConfig, path: Path) -> None:
    """Load ``path`` into ``module`` with ``strict=True`` or raise ``WeightsMismatch``."""
    sd = _drop(read_state_dict(path), cfg.ignore_prefixes)
    if _signature(sd) != _signature(module.state_dict()):
        raise WeightsMismatch(mismatch_message(path, cfg, module, sd))
    try:
        module.load_state_dict(sd, strict=True)
    except RuntimeError as e:  # should not happen after the check above; keep it readable
        raise WeightsMismatch(f"{path} does not fit {cfg.name}: {e}") from None
