"""The per-slide Zarr v3 store: written under a temporary name, renamed into place when complete.

Layout (see README, "Store layout")::

    <slide_id>.zarr/  attrs wsi_embed, slide, grid, tissue
      mask, tissue_fraction, coords, thumbnail, tissue_mask
      <encoder>/  attrs encoder, complete, cells
        embeddings (rows, cols, dim)

The geometry arrays are stored in few chunks (one up to 16 MiB, :func:`geometry_chunks`); the
embeddings in chunks of the region block (``grid.block`` in the attrs) by the whole feature axis.
Stores written before that have geometry chunked like the embeddings: readers depend on neither.

Every array is written with a ``crc32c`` checksum after its compressor, so a damaged chunk is found
when it is read (:mod:`wsi_embed.verify` reads them all); stores written before that still read.
Temporaries always start with ``.`` (``.<id>.zarr.tmp-*``, groups ``.<name>.tmp-*`` inside a store)
and slide ids never do: only such a name is taken for a temporary (``scan.tmp-1.zarr`` is a store).
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import json
import logging
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec

from . import __version__
from .atomic import TMP_MARK, owner_gone, swap_in_dir, tmp_suffix
from .errors import CorruptStore, IncompleteStore, OutputNotWritable, WsiEmbedError

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
GEOMETRY_ARRAYS = ("mask", "tissue_fraction", "coords", "thumbnail", "tissue_mask")
# Optional geometry arrays (stores from before them lack them): the ink mask (thumbnail px), per-cell
# ink fraction, annotation label (int16, -1 none) and artefact measures (see wsi_embed.artefacts).
OPTIONAL_ARRAYS = ("ink_mask", "ink_fraction", "annotation", "grey_std", "laplacian_var")
# Geometry arrays are stored in few chunks, whatever the region block: each array is one chunk
# while it is at most this many bytes (a 100k x 100k slide's grid at 224 px and 0.5 µm/px is
# 446 x 446 cells: 3 MB of coords), larger ones in square chunks of a power-of-two side that fit
# it (mask 4096 x 4096 cells, tissue_fraction 2048, coords 1024, thumbnail 2048 px). Readers
# never assume a geometry chunk shape; the region block is recorded in the grid attrs ("block").
GEOMETRY_CHUNK_BYTES = 16 << 20
# zstd as before, then a checksum of the compressed bytes: a truncated or overwritten chunk fails it
COMPRESSORS = (ZstdCodec(level=0, checksum=False), Crc32cCodec())
# geometry chunks are few: write them all (even all-False ones), so a missing chunk file is damage
_EVERY_CHUNK = {"write_empty_chunks": True}


def is_temporary(name: str) -> bool:
    """A temporary store or group name (``.<id>.zarr.tmp-*``, ``.<group>.tmp-*``). Ids never start
    with ``.``, so ``scan.tmp-1.zarr`` is a real store."""
    return name.startswith(".") and TMP_MARK in name


def has_checksums(array: zarr.Array) -> bool:
    """Whether ``array`` was written with the crc32c codec (stores from before it have none)."""
    return any(isinstance(c, Crc32cCodec) for c in array.metadata.codecs)


def group_name(encoder_name: str) -> str:
    """Zarr node name for an encoder: ``timm:foo`` becomes ``timm-foo`` (no ':' in paths)."""
    return encoder_name.replace(":", "-").replace("/", "-")


def store_path(out_dir: Path, slide_id: str) -> Path:
    return Path(out_dir) / f"{slide_id}.zarr"


def store_slide_id(store: str | os.PathLike) -> str:
    """The slide id a store is named after (``<out>/<slide_id>.zarr``)."""
    return Path(store).name.removesuffix(".zarr")


def expected_optional_arrays(tissue: dict) -> list[str]:
    """The optional arrays a store's ``tissue`` attrs say it holds: ink (``ink_mm2``, written with
    them), annotation labels (``annotations``), artefact measures (``artefacts``)."""
    names = ["ink_mask", "ink_fraction"] if "ink_mm2" in tissue else []
    names += ["annotation"] if tissue.get("annotations") else []
    return names + (["grey_std", "laplacian_var"] if "artefacts" in tissue else [])


def enclosing_store(path: str | os.PathLike) -> Path | None:
    """The store (a ``*.zarr`` folder with its ``zarr.json``) that ``path`` is, or lies inside; None
    when there is none."""
    path = Path(path).absolute()
    for p in (path, *path.parents):
        if p.name.endswith(".zarr") and (p / "zarr.json").is_file():
            return p
    return None


def refuse_inside_a_store(path: str | os.PathLike,
                          give: str = "the <slide_id>.zarr folder or its output folder") -> None:
    """A path inside a store (one of its arrays or groups) is not a store: say which store it is in
    (judged as a store of its own, the store would look damaged) and what to ``give`` instead."""
    store = enclosing_store(path)
    if store is not None and store != Path(path).absolute():
        raise IncompleteStore(f"{path}: inside the store {store}, not a store itself; give {give}")


def refuse_a_temporary_store(path: str | os.PathLike, error: type[WsiEmbedError] = IncompleteStore) -> None:
    """A killed or running run's temporary store (``.<id>.zarr.tmp-*``) is not a store."""
    if is_temporary(Path(path).name):
        raise error(f"{path}: a temporary store of a run that did not finish, not a store; rerun wsi-embed embed "
                    "on its folder to finish that slide (or wsi-embed verify --repair on the folder to remove it, "
                    "once its run has ended)")


def folders_to_make(path: str | os.PathLike) -> list[Path]:
    """The folders that creating ``path`` would make, deepest first (see :func:`remove_if_empty`)."""
    path = Path(path).absolute()
    return [p for p in (path, *path.parents) if not p.exists()]


def remove_if_empty(folders: list[Path]) -> None:
    """Remove ``folders`` (deepest first) while they are empty: a run that stopped before writing
    anything leaves no empty --out behind."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:  # not empty (or gone): it and its parents stay
            return


def check_out_dir(out_dir: str | os.PathLike) -> Path:
    """Refuse a store, or a folder inside one, as an output folder: a run written there would damage it."""
    out_dir = Path(out_dir)
    if out_dir.is_symlink() and not out_dir.exists():
        raise OutputNotWritable(f"{out_dir}: a link to {os.readlink(out_dir)}, which does not exist; create that "
                                "folder, or choose another --out")
    store = enclosing_store(out_dir)
    if store is not None:
        where = "is a store" if store == out_dir.absolute() else f"is inside the store {store}"
        raise OutputNotWritable(f"{out_dir}: {where}; --out takes the folder that holds the stores "
                                f"(here {store.parent})")
    return out_dir


def existing_output_folder(path: str | os.PathLike, error: type[WsiEmbedError] = WsiEmbedError, *,
                           store_ok: bool = False) -> Path:
    """``path`` as the output folder of a run to read (report, export, index, MIL), else ``error``
    saying what it is instead: missing, a file, or (unless ``store_ok``) one store."""
    path = Path(path)
    if not path.is_dir():
        what = "no such output folder" if not path.exists() else "a file, not an output folder"
        raise error(f"{path}: {what}; give the --out folder of wsi-embed embed")
    if not store_ok and enclosing_store(path) == path.absolute():
        raise error(f"{path}: one store, not an output folder; give the folder that holds the stores "
                    f"({path.absolute().parent})")
    return path


def ensure_writable(out_dir: Path) -> Path:
    """Create ``out_dir`` and prove a file can be written there, before any work is done."""
    out_dir = check_out_dir(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputNotWritable(f"{out_dir}: is a file, not a folder; --out takes a folder (new or existing)")
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


def geometry_chunks(shape: tuple[int, ...], itemsize: int, max_bytes: int = GEOMETRY_CHUNK_BYTES) -> tuple[int, ...]:
    """Chunk shape of a geometry array: the whole array when it fits in ``max_bytes``, else square
    chunks over the first two axes (the largest power-of-two side that fits; every other axis
    whole)."""
    shape = tuple(int(n) for n in shape)
    inner = itemsize * int(np.prod(shape[2:], dtype=np.int64))
    if inner * int(np.prod(shape[:2], dtype=np.int64)) <= max_bytes:
        side = max(shape[:2], default=1)
    else:
        side = 1 << max(0, int(np.floor(np.log2(np.sqrt(max_bytes / max(1, inner))))))
    return tuple(max(1, min(n, side)) for n in shape[:2]) + shape[2:]


def _remove(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


@dataclass
class EncoderGroupWriter:
    name: str
    array: zarr.Array
    group: zarr.Group
    cells_written: int = 0  # cells whose embedding is finite, over every block written

    def write_block(self, r0: int, c0: int, block: np.ndarray) -> None:
        self.array[r0 : r0 + block.shape[0], c0 : c0 + block.shape[1]] = block
        self.cells_written += int(np.isfinite(block).all(axis=-1).sum())


class StoreWriter:
    """Writes one slide's store. Nothing appears under the final name until :meth:`commit`.

    A fresh store is built in ``.<id>.zarr.tmp-*`` beside the final path. When the store already
    exists (another encoder was run before), new encoder groups are built under temporary names
    inside it and renamed into place; the geometry and tissue arrays are reused.

    Used as a context manager, a block that raises (any exception, ``KeyboardInterrupt`` and
    ``GeneratorExit`` included) aborts the writer: its temporaries are removed and the exception
    goes on. A block that ends normally leaves the writer as it is: committed if the block
    committed it, else still open for a later :meth:`commit` or :meth:`abort` (so a caller may
    prepare a store in one ``with`` block and commit it elsewhere)::

        with StoreWriter(store_path(out, slide_id), append=False) as writer:
            writer.create(attrs=..., mask=..., tissue_fraction=..., coords=..., thumbnail=...,
                          tissue_mask=..., chunk=block)
            group = writer.add_encoder(name, dim=dim, dtype="float16", chunk=block, attrs=enc_attrs)
            group.write_block(r0, c0, block_array)  # region by region
            writer.mark_complete(group)
            writer.commit()

    :meth:`guard` does the same for a writer made earlier (``with writer.guard(): ...``).
    :meth:`abort` and :meth:`commit` can still be called directly; :meth:`abort` is idempotent and
    a no-op after :meth:`commit`, and nothing can be written after either.
    """

    def __init__(self, final: Path, *, append: bool):
        self.final = Path(final)
        self.append = append
        if append:
            self.root_path = self.final
        else:
            self.root_path = self.final.with_name(f".{self.final.name}{tmp_suffix()}")
        self._groups: dict[str, tuple[Path, Path]] = {}  # name -> (tmp path, final path)
        self._root: zarr.Group | None = None
        self.state = "open"  # then "committed" or "aborted"

    def __enter__(self) -> "StoreWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is not None:
            self._abort_quietly()
        return False  # the exception, if any, goes on

    @contextlib.contextmanager
    def guard(self) -> Iterator["StoreWriter"]:
        """``with writer.guard():`` aborts this writer if the block raises, like ``with writer:``."""
        try:
            yield self
        except BaseException:
            self._abort_quietly()
            raise

    def _abort_quietly(self) -> None:
        try:
            self.abort()
        except Exception as exc:  # noqa: BLE001 - the block's own error is the one to report
            log.warning("%s: could not remove the temporaries of an aborted store (%r)", self.final, exc)

    def _check_open(self) -> None:
        if self.state != "open":
            raise RuntimeError(f"{self.final}: this store writer is already {self.state}")

    # -- base arrays -------------------------------------------------------------------------
    def create(self, *, attrs: dict, mask, tissue_fraction, coords, thumbnail, tissue_mask, chunk: int,
               extra: dict | None = None) -> None:
        """Write the root attrs and the geometry arrays. ``chunk`` is the region block (the side of
        the embeddings' chunks); it is recorded as ``grid.block`` when the caller has not. The
        geometry arrays are chunked by :func:`geometry_chunks`, not by ``chunk``. ``extra``: optional
        arrays (:data:`OPTIONAL_ARRAYS`), name -> (data, dimension names)."""
        self._check_open()
        root = zarr.open_group(str(self.root_path), mode="w", zarr_format=3)
        attrs = dict(attrs)
        if isinstance(attrs.get("grid"), dict) and "block" not in attrs["grid"]:
            attrs["grid"] = {**attrs["grid"], "block": int(chunk)}
        root.attrs.update({"wsi_embed": {"schema_version": SCHEMA_VERSION, "version": __version__}, **attrs})
        common = {"compressors": COMPRESSORS, "config": _EVERY_CHUNK}
        for name, data, dims in (
            ("mask", np.asarray(mask, dtype=bool), ("row", "col")),
            ("tissue_fraction", np.asarray(tissue_fraction, dtype=np.float32), ("row", "col")),
            ("coords", np.asarray(coords, dtype=np.int64), ("row", "col", "xy")),
            ("thumbnail", np.asarray(thumbnail, dtype=np.uint8), ("y", "x", "rgb")),
            ("tissue_mask", np.asarray(tissue_mask, dtype=bool), ("y", "x")),
        ):
            root.create_array(name, data=data, chunks=geometry_chunks(data.shape, data.dtype.itemsize),
                              dimension_names=dims, **common)
        self._root = root
        for name, (data, dims) in (extra or {}).items():
            self.add_geometry(name, data, dims)

    # -- optional geometry, finalised at commit (wsi_embed.artefacts) ---------------------------
    def add_geometry(self, name: str, data: np.ndarray, dims: tuple[str, ...]) -> None:
        """Write (or replace) an optional geometry array of a store being built."""
        self._check_open()
        if name not in OPTIONAL_ARRAYS:
            raise ValueError(f"{name} is not an optional geometry array")
        data = np.asarray(data)
        self._root.create_array(name, data=data, chunks=geometry_chunks(data.shape, data.dtype.itemsize),
                                dimension_names=dims, compressors=COMPRESSORS, config=_EVERY_CHUNK, overwrite=True)

    def read_geometry(self, name: str) -> np.ndarray:
        return self._root[name][...]

    def update_geometry(self, name: str, data: np.ndarray) -> None:
        self._check_open()
        # the runtime config is not stored with the array: without it, an all-empty chunk (a mask
        # whose cells were all dropped) would be deleted, and a missing geometry chunk means damage
        self._root[name].with_config(_EVERY_CHUNK)[...] = data

    def root_attrs(self) -> dict:
        return self._root.attrs.asdict()

    def update_attrs(self, attrs: dict) -> None:
        self._check_open()
        self._root.attrs.update(attrs)

    def open_existing(self) -> zarr.Group:
        self._check_open()
        self._root = zarr.open_group(str(self.root_path), mode="r+", zarr_format=3)
        return self._root

    # -- encoder groups ----------------------------------------------------------------------
    def add_encoder(self, name: str, *, dim: int, dtype: str, chunk: int, attrs: dict) -> EncoderGroupWriter:
        self._check_open()
        if self._root is None:
            raise RuntimeError("StoreWriter: call create() or open_existing() before add_encoder()")
        rows, cols = self._root["mask"].shape
        node = group_name(name)
        tmp_node = f".{node}{tmp_suffix()}" if self.append else node
        group = self._root.create_group(tmp_node)
        group.attrs.update({"encoder": attrs, "complete": False})
        array = group.create_array(
            "embeddings", shape=(rows, cols, dim), chunks=(max(1, chunk), max(1, chunk), dim),
            dtype=dtype, fill_value=np.nan, dimension_names=("row", "col", "feature"), compressors=COMPRESSORS,
        )
        self._groups[name] = (self.root_path / tmp_node, self.root_path / node)
        return EncoderGroupWriter(name, array, group)

    def mark_complete(self, writer: EncoderGroupWriter, cells: int | None = None) -> None:
        """Set ``complete`` (written last) and ``cells``, the number of embedded cells, which
        :func:`wsi_embed.verify.verify_store` checks against the mask. ``cells`` defaults to the
        cells written with a finite embedding."""
        if cells is None:
            cells = writer.cells_written
        elif cells != writer.cells_written:
            log.warning("%s: %d cells expected, %d written with a finite embedding",
                        writer.name, cells, writer.cells_written)
        writer.group.attrs.update({"complete": True, "cells": int(cells)})

    def commit(self) -> Path:
        """Move everything into place. Safe against crashes at any point: see module doc."""
        self._check_open()
        self._commit()
        self.state = "committed"
        return self.final

    def _commit(self) -> None:
        if self.append:
            for tmp, final in self._groups.values():
                swap_in_dir(tmp, final)
            return
        swap_in_dir(self.root_path, self.final)  # --overwrite: the old store is swapped out, then deleted

    def abort(self) -> None:
        """Remove this writer's temporaries (the temporary store, or the temporary groups added to
        an existing one). Idempotent; does nothing after :meth:`commit`."""
        if self.state == "committed":
            return
        self.state = "aborted"
        if self.append:
            for tmp, _ in self._groups.values():
                _remove(tmp)
        else:
            _remove(self.root_path)


def repair_backup_path(store: Path) -> Path:
    """Where ``wsi-embed verify --repair`` keeps a damaged store while it is rebuilt (a temporary that
    :func:`remove_stale_temporaries` leaves alone while its process lives). ``.zarr.bad`` is as long
    as ``.zarr.old``, so every id that fits :mod:`wsi_embed.ids`' length limit fits here too."""
    store = Path(store)
    return store.with_name(f".{store.name}.bad{tmp_suffix()}")


def store_of_backup(backup: Path) -> Path:
    """``.<id>.zarr.bad.tmp-*`` -> ``<id>.zarr`` (see :func:`repair_backup_path`)."""
    return backup.with_name(backup.name[1 : backup.name.rindex(f".bad{TMP_MARK}")])


def restore_repair_backup(backup: Path) -> Path | None:
    """Put back the store a repair that died had moved aside, when nothing took its place (its
    other encoder groups may be intact); the store, or None when a store is there already (the
    repair got as far as its commit, and the backup is stale). Callers hold the slide's lock."""
    final = store_of_backup(backup)
    if final.exists():
        return None
    os.rename(backup, final)
    log.warning("%s: put back as it was before a repair that was interrupted; check it with wsi-embed verify", final)
    return final


def holds_more_groups(backup: Path) -> bool:
    """A repair that died between two of its commits: the store is back, but without some of the
    backup's encoder groups. The backup is kept (and said) rather than lost."""
    final = store_of_backup(backup)
    missing = sorted(set(group_dirs(backup)) - set(group_dirs(final)))
    if missing:
        log.warning("%s: kept: the store a repair was rebuilding when it stopped, holding encoder groups %s that "
                    "%s lacks; re-embed those with wsi-embed embed --model, then delete it", backup,
                    ", ".join(missing), final)
    return bool(missing)


def settle_repair_backup(backup: Path) -> bool:
    """The backup of a repair that died: put back where no store took its place, kept (and said)
    where it holds groups the store lacks, else removed as stale; True when it was removed. Callers
    hold the slide's lock."""
    if restore_repair_backup(backup) is not None or holds_more_groups(backup):
        return False
    _remove(backup)
    return True


def restore_interrupted_repair(out_dir: Path, slide_id: str) -> None:
    """:func:`settle_repair_backup` for the backups of this slide whose repair died."""
    for backup in Path(out_dir).glob(f".{glob.escape(slide_id)}.zarr.bad{TMP_MARK}*"):
        if owner_gone(backup.name):
            settle_repair_backup(backup)


def remove_stale_temporaries(out_dir: Path, slide_id: str | None = None) -> list[Path]:
    """Delete temporaries left by killed runs (callers must hold the slide's lock, if any): temporary
    stores, swapped-out old stores, temporary QC pictures, temporary groups inside a store, and the
    backups of repairs whose process has ended."""
    out_dir = Path(out_dir)
    sid = glob.escape(slide_id) if slide_id else "*"
    removed = []
    for pattern in (f".{sid}.zarr{TMP_MARK}*", f".{sid}.zarr.old{TMP_MARK}*", f".{sid}.qc.png.tmp-*",
                    f".{sid}.zarr.bad{TMP_MARK}*", f".{sid}.*.map.png{TMP_MARK}*", f".{sid}.*.clusters.png{TMP_MARK}*"):
        for path in out_dir.glob(pattern):
            if (".zarr.bad" in pattern or ".png" in pattern and ".qc.png" not in pattern) and not owner_gone(path.name):
                continue  # a repair's backup, or maps another live run is drawing (maps are not locked)
            if ".zarr.bad" in pattern:
                if settle_repair_backup(path):
                    removed.append(path)
                continue
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


def remove_dead_temporaries(out_dir: Path) -> list[Path]:
    """Delete the temporaries (stores, swapped-out old stores, QC pictures, maps, pages) of runs on
    this host whose process has ended, whatever their slide's lock says: a store skipped as complete,
    or one whose lock was deleted by hand, is otherwise never tidied of them. Repair backups are
    left to :func:`settle_repair_backup`, which may have to put them back."""
    removed = []
    for pattern in (f".*.zarr{TMP_MARK}*", f".*.zarr.old{TMP_MARK}*", f".*.qc.png{TMP_MARK}*",
                    f".*.map.png{TMP_MARK}*", f".*.clusters.png{TMP_MARK}*", f".*.attention.png{TMP_MARK}*",
                    f".*.html{TMP_MARK}*"):
        for path in Path(out_dir).glob(pattern):
            if owner_gone(path.name):
                try:
                    if path.is_dir():
                        shutil.rmtree(path)
                    else:
                        path.unlink(missing_ok=True)
                    removed.append(path)
                except OSError as exc:  # another user's, in a shared folder: not ours to fail on
                    log.warning("%s: left by a run that ended, cannot be removed (%s)", path, exc.strerror or exc)
    return removed


# -- reading -----------------------------------------------------------------------------------
def repair_hint(store: Path) -> str:
    return f"repair it with: wsi-embed verify {store} --repair"


def settle_zarr_reads(timeout: float = 30.0) -> None:
    """Let a failed read's other chunk tasks finish on zarr's event loop thread.

    When one chunk of a read fails to decode, zarr raises at once while the read's other chunk
    tasks are still pending on its loop; at interpreter exit they are destroyed, and asyncio logs
    "Task was destroyed but it is pending!" for each (pages of it). Waiting for them here, right
    after the failed read, leaves nothing pending. Nothing global is changed."""
    try:
        from zarr.core import sync as zsync

        loop = zsync.loop[0]
    except (ImportError, AttributeError, IndexError):  # another zarr layout: nothing to wait for
        return
    if loop is None or loop.is_closed() or not loop.is_running():
        return

    zarr_dir = os.path.dirname(zarr.__file__)

    def _zarrs(task: asyncio.Task) -> bool:  # only zarr's own tasks: others may run for long
        code = getattr(task.get_coro(), "cr_code", None)
        return code is not None and code.co_filename.startswith(zarr_dir)

    async def _settle() -> None:
        me = asyncio.current_task()
        end = loop.time() + timeout
        while True:
            pending = [t for t in asyncio.all_tasks() if t is not me and _zarrs(t)]
            left = end - loop.time()
            if not pending or left <= 0:
                return
            await asyncio.wait(pending, timeout=left)

    try:
        asyncio.run_coroutine_threadsafe(_settle(), loop).result(timeout + 5)
    except Exception as exc:  # waiting is a courtesy; the read's own error is what matters
        log.debug("could not settle zarr's pending reads: %r", exc)


def damage_reason(exc: BaseException) -> str:
    """A short, plain reason for a failed read of a store node."""
    text = str(exc)
    low = text.lower()
    if isinstance(exc, ValueError) and "checksum" in low:
        return "a chunk fails its checksum"
    if "decompress" in low or "zstd" in low or "blosc" in low:
        return "a chunk cannot be decompressed: truncated or overwritten"
    if isinstance(exc, (KeyError, FileNotFoundError)):
        return "its zarr.json is missing"
    if isinstance(exc, ValueError) and ("json" in type(exc).__name__.lower() or "metadata" in low):
        return "its zarr.json cannot be parsed"
    first = text.splitlines()[0][:120] if text else "unreadable"
    return f"{type(exc).__name__}: {first}"


@contextlib.contextmanager
def read_guard(store: Path, node: str) -> Iterator[None]:
    """Reads of a store node: a damaged chunk or metadata file raises :class:`CorruptStore` naming
    the store, the node and the fix, never a raw codec error (and leaves no asyncio noise)."""
    try:
        yield
    except WsiEmbedError:
        raise
    except Exception as exc:
        settle_zarr_reads()
        if isinstance(exc, OSError) and not isinstance(exc, FileNotFoundError):
            raise  # permissions, I/O errors: not damage to the store
        raise CorruptStore(f"{store}: {node} is damaged ({damage_reason(exc)}); {repair_hint(store)}") from exc


def _read_group(path: Path) -> tuple[zarr.Group, dict]:
    group = zarr.open_group(str(path), mode="r", zarr_format=3)
    return group, group.attrs.asdict()


def _read_array(path: Path) -> zarr.Array:
    return zarr.open_array(str(path), mode="r", zarr_format=3)


def group_dirs(path: Path) -> list[str]:
    """Names of the directories inside a store that may be encoder groups (not geometry, not
    temporaries), read from the file system so one damaged node cannot hide the others."""
    return sorted(e.name for e in os.scandir(path)
                  if e.is_dir() and not e.name.startswith(".") and e.name not in GEOMETRY_ARRAYS
                  and e.name not in OPTIONAL_ARRAYS)


def unreadable_geometry(path: Path) -> list[str]:
    """Geometry arrays of a store whose metadata is missing or is not an array's (read as plain
    JSON: this runs on every resume check). I/O errors are raised, not taken for damage."""
    names = []
    for name in GEOMETRY_ARRAYS:
        try:
            meta = json.loads((Path(path) / name / "zarr.json").read_bytes())
            ok = isinstance(meta, dict) and meta.get("node_type") == "array" and isinstance(meta.get("shape"), list)
        except (FileNotFoundError, NotADirectoryError, ValueError):
            ok = False
        if not ok:
            names.append(name)
    return names


def completed_encoders(path: Path) -> list[str]:
    """Encoder names whose groups are complete, the resume check: [] when the store is missing or
    its root metadata cannot be read; a group whose metadata or embeddings metadata cannot be read
    is not complete. So a rerun redoes what is damaged."""
    path = Path(path)
    try:
        _, attrs = _read_group(path)
        keys = group_dirs(path)
    except Exception as exc:  # a missing or damaged store simply has nothing complete
        log.debug("%s: no complete encoders (%r)", path, exc)
        return []
    if "wsi_embed" not in attrs:
        return []
    names = []
    for key in keys:
        try:
            _, gattrs = _read_group(path / key)
            if gattrs.get("complete") is not True:
                continue
            if _read_array(path / key / "embeddings").ndim != 3:
                continue
        except Exception as exc:  # damaged metadata: not complete
            log.debug("%s: group %s is not complete (%r)", path, key, exc)
            continue
        names.append(gattrs.get("encoder", {}).get("name", key))
    return names


class CheckedArray(zarr.Array):
    """A zarr array whose ``[...]`` reads raise :class:`CorruptStore` for a damaged chunk, naming the
    store and the array, instead of a raw codec error."""

    def __init__(self, array: zarr.Array, store: Path, node: str):
        super().__init__(array.async_array)
        self._wsi_store, self._wsi_node = Path(store), node

    def __getitem__(self, selection):
        with read_guard(self._wsi_store, self._wsi_node):
            return super().__getitem__(selection)


class EmbeddingStore:
    """Read a finished store. Refuses temporary and incomplete stores and encoder groups; a damaged
    one raises :class:`CorruptStore` when read (and at once with ``verify=True``).

    >>> s = open_store("out/CMU-1-Small-Region.zarr")
    >>> feats, xy = s.bag("lunit-bt-rn50")   # (N, dim) float32 and (N, 2) level-0 coords
    """

    def __init__(self, path: str | os.PathLike, *, verify: bool = False):
        self.path = Path(path)
        if is_temporary(self.path.name):
            raise IncompleteStore(f"{self.path}: a temporary store of an unfinished run; rerun wsi-embed embed")
        if not (self.path / "zarr.json").exists():
            if self.path.is_dir() and any((self.path / n / "zarr.json").exists() for n in GEOMETRY_ARRAYS):
                raise CorruptStore(f"{self.path}: its root metadata (zarr.json) is missing; "
                                   f"see wsi-embed verify {self.path}")
            raise IncompleteStore(f"{self.path}: not a wsi-embed store (no zarr.json); check the path")
        with read_guard(self.path, "zarr.json (root metadata)"):
            self.root, attrs = _read_group(self.path)
        if "wsi_embed" not in attrs:
            raise IncompleteStore(f"{self.path}: not a wsi-embed store; check the path")
        if verify:
            from .verify import verify_store

            report = verify_store(self.path)
            if not report.ok:
                raise CorruptStore(report.error_line())

    @property
    def attrs(self) -> dict:
        return self.root.attrs.asdict()

    @property
    def encoders(self) -> list[str]:
        return completed_encoders(self.path)

    def _group(self, encoder: str | None) -> tuple[str, zarr.Group]:
        done = self.encoders
        if encoder is None:
            if len(done) != 1:
                raise WsiEmbedError(
                    f"{self.path}: holds {len(done)} complete encoders ({', '.join(done) or 'none'}); "
                    "name one"
                    if done else f"{self.path}: no complete encoder group; rerun wsi-embed embed")
            encoder = done[0]
        if encoder not in done:  # the group name in the store (timm-test_vit) names its model too
            encoder = {group_name(name): name for name in done}.get(encoder, encoder)
        node = group_name(encoder)
        if encoder not in done:
            gpath = self.path / node
            try:
                _, gattrs = _read_group(gpath)
                damaged = gattrs.get("complete") is True  # complete, yet its embeddings cannot be opened
                what = f"{node}/embeddings"
            except Exception:  # noqa: BLE001 - the group's own metadata is damaged or absent
                damaged = gpath.is_dir() and (gpath / "embeddings").is_dir()
                what = node
            if damaged:
                raise CorruptStore(f"{self.path}: {what} is damaged (its metadata cannot be read); "
                                   f"{repair_hint(self.path)}")
            raise IncompleteStore(
                f"{self.path}: encoder {encoder!r} is missing or incomplete "
                f"(complete: {', '.join(done) or 'none'}); rerun wsi-embed embed --model {encoder}")
        with read_guard(self.path, node):
            return node, _read_group(self.path / node)[0]

    def encoder_attrs(self, encoder: str | None = None) -> dict:
        node, group = self._group(encoder)
        with read_guard(self.path, node):
            return group.attrs.asdict()["encoder"]

    def embeddings(self, encoder: str | None = None) -> zarr.Array:
        """The (rows, cols, dim) embeddings, NaN outside the mask. Reads with ``[...]`` raise
        :class:`CorruptStore` for a damaged chunk."""
        node, group = self._group(encoder)
        with read_guard(self.path, f"{node}/embeddings"):
            return CheckedArray(_read_array(self.path / node / "embeddings"), self.path, f"{node}/embeddings")

    def _geometry(self, name: str) -> zarr.Array:
        """A geometry array; every chunk of one is written (checksummed stores), so a missing chunk
        file is damage, not the fill value zarr would silently read in its place."""
        with read_guard(self.path, name):
            array = _read_array(self.path / name)
            missing = int(array.nchunks) - int(array.nchunks_initialized) if has_checksums(array) else 0
        if missing > 0:
            raise CorruptStore(f"{self.path}: {name} is damaged ({missing} of {array.nchunks} chunk files are "
                               f"missing); {repair_hint(self.path)}")
        return CheckedArray(array, self.path, name)

    @property
    def mask(self) -> np.ndarray:
        return self._geometry("mask")[...]

    @property
    def coords(self) -> np.ndarray:
        return self._geometry("coords")[...]

    def bag(self, encoder: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The embedded cells as a MIL bag: features (N, dim) float32 and level-0 coords (N, 2), in
        row-major order. Read one band of chunk rows at a time: memory is about the bag's size.
        Raises :class:`CorruptStore` when an embedded cell has no finite embedding (a lost chunk)."""
        node, group = self._group(encoder)
        emb = self.embeddings(encoder)
        mask = self.mask
        coords = self._geometry("coords")
        rows, dim = emb.shape[0], emb.shape[2]
        n_cells = int(mask.sum())
        with read_guard(self.path, node):
            recorded = group.attrs.asdict().get("cells")
        if mask.shape != emb.shape[:2] or (recorded is not None and recorded != n_cells):
            raise CorruptStore(f"{self.path}: the mask ({n_cells} cells, {mask.shape}) disagrees with {node} "
                               f"({recorded} cells, {emb.shape[:2]}); {repair_hint(self.path)}")
        feats = np.empty((n_cells, dim), dtype=np.float32)
        xy = np.empty((n_cells, 2), dtype=np.int64)
        band, k, lost = max(1, int(emb.chunks[0])), 0, 0
        # coords are read a slab of whole coords chunk rows at a time (their chunks need not match
        # the embeddings': geometry is stored in few large chunks, see geometry_chunks)
        slab = -(-max(band, int(coords.chunks[0])) // band) * band
        for s0 in range(0, rows, slab):
            ms = mask[s0 : s0 + slab]
            if not ms.any():
                continue
            xys = coords[s0 : s0 + slab][ms]
            j = 0
            for r0 in range(s0, min(rows, s0 + slab), band):
                m = mask[r0 : r0 + band]
                n = int(m.sum())
                if n:
                    feats[k : k + n] = emb[r0 : r0 + band][m]
                    xy[k : k + n] = xys[j : j + n]
                    lost += int((~np.isfinite(feats[k : k + n]).all(axis=1)).sum())
                    k, j = k + n, j + n
        if lost:
            raise CorruptStore(f"{self.path}: {node}/embeddings is damaged ({lost} of {n_cells} embedded cells "
                               f"have no finite embedding: chunk files lost); {repair_hint(self.path)}")
        return feats, xy


def open_store(path: str | os.PathLike, *, verify: bool = False) -> EmbeddingStore:
    """Open a finished store for reading. ``verify=True`` first reads every chunk and checks the
    store (:func:`wsi_embed.verify.verify_store`), raising :class:`CorruptStore` if it is damaged."""
    return EmbeddingStore(path, verify=verify)
