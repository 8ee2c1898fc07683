"""Native tile reads for tiled TIFF-family slides (Aperio SVS, generic and Big TIFF, OME-TIFF).

Instead of ``read_region`` (which decodes every tile under a block), a cell is cut from the raw
tiles it touches: tile offsets come from tifffile, the bytes from ``os.pread``, and each tile is
decoded once per region, JPEG by libjpeg-turbo (simplejpeg) and every other compression by
tifffile's own decoder (imagecodecs).

Two traps of JPEG tiles:

- Aperio's tiles are abbreviated streams: the quantization and Huffman tables live in the
  ``JPEGTables`` tag and are spliced in front of each tile.
- Aperio's tiles are RGB-coded (photometric RGB, component ids 0/1/2, no Adobe marker), which
  libjpeg would take for YCbCr. The colour space comes from the TIFF photometric tag, as openslide
  and tifffile do: an Adobe APP14 marker with transform 0 tells libjpeg the samples are RGB.

Only levels of plain 8-bit RGB/YCbCr pixels qualify; anything else keeps ``read_region``.

:meth:`TileSource.jpeg_stream` gives a JPEG tile as a complete stream (tables and marker spliced in)
for decoders other than libjpeg-turbo here: ``wsi_embed.decode`` sends them to the device.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .errors import UnreadableSlide
from .pixels import level_format

log = logging.getLogger(__name__)

BACKGROUND = 255
JPEG = 7
PHOTOMETRIC_RGB, PHOTOMETRIC_YCBCR = 2, 6
_SOI, _EOI = b"\xff\xd8", b"\xff\xd9"
_YCBCR_LABELLED_RGB = (33003, 33004)  # Aperio JPEG 2000 tiles: YCbCr samples under photometric RGB
# APP14 "Adobe", version 100, flags 0, transform 0: the three components are R, G, B
_ADOBE_RGB = b"\xff\xee\x00\x0eAdobe\x00\x64\x00\x00\x00\x00\x00"


@dataclass(frozen=True)
class TiledLevel:
    width: int
    height: int
    tile_w: int
    tile_h: int
    offsets: np.ndarray  # (tiles_down, tiles_across) int64 byte offsets, 0 where a tile is missing
    counts: np.ndarray  # same shape, byte counts
    compression: int
    decode: Callable[[bytes, int], np.ndarray]  # (raw bytes, tile index) -> (tile_h, tile_w, 3) uint8
    jpeg_prefix: bytes | None = None  # JPEG levels: what goes before each tile's own stream (SOI included)

    @property
    def decoder(self) -> str:
        """The CPU decoder of this level's tiles, as recorded with the embeddings."""
        if self.compression == JPEG:
            return CPU_JPEG_DECODER
        return f"imagecodecs {codec_name(self.compression)} (tifffile, cpu)"

    def jpeg_stream(self, data: bytes) -> bytes:
        """A tile's bytes as a complete JPEG stream (JPEG levels only)."""
        if self.jpeg_prefix is None:
            raise ValueError(f"tiles compressed with {codec_name(self.compression)} are not JPEG")
        return _jpeg_stream(self.jpeg_prefix, data)


CPU_JPEG_DECODER = "libjpeg-turbo (simplejpeg, cpu)"


def codec_name(compression: int) -> str:
    try:
        import tifffile

        return tifffile.COMPRESSION(compression).name.lower()
    except (ImportError, ValueError):
        return f"compression {compression}"


def _jpeg_prefix(tables: bytes | None, photometric: int) -> bytes:
    """What goes before a tile's own stream (after its SOI): the Adobe marker, then the tables."""
    prefix = _SOI + (_ADOBE_RGB if photometric == PHOTOMETRIC_RGB else b"")
    if tables:
        body = tables[2:] if tables.startswith(_SOI) else tables
        prefix += body[:-2] if body.endswith(_EOI) else body
    return prefix


def _jpeg_stream(prefix: bytes, data: bytes) -> bytes:
    """A tile's bytes after ``prefix``. Some writers leave out the tile's closing EOI marker (readers
    add it); one is added, and a tile cut short anywhere else still fails to decode."""
    body = data[2:] if data.startswith(_SOI) else data
    return prefix + body + (b"" if body.endswith(_EOI) else _EOI)


def _jpeg_decoder(prefix: bytes, tile_h: int, tile_w: int):
    def decode(data: bytes, index: int) -> np.ndarray:
        return _fit(decode_jpeg_cpu(_jpeg_stream(prefix, data)), tile_h, tile_w)

    return decode


def decode_jpeg_cpu(stream: bytes) -> np.ndarray:
    """A complete JPEG stream as (h, w, 3) RGB by libjpeg-turbo: the reference every decoder is held to."""
    import simplejpeg

    return simplejpeg.decode_jpeg(stream, colorspace="RGB")


def _tifffile_decoder(page, tile_h: int, tile_w: int):
    """tifffile's own decoder (LZW, deflate, zstd, JPEG 2000, ...), with predictors undone."""
    decode_page = page.decode
    tables = getattr(page, "jpegtables", None)

    def decode(data: bytes, index: int) -> np.ndarray:
        array, _, _ = decode_page(data, index, jpegtables=tables)
        return _fit(np.asarray(array).reshape(array.shape[-3:]), tile_h, tile_w)

    return decode


def _fit(tile: np.ndarray, tile_h: int, tile_w: int) -> np.ndarray:
    """A decoded tile as (tile_h, tile_w, 3); short edge tiles are padded with background."""
    if tile.shape[:2] == (tile_h, tile_w):
        return tile
    out = np.full((tile_h, tile_w, 3), BACKGROUND, dtype=np.uint8)
    h, w = min(tile_h, tile.shape[0]), min(tile_w, tile.shape[1])
    out[:h, :w] = tile[:h, :w, :3]
    return out


def _level_of(page) -> TiledLevel | None:
    """The tile index of one pyramid level, or None when it does not qualify for native reads."""
    if not page.is_tiled or page.tiledepth > 1 or not level_format(page).plain:
        return None  # anything but 8-bit RGB at full scale goes through the slide reader's conversion
    if page.planarconfig != 1 or page.photometric not in (PHOTOMETRIC_RGB, PHOTOMETRIC_YCBCR):
        return None
    th, tw = int(page.tilelength), int(page.tilewidth)
    across, down = math.ceil(page.imagewidth / tw), math.ceil(page.imagelength / th)
    offsets = np.asarray(page.dataoffsets, dtype=np.int64)
    counts = np.asarray(page.databytecounts, dtype=np.int64)
    if offsets.size != across * down:
        return None
    prefix = None
    if page.compression == JPEG:
        tables = page.jpegtables
        # YCbCr JPEG is decoded as the stream says; RGB-coded JPEG needs the Adobe marker
        prefix = _jpeg_prefix(bytes(tables) if tables is not None else None, page.photometric)
        decode = _jpeg_decoder(prefix, th, tw)
    elif page.photometric == PHOTOMETRIC_YCBCR or page.compression in _YCBCR_LABELLED_RGB:
        return None  # YCbCr in other codecs: leave it to the slide reader, which converts it
    else:
        decode = _tifffile_decoder(page, th, tw)
    return TiledLevel(int(page.imagewidth), int(page.imagelength), tw, th, offsets.reshape(down, across),
                      counts.reshape(down, across), int(page.compression), decode, prefix)


class TileSource:
    """Raw-tile access to one slide file; per process (it holds a file descriptor)."""

    def __init__(self, path: Path, levels: list[TiledLevel | None]):
        self.path = Path(path)
        self.levels = levels
        self._fd = os.open(self.path, os.O_RDONLY)

    @classmethod
    def open(cls, path: str | os.PathLike,
             level_dimensions: Sequence[tuple[int, int]] | None = None) -> "TileSource | None":
        """Native access to ``path`` when its pyramid levels are the slide reader's levels, else None."""
        import tifffile

        try:
            with tifffile.TiffFile(path) as tif:
                series = tif.series[0]
                pages = [lv.keyframe for lv in series.levels]
                sizes = [(int(p.imagewidth), int(p.imagelength)) for p in pages]
                if level_dimensions is not None and sizes != [tuple(d) for d in level_dimensions]:
                    return None
                levels = [_level_of(p) for p in pages]
        except Exception as exc:  # not parseable as we need it: the slide reader still works
            log.debug("no native tile access for %s: %s", path, exc)
            return None
        if not any(levels):
            return None
        return cls(Path(path), levels)

    def supports(self, level: int) -> bool:
        return level < len(self.levels) and self.levels[level] is not None

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def raw_tile(self, level: int, ty: int, tx: int) -> bytes | None:
        """The stored bytes of tile (ty, tx), or None for a tile that was never written (background)."""
        return self._raw(self.levels[level], ty, tx)

    def _raw(self, lv: TiledLevel, ty: int, tx: int) -> bytes | None:
        offset, count = int(lv.offsets[ty, tx]), int(lv.counts[ty, tx])
        if offset <= 0 or count <= 0:
            return None
        data = os.pread(self._fd, count, offset)
        if len(data) != count:
            level = next(i for i, other in enumerate(self.levels) if other is lv)
            raise UnreadableSlide(f"{self.path}: level {level}, tile ({tx}, {ty}) is cut short ({len(data)} of {count} "
                                  "bytes): the file is truncated, or was overwritten while it was read; re-copy it "
                                  "and rerun")
        return data

    def jpeg_stream(self, level: int, ty: int, tx: int) -> bytes | None:
        """Tile (ty, tx) of a JPEG level as a complete stream: JPEGTables spliced in and, for
        RGB-coded tiles, the Adobe transform-0 marker; None for a missing tile."""
        data = self.raw_tile(level, ty, tx)
        return None if data is None else self.levels[level].jpeg_stream(data)

    def _tile(self, lv: TiledLevel, ty: int, tx: int, cache: dict) -> np.ndarray | None:
        key = (id(lv), ty, tx)
        if key not in cache:
            data = self._raw(lv, ty, tx)
            try:
                cache[key] = None if data is None else lv.decode(data, ty * lv.offsets.shape[1] + tx)
            except Exception as exc:  # codecs raise assorted errors on damaged data
                level = next(i for i, other in enumerate(self.levels) if other is lv)
                raise UnreadableSlide(
                    f"{self.path}: cannot decode pixels at level {level}, tile ({tx}, {ty}) "
                    f"({type(exc).__name__}: {exc}); the file is probably truncated or corrupt: re-copy or re-export it"
                ) from exc
        return cache[key]

    def read_into(self, level: int, x: int, y: int, out: np.ndarray, cache: dict | None = None) -> np.ndarray:
        """Fill ``out`` (h, w, 3) with the level pixels whose top-left is (x, y); outside is white.

        ``cache`` (tile -> pixels) lets the cells of one region share their decoded tiles."""
        lv = self.levels[level]
        cache = {} if cache is None else cache
        h, w = out.shape[:2]
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, lv.width), min(y + h, lv.height)
        if x1 <= x0 or y1 <= y0:
            out[...] = BACKGROUND
            return out
        if (x0, y0, x1, y1) != (x, y, x + w, y + h):
            out[...] = BACKGROUND
        for ty in range(y0 // lv.tile_h, (y1 - 1) // lv.tile_h + 1):
            for tx in range(x0 // lv.tile_w, (x1 - 1) // lv.tile_w + 1):
                tile = self._tile(lv, ty, tx, cache)
                tx0, ty0 = tx * lv.tile_w, ty * lv.tile_h
                ax0, ay0 = max(x0, tx0), max(y0, ty0)
                ax1, ay1 = min(x1, tx0 + lv.tile_w), min(y1, ty0 + lv.tile_h)
                dst = out[ay0 - y : ay1 - y, ax0 - x : ax1 - x]
                if tile is None:
                    dst[...] = BACKGROUND
                else:
                    dst[...] = tile[ay0 - ty0 : ay1 - ty0, ax0 - tx0 : ax1 - tx0]
        return out

    def read_region(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        return self.read_into(level, x, y, np.empty((h, w, 3), dtype=np.uint8))


def tiles_under(level: TiledLevel, x: int, y: int, w: int, h: int) -> list[tuple[int, int]]:
    """(ty, tx) of the tiles a box of level pixels touches (inside the level)."""
    x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, level.width), min(y + h, level.height)
    if x1 <= x0 or y1 <= y0:
        return []
    return [(ty, tx) for ty in range(y0 // level.tile_h, (y1 - 1) // level.tile_h + 1)
            for tx in range(x0 // level.tile_w, (x1 - 1) // level.tile_w + 1)]


def decode_seconds(source: TileSource, level: int, tiles: set[tuple[int, int]]) -> float:
    """Time to decode ``tiles`` once each, in this thread, with the bytes already in memory: the
    decoding limit that reading cells from these tiles cannot beat on one core."""
    import time

    lv = source.levels[level]
    raw = [(os.pread(source._fd, int(lv.counts[t]), int(lv.offsets[t])), t[0] * lv.offsets.shape[1] + t[1])
           for t in sorted(tiles) if lv.offsets[t] > 0]
    started = time.perf_counter()
    for data, index in raw:
        lv.decode(data, index)
    return time.perf_counter() - started
