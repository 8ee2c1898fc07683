"""The per-slide Zarr v3 store: written under a temporary name, renamed into place when complete.

Layout (see README, "Store layout")::

    <slide_id>.zarr/  attrs wsi_embed, slide, grid, tissue
      mask, tissue_fraction, coords, thumbnail, tissue_mask
      <encoder>/  attrs encoder, complete
        embeddings (rows, cols, dim)
"""

from __future__ import annotations

import glob
import logging
import os
import shutil
import socket
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr

from . import __version__
from .errors import IncompleteStore, OutputNotWritable, WsiEmbedError

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
TMP_MARK = ".tmp-"


def group_name(encoder_name: str) -> str:
    """Zarr node name for an encoder: ``timm:foo`` becomes ``timm-foo`` (no ':' in paths)."""
    return encoder_name.replace(":", "-").replace("/", "-")


def store_path(out_dir: Path, slide_id: str) -> Path:
    return Path(out_dir) / f"{slide_id}.zarr"


def ensure_writable(out_dir: Path) -> Path:
    """Create ``out_dir`` and prove a file can be written there, before any work is done."""
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / f".write-probe-{uuid.uuid4().hex}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise OutputNotWritable(
            f"{out_dir}: output directory cannot be written ({exc.strerror or exc}); choose another --out"
        ) from exc
    return out_dir


def _tmp_suffix() -> str:
    return f"{TMP_MARK}{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


def _remove(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


@dataclass
class EncoderGroupWriter:
    name: str
    array: zarr.Array
    group: zarr.Group

    def write_block(self, r0: int, c0: int, block: np.ndarray) -> None:
        self.array[r0 : r0 + block.shape[0], c0 : c0 + block.shape[1]] = block


class StoreWriter:
    """Writes one slide's store. Nothing appears under the final name until :meth:`commit`.

    A fresh store is built in ``.<id>.zarr.tmp-*`` beside the final path. When the store already
    exists (another encoder was run before), new encoder groups are built under temporary names
    inside it and renamed into place; the geometry and tissue arrays are reused.
    """

    def __init__(self, final: Path, *, append: bool):
        self.final = Path(final)
        self.append = append
        if append:
            self.root_path = self.final
        else:
            self.root_path = self.final.with_name(f".{self.final.name}{_tmp_suffix()}")
        self._groups: dict[str, tuple[Path, Path]] = {}  # name -> (tmp path, final path)
        self._root: zarr.Group | None = None

    # -- base arrays -------------------------------------------------------------------------
    def create(self, *, attrs: dict, mask, tissue_fraction, coords, thumbnail, tissue_mask, chunk: int) -> None:
        root = zarr.open_group(str(self.root_path), mode="w", zarr_format=3)
        root.attrs.update({"wsi_embed": {"schema_version": SCHEMA_VERSION, "version": __version__}, **attrs})
        rows, cols = mask.shape
        c = (max(1, chunk), max(1, chunk))
        root.create_array("mask", data=np.asarray(mask, dtype=bool), chunks=c, dimension_names=("row", "col"))
        root.create_array("tissue_fraction", data=np.asarray(tissue_fraction, dtype=np.float32), chunks=c,
                          dimension_names=("row", "col"))
        root.create_array("coords", data=np.asarray(coords, dtype=np.int64), chunks=c + (2,),
                          dimension_names=("row", "col", "xy"))
        root.create_array("thumbnail", data=np.asarray(thumbnail, dtype=np.uint8),
                          chunks=(1024, 1024, 3), dimension_names=("y", "x", "rgb"))
        root.create_array("tissue_mask", data=np.asarray(tissue_mask, dtype=bool), chunks=(1024, 1024),
                          dimension_names=("y", "x"))
        self._root = root

    def open_existing(self) -> zarr.Group:
        self._root = zarr.open_group(str(self.root_path), mode="r+", zarr_format=3)
        return self._root

    # -- encoder groups ----------------------------------------------------------------------
    def add_encoder(self, name: str, *, dim: int, dtype: str, chunk: int, attrs: dict) -> EncoderGroupWriter:
        assert self._root is not None, "create() or open_existing() first"
        rows, cols = self._root["mask"].shape
        node = group_name(name)
        tmp_node = f".{node}{_tmp_suffix()}" if self.append else node
        group = self._root.create_group(tmp_node)
        group.attrs.update({"encoder": attrs, "complete": False})
        array = group.create_array(
            "embeddings", shape=(rows, cols, dim), chunks=(max(1, chunk), max(1, chunk), dim),
            dtype=dtype, fill_value=np.nan, dimension_names=("row", "col", "feature"),
        )
        self._groups[name] = (self.root_path / tmp_node, self.root_path / node)
        return EncoderGroupWriter(name, array, group)

    def mark_complete(self, writer: EncoderGroupWriter) -> None:
        writer.group.attrs.update({"complete": True})  # written last

    def commit(self) -> Path:
        """Move everything into place. Safe against crashes at any point: see module doc."""
        if self.append:
            for tmp, final in self._groups.values():
                if final.exists():
                    trash = final.with_name(f".{final.name}.old{_tmp_suffix()}")
                    os.rename(final, trash)
                    os.rename(tmp, final)
                    _remove(trash)
                else:
                    os.rename(tmp, final)
            return self.final
        if self.final.exists():  # --overwrite: swap, then delete the old one
            trash = self.final.with_name(f".{self.final.name}.old{_tmp_suffix()}")
            os.rename(self.final, trash)
            os.rename(self.root_path, self.final)
            _remove(trash)
        else:
            os.rename(self.root_path, self.final)
        return self.final

    def abort(self) -> None:
        if self.append:
            for tmp, _ in self._groups.values():
                _remove(tmp)
        else:
            _remove(self.root_path)


def remove_stale_temporaries(out_dir: Path, slide_id: str | None = None) -> list[Path]:
    """Delete temporaries left by killed runs (callers must hold the slide's lock, if any): temporary
    stores, swapped-out old stores, temporary QC pictures, temporary groups inside a store."""
    out_dir = Path(out_dir)
    sid = glob.escape(slide_id) if slide_id else "*"
    removed = []
    for pattern in (f".{sid}.zarr{TMP_MARK}*", f".{sid}.zarr.old{TMP_MARK}*", f".{sid}.qc.png.tmp-*"):
        for path in out_dir.glob(pattern):
            if path.is_dir():
                _remove(path)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
    if slide_id:
        store = store_path(out_dir, slide_id)
        if store.is_dir():
            for path in store.glob(f".*{TMP_MARK}*"):
                _remove(path)
                removed.append(path)
    return removed


# -- reading -----------------------------------------------------------------------------------
def completed_encoders(path: Path) -> list[str]:
    """Encoder names whose groups are complete; [] when the store is missing or unreadable."""
    try:
        root = zarr.open_group(str(path), mode="r", zarr_format=3)
        names = []
        for key, group in root.groups():
            if key.startswith("."):
                continue
            attrs = group.attrs.asdict()
            if attrs.get("complete") is True:
                names.append(attrs.get("encoder", {}).get("name", key))
        return names
    except Exception:  # a missing or damaged store simply has nothing complete
        return []


class EmbeddingStore:
    """Read a finished store. Refuses incomplete stores and encoder groups.

    >>> s = open_store("out/CMU-1-Small-Region.zarr")
    >>> feats, xy = s.bag("lunit-bt-rn50")   # (N, dim) float32 and (N, 2) level-0 coords
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if TMP_MARK in self.path.name:
            raise IncompleteStore(f"{self.path}: a temporary store of an unfinished run; rerun wsi-embed embed")
        if not (self.path / "zarr.json").exists():
            raise IncompleteStore(f"{self.path}: not a wsi-embed store (no zarr.json); check the path")
        self.root = zarr.open_group(str(self.path), mode="r", zarr_format=3)
        if "wsi_embed" not in self.root.attrs:
            raise IncompleteStore(f"{self.path}: not a wsi-embed store; check the path")

    @property
    def attrs(self) -> dict:
        return self.root.attrs.asdict()

    @property
    def encoders(self) -> list[str]:
        return completed_encoders(self.path)

    def _group(self, encoder: str | None) -> zarr.Group:
        done = self.encoders
        if encoder is None:
            if len(done) != 1:
                raise WsiEmbedError(
                    f"{self.path}: holds {len(done)} complete encoders ({', '.join(done) or 'none'}); "
                    "name one"
                    if done else f"{self.path}: no complete encoder group; rerun wsi-embed embed")
            encoder = done[0]
        node = group_name(encoder)
        if node not in self.root or self.root[node].attrs.get("complete") is not True:
            raise IncompleteStore(
                f"{self.path}: encoder {encoder!r} is missing or incomplete "
                f"(complete: {', '.join(done) or 'none'}); rerun wsi-embed embed --model {encoder}")
        return self.root[node]

    def encoder_attrs(self, encoder: str | None = None) -> dict:
        return self._group(encoder).attrs.asdict()["encoder"]

    def embeddings(self, encoder: str | None = None) -> zarr.Array:
        return self._group(encoder)["embeddings"]

    @property
    def mask(self) -> np.ndarray:
        return self.root["mask"][...]

    @property
    def coords(self) -> np.ndarray:
        return self.root["coords"][...]

    def bag(self, encoder: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The embedded cells as a MIL bag: features (N, dim) float32 and level-0 coords (N, 2)."""
        mask = self.mask
        emb = self.embeddings(encoder)[...]
        return emb[mask].astype(np.float32), self.coords[mask]


def open_store(path: str | os.PathLike) -> EmbeddingStore:
    return EmbeddingStore(path)
