"""JPEG tiles decoded on the device (``--decode auto|cpu|gpu``).

With ``--decode cpu`` the loader workers decode tiles with libjpeg-turbo and ship uint8 patches
(:mod:`wsi_embed.tiles`). With device decoding a worker ships, for each region, the complete JPEG
streams of the tiles its cells touch (:func:`collect_raw`: tables spliced in, the Adobe marker for
RGB-coded tiles, exactly what libjpeg-turbo decodes on the CPU path) plus the geometry to cut the
cells from them. The main process decodes them in one batched ``torchvision.io.decode_jpeg`` call on
the device (nvJPEG on CUDA; the same call on the CPU runs libjpeg-turbo), lays the tiles on a canvas
and cuts every cell with one gather (:func:`decode_to_device`): no decoded pixels cross processes.

Correct colours come first. A region falls back to the CPU path when its tiles are not JPEG, not
baseline 8-bit three-component JPEG, or of a colour coding the device decoder was not checked on:
:func:`device_plan` decodes small probe streams of each coding (YCbCr; RGB-coded with the Adobe
transform-0 marker, as Aperio's tiles are) on the device and keeps only the codings it decodes as
libjpeg-turbo does. The first real tile of each stream format is checked again in the main process
before its format is trusted. The patches record which decoder made them (``RegionBatch.decoder``),
and :class:`DecoderTally` sums that per slide and logs one line per slide that fell back.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch

from .errors import InvalidOption, UnreadableSlide
from .tiles import CPU_JPEG_DECODER, JPEG, TileSource, codec_name, decode_jpeg_cpu, tiles_under

log = logging.getLogger(__name__)

DECODE_MODES = ("auto", "cpu", "gpu")
KINDS = ("ycbcr", "rgb")  # colour codings of three-component JPEG, as libjpeg-turbo reads them
_SOI = b"\xff\xd8"
_SOF_NAMES = {0xC2: "progressive", 0xC3: "lossless", 0xC5: "differential", 0xC6: "progressive differential",
              0xC7: "lossless differential", 0xC9: "arithmetic-coded", 0xCA: "progressive arithmetic-coded",
              0xCB: "lossless arithmetic-coded", 0xCD: "differential arithmetic-coded",
              0xCE: "progressive differential arithmetic-coded", 0xCF: "lossless differential arithmetic-coded"}
# a device decoder agrees with libjpeg-turbo when no channel's mean absolute difference exceeds this.
# Decoders differ a little (nvJPEG upsamples 4:2:0 chroma without libjpeg's smoothing); a colour space
# taken wrongly differs by tens of levels on every pixel, white glass included.
SAME_COLOURS_MEAN = 3.0


# -- the mode ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DecodePlan:
    """Where a run's JPEG tiles are decoded; travels with every :class:`~wsi_embed.loader.ReadTask`.

    ``where``: "cpu" (loader workers decode, :mod:`wsi_embed.tiles`) or "device" (workers send the
    tile streams, the main process decodes them on the device it moves patches to). ``kinds``: the
    JPEG colour codings the device decoder was checked on; tiles of other codings stay on the CPU.
    """

    where: str = "cpu"
    device_type: str = "cpu"
    kinds: frozenset = frozenset()

    @property
    def on_device(self) -> bool:
        return self.where == "device"

    @property
    def decoder(self) -> str:
        """The decoder JPEG tiles are meant to go through (fallbacks are recorded per region)."""
        return device_decoder_name(self.device_type) if self.on_device else CPU_JPEG_DECODER


CPU_PLAN = DecodePlan()


def resolve_decode(mode: str, device: torch.device | str) -> DecodePlan:
    """``--decode``: "auto" decodes JPEG tiles on a CUDA device and on the CPU otherwise; "gpu"
    needs a CUDA device; "cpu" keeps decoding in the loader workers."""
    device = torch.device(device)
    check_decode(mode, device)
    if mode == "cpu" or (mode == "auto" and device.type != "cuda"):
        return CPU_PLAN
    return device_plan(device)


def check_decode(mode: str, device: torch.device) -> None:
    """InvalidOption for a ``--decode`` this device cannot do (no decoder is probed)."""
    if mode not in DECODE_MODES:
        raise InvalidOption(f"unknown --decode {mode!r}; use one of {', '.join(DECODE_MODES)}")
    if mode == "gpu" and device.type != "cuda":
        raise InvalidOption(f"--decode gpu needs a CUDA device, not {device}; use --decode auto or cpu")


def device_plan(device: torch.device | str) -> DecodePlan:
    """Decode on ``device`` the JPEG codings its decoder was checked on. On the CPU this runs
    torchvision's libjpeg-turbo: the same code as on a GPU, which is how this path is tested."""
    device = torch.device(device)
    kinds = probe_kinds(device)
    if not kinds:
        log.warning("torchvision cannot decode JPEG on %s as libjpeg-turbo does; tiles are decoded on the CPU",
                    device)
        return CPU_PLAN
    for kind in sorted(set(KINDS) - kinds):
        log.warning("the %s JPEG decoder does not decode %s tiles as libjpeg-turbo does; those are decoded on "
                    "the CPU", device.type, _KIND_WORDS[kind])
    return DecodePlan("device", device.type, frozenset(kinds))


def device_decoder_name(device_type: str) -> str:
    if device_type == "cuda":
        return "nvjpeg (torchvision.io.decode_jpeg, cuda)"
    return f"libjpeg-turbo (torchvision.io.decode_jpeg, {device_type})"


_KIND_WORDS = {"ycbcr": "YCbCr-coded", "rgb": "RGB-coded (Adobe transform 0)"}


# -- JPEG headers -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class JpegHeader:
    sof: int  # the frame marker: 0xC0 baseline, 0xC1 extended sequential, 0xC2 progressive, ...
    precision: int
    width: int
    height: int
    components: tuple  # ((id, h, v), ...) sampling factors
    jfif: bool
    adobe_transform: int | None

    @property
    def sampling(self) -> tuple:
        return tuple((h, v) for _, h, v in self.components)


def jpeg_header(stream: bytes) -> JpegHeader | None:
    """The frame header and colour markers of a complete JPEG stream (markers up to the first scan)."""
    if not stream.startswith(_SOI):
        return None
    pos, n = 2, len(stream)
    jfif, adobe, frame = False, None, None
    while pos + 4 <= n:
        if stream[pos] != 0xFF:
            return None
        marker = stream[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if 0xD0 <= marker <= 0xD8 or marker == 0x01:  # markers without a length
            pos += 2
            continue
        if marker in (0xD9, 0xDA):  # end of image, start of scan: the header is over
            break
        length = int.from_bytes(stream[pos + 2 : pos + 4], "big")
        seg = stream[pos + 4 : pos + 2 + length]
        if marker == 0xE0 and seg.startswith(b"JFIF\x00"):
            jfif = True
        elif marker == 0xEE and seg.startswith(b"Adobe") and len(seg) >= 12:
            adobe = seg[11]
        elif 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC) and len(seg) >= 6:
            nc = seg[5]
            if len(seg) < 6 + 3 * nc:
                return None
            comps = tuple((seg[6 + 3 * i], seg[7 + 3 * i] >> 4, seg[7 + 3 * i] & 15) for i in range(nc))
            frame = (marker, seg[0], int.from_bytes(seg[3:5], "big"), int.from_bytes(seg[1:3], "big"), comps)
        pos += 2 + length
    if frame is None:
        return None
    return JpegHeader(*frame, jfif=jfif, adobe_transform=adobe)


def stream_kind(header: JpegHeader | None) -> tuple[str | None, str]:
    """("ycbcr" | "rgb", "") as libjpeg-turbo reads the stream's colours, or (None, why not) for a
    stream the device path does not take (it stays with libjpeg-turbo on the CPU)."""
    if header is None:
        return None, "JPEG tiles without a readable frame header"
    if header.sof not in (0xC0, 0xC1):
        return None, f"{_SOF_NAMES.get(header.sof, hex(header.sof))} JPEG tiles"
    if header.precision != 8:
        return None, f"{header.precision}-bit JPEG tiles"
    if len(header.components) != 3:
        return None, f"JPEG tiles with {len(header.components)} components"
    # libjpeg-turbo's rule (jdapimin.c): JFIF means YCbCr, else the Adobe transform, else the ids
    if header.jfif or header.adobe_transform == 1:
        return "ycbcr", ""
    if header.adobe_transform == 0:
        return "rgb", ""
    if header.adobe_transform is not None:
        return None, f"JPEG tiles with Adobe transform {header.adobe_transform}"
    if tuple(c[0] for c in header.components) == (1, 2, 3):
        return "ycbcr", ""
    return None, "JPEG tiles whose colour space only their component ids suggest"


# -- the worker side --------------------------------------------------------------------------------
class CpuFallback(Exception):
    """This region's tiles go to the CPU path; the message says why (logged once per slide)."""


@dataclass
class RawTiles:
    """One region's JPEG tile streams and the geometry to cut its cells from them."""

    data: torch.Tensor  # (bytes,) uint8: the complete streams back to back
    ends: np.ndarray  # (tiles,) int64: where each stream ends in ``data``
    tiles: np.ndarray  # (tiles, 2) int64: (row, col) of each tile in the level's tile grid
    cells: np.ndarray  # (n, 2) int64: level-pixel (x, y) of each cell's top-left corner
    read_px: int
    tile_size: tuple  # (tile_w, tile_h)
    level_size: tuple  # (width, height)
    signature: tuple  # (kind, frame marker, sampling): the stream format every tile shares
    path: str = ""  # the slide, and its level, for messages
    level: int = 0

    def __len__(self) -> int:
        return len(self.cells)

    def streams(self) -> list[torch.Tensor]:
        starts = np.concatenate([[0], self.ends[:-1]]) if len(self.ends) else self.ends
        return [self.data[int(a) : int(b)] for a, b in zip(starts, self.ends)]


def collect_raw(source: TileSource, task, plan: DecodePlan) -> RawTiles:
    """The streams of the tiles ``task``'s cells touch, each once. Raises :class:`CpuFallback`
    when the level or a tile is not for the device decoder."""
    lv = source.levels[task.level]
    if lv.compression != JPEG or lv.jpeg_prefix is None:
        raise CpuFallback(f"{codec_name(lv.compression)} tiles (not JPEG)")
    x0, y0 = task.level_xy
    size = task.read_px
    cells = np.asarray([(x0 + x, y0 + y) for x, y in task.offsets], dtype=np.int64).reshape(-1, 2)
    wanted = sorted({t for x, y in cells.tolist() for t in tiles_under(lv, x, y, size, size)})
    streams, where, signature = [], [], None
    for ty, tx in wanted:
        stream = source.jpeg_stream(task.level, ty, tx)
        if stream is None:  # never written: the canvas is white there
            continue
        header = jpeg_header(stream)
        kind, why = stream_kind(header)
        if kind is None:
            raise CpuFallback(why)
        if kind not in plan.kinds:
            raise CpuFallback(f"{_KIND_WORDS[kind]} JPEG tiles, which the {plan.device_type} decoder does not "
                              "decode as libjpeg-turbo does")
        sig = (kind, header.sof, header.sampling)
        if signature is None:
            signature = sig
        elif sig != signature:
            raise CpuFallback("JPEG tiles of mixed formats in one region")
        streams.append(stream)
        where.append((ty, tx))
    ends = np.cumsum([len(s) for s in streams], dtype=np.int64)
    data = torch.empty(int(ends[-1]) if len(ends) else 0, dtype=torch.uint8)
    if torch.utils.data.get_worker_info() is not None:
        data.share_memory_()  # born shared: handing it to the main process costs no copy
    if len(streams):
        data.numpy()[:] = np.frombuffer(b"".join(streams), dtype=np.uint8)
    return RawTiles(data, ends, np.asarray(where, dtype=np.int64).reshape(-1, 2), cells, size,
                    (lv.tile_w, lv.tile_h), (lv.width, lv.height), signature or (), str(source.path), task.level)


# -- the device side --------------------------------------------------------------------------------
@dataclass
class Decoded:
    patches: torch.Tensor  # (n, read_px, read_px, 3) uint8 on the device
    decoder: str
    fallback: str | None = None  # why the device decoder was not used for these tiles
    seconds: float = 0.0


def decode_to_device(raw: RawTiles, device: torch.device | str, *, vectorized: bool | None = None) -> Decoded:
    """Decode ``raw``'s tiles in one batch on ``device`` and cut its cells there (``vectorized``:
    see :func:`assemble`)."""
    device = torch.device(device)
    started = time.perf_counter()
    streams = raw.streams()
    decoder, fallback = device_decoder_name(device.type), None
    tiles: list[torch.Tensor] = []
    if streams:
        verdict = _checked_format(device, raw.signature, streams[0])
        if verdict:
            try:
                tiles = decode_streams(streams, device)
            except torch.cuda.OutOfMemoryError:
                raise  # the caller's to handle (a smaller batch), not a reason to change decoders
            except RuntimeError as exc:  # a tile the device decoder refuses: libjpeg-turbo gets its turn
                log.debug("device decode failed", exc_info=True)
                fallback = f"the {device.type} JPEG decoder failed on a tile ({exc})"
        else:
            fallback = (f"the {device.type} JPEG decoder does not decode these tiles "
                        f"({_describe(raw.signature)}) as libjpeg-turbo does")
        if fallback is not None:
            decoder = CPU_JPEG_DECODER
            tiles = _decode_cpu(streams, raw, device)
    patches = assemble(tiles, raw, device, vectorized=vectorized)
    return Decoded(patches, decoder, fallback, time.perf_counter() - started)


def decode_streams(streams: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """Complete JPEG streams -> (3, h, w) uint8 RGB tensors on ``device``, in one batched call
    where torchvision has one (0.19+)."""
    from torchvision.io import ImageReadMode, decode_jpeg

    if _BATCHED:
        return list(decode_jpeg(streams, mode=ImageReadMode.RGB, device=device))
    return [decode_jpeg(s, mode=ImageReadMode.RGB, device=device) for s in streams]


def _torchvision_batched() -> bool:
    try:
        import torchvision

        return tuple(int(v) for v in torchvision.__version__.split("+")[0].split(".")[:2]) >= (0, 19)
    except (ImportError, ValueError):
        return False


_BATCHED = _torchvision_batched()


def _decode_cpu(streams: list[torch.Tensor], raw: RawTiles, device: torch.device) -> list[torch.Tensor]:
    """libjpeg-turbo, as the CPU path decodes, in this process; (3, h, w) on ``device``."""
    out = []
    for s, (ty, tx) in zip(streams, raw.tiles.tolist()):
        try:
            pixels = decode_jpeg_cpu(s.numpy().tobytes())
        except Exception as exc:  # the CPU path would fail on this tile too: the slide fails
            raise UnreadableSlide(f"{raw.path}: JPEG tile ({tx}, {ty}) of level {raw.level} cannot be decoded "
                                  f"({type(exc).__name__}: {exc})") from exc
        out.append(torch.from_numpy(pixels).permute(2, 0, 1).to(device))
    return out


def assemble(tiles: list[torch.Tensor], raw: RawTiles, device: torch.device, *,
             vectorized: bool | None = None) -> torch.Tensor:
    """Lay decoded tiles ((3, h, w) each, on ``device``) on a canvas and cut the cells from it:
    (n, read_px, read_px, 3) uint8. Missing tiles and whatever lies outside the level are white.

    ``vectorized`` (default: on CUDA) places every tile with one scatter and cuts every cell with one
    gather; otherwise tiles and cells are slices, stacked in one copy, which is 10-50x faster on a
    CPU, where advanced indexing is slow. Both give the same pixels."""
    vectorized = torch.device(device).type == "cuda" if vectorized is None else vectorized
    tw, th = raw.tile_size
    width, height = raw.level_size
    size = raw.read_px
    cells = raw.cells
    bx0, by0 = (int(v) for v in cells.min(axis=0))
    bx1, by1 = (int(v) + size for v in cells.max(axis=0))
    if tiles:
        (tr0, tc0), (tr1, tc1) = raw.tiles.min(axis=0), raw.tiles.max(axis=0) + 1
        tr0, tc0, tr1, tc1 = int(tr0), int(tc0), int(tr1), int(tc1)
        bx0, by0 = min(bx0, tc0 * tw), min(by0, tr0 * th)
        bx1, by1 = max(bx1, tc1 * tw), max(by1, tr1 * th)
    canvas = torch.full((by1 - by0, bx1 - bx0, 3), 255, dtype=torch.uint8, device=device)
    if tiles:
        # HWC views: the CPU decoder's output is HWC underneath, nvJPEG's is planar
        hwc = [(t if t.shape[1:] == (th, tw) else _fit(t, th, tw)).permute(1, 2, 0) for t in tiles]
        grid = canvas[tr0 * th - by0 : tr1 * th - by0, tc0 * tw - bx0 : tc1 * tw - bx0]
        grid = grid.view(tr1 - tr0, th, tc1 - tc0, tw, 3)
        rows, cols = raw.tiles[:, 0] - tr0, raw.tiles[:, 1] - tc0
        if vectorized:
            grid[torch.as_tensor(rows, device=device), :, torch.as_tensor(cols, device=device)] = torch.stack(hwc)
        else:
            for r, c, tile in zip(rows.tolist(), cols.tolist(), hwc):
                grid[r, :, c] = tile
        # edge tiles are padded past the level; that is not image
        if width - bx0 < canvas.shape[1]:
            canvas[:, max(width - bx0, 0) :] = 255
        if height - by0 < canvas.shape[0]:
            canvas[max(height - by0, 0) :] = 255
    if not vectorized:
        return torch.stack([canvas[y : y + size, x : x + size] for x, y in (cells - (bx0, by0)).tolist()])
    span = torch.arange(size, device=device)
    ys = torch.as_tensor(cells[:, 1] - by0, device=device)[:, None] + span
    xs = torch.as_tensor(cells[:, 0] - bx0, device=device)[:, None] + span
    return canvas[ys[:, :, None], xs[:, None, :]]


def _fit(tile: torch.Tensor, th: int, tw: int) -> torch.Tensor:
    """A tile whose stream is not the tile size (short edge tiles): padded with white, as tiles.py does."""
    out = torch.full((3, th, tw), 255, dtype=torch.uint8, device=tile.device)
    h, w = min(th, tile.shape[1]), min(tw, tile.shape[2])
    out[:, :h, :w] = tile[:3, :h, :w]
    return out


def _describe(signature: tuple) -> str:
    if not signature:
        return "no tiles"
    kind, _, sampling = signature
    return f"{_KIND_WORDS[kind]}, sampling {'/'.join(f'{h}x{v}' for h, v in sampling)}"


# -- checks against libjpeg-turbo ---------------------------------------------------------------------
_CHECKS: dict = {}  # (device, kind) or (device, signature) -> bool
_CHECKS_LOCK = threading.Lock()


def colour_difference(ours: np.ndarray, reference: np.ndarray) -> dict:
    """Max and per-channel mean absolute difference of two (h, w, 3) uint8 images."""
    diff = np.abs(ours.astype(np.int16) - reference.astype(np.int16))
    return {"max": int(diff.max()) if diff.size else 0,
            "mean": [round(float(m), 4) for m in diff.reshape(-1, 3).mean(axis=0)] if diff.size else [0.0] * 3}


def same_colours(ours: np.ndarray, reference: np.ndarray) -> bool:
    return ours.shape == reference.shape and max(colour_difference(ours, reference)["mean"]) <= SAME_COLOURS_MEAN


def _agrees(stream: bytes, device: torch.device) -> bool:
    """Does ``device``'s decoder give libjpeg-turbo's colours for this stream?"""
    reference = decode_jpeg_cpu(stream)
    try:
        ours = decode_streams([torch.frombuffer(bytearray(stream), dtype=torch.uint8)], device)[0]
    except (RuntimeError, ValueError) as exc:
        log.debug("the %s JPEG decoder refused a check stream: %s", device.type, exc)
        return False
    return same_colours(ours.permute(1, 2, 0).cpu().numpy(), reference)


def _checked(key: tuple, check) -> bool:
    with _CHECKS_LOCK:
        if key not in _CHECKS:
            _CHECKS[key] = bool(check())
        return _CHECKS[key]


def _checked_format(device: torch.device, signature: tuple, first: torch.Tensor) -> bool:
    """The first tile of each stream format seen on a device is decoded both ways; the verdict holds
    for the process."""
    def check() -> bool:
        agrees = _agrees(first.numpy().tobytes(), device)
        if not agrees:
            log.warning("the %s JPEG decoder does not decode %s tiles as libjpeg-turbo does; they are decoded "
                        "on the CPU", device.type, _describe(signature))
        return agrees

    return _checked((str(device), signature), check)


def probe_kinds(device: torch.device | str) -> frozenset:
    """The colour codings (:data:`KINDS`) that torchvision decodes on ``device`` as libjpeg-turbo does,
    checked once per process on small synthetic streams."""
    device = torch.device(device)
    try:
        streams = probe_streams()
    except Exception as exc:  # no encoder to make probes with: trust nothing
        log.warning("cannot make JPEG probe streams (%s)", exc)
        return frozenset()
    return frozenset(k for k, s in streams.items() if _checked((str(device), k), lambda s=s: _agrees(s, device)))


def probe_streams() -> dict[str, bytes]:
    """One stream per colour coding, shaped like slide tiles: YCbCr 4:2:0 as most TIFF writers make
    it, and RGB-coded as Aperio's tiles are after tiles.py splices the Adobe transform-0 marker in
    (component ids 0, 1, 2, which alone would say YCbCr)."""
    import imagecodecs

    image = probe_image()
    ycbcr = imagecodecs.jpeg8_encode(image, 90, colorspace="RGB", outcolorspace="YCbCr", subsampling="420")
    rgb = imagecodecs.jpeg8_encode(image, 90, colorspace="RGB", outcolorspace="RGB")
    rgb = _relabel_components(bytes(rgb), (0, 1, 2))
    header = jpeg_header(rgb)
    if header is None or header.adobe_transform != 0 or header.jfif:
        raise ValueError("the RGB-coded probe has no Adobe transform-0 marker")
    return {"ycbcr": bytes(ycbcr), "rgb": rgb}


def probe_image(size: int = 64) -> np.ndarray:
    """Stain-like colours: smooth gradients of pink and purple, with white glass in one corner."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / (size - 1)
    image = np.stack([230 - 90 * y, 120 + 60 * x - 40 * y, 200 - 30 * x + 20 * y], axis=-1)
    image[: size // 4, : size // 4] = 245
    return image.clip(0, 255).astype(np.uint8)


def _relabel_components(stream: bytes, ids: tuple) -> bytes:
    """The same stream with its frame's component ids (and the scans' selectors) replaced."""
    out = bytearray(stream)
    pos, mapping = 2, {}
    while pos + 4 <= len(out) and out[pos] == 0xFF:
        marker = out[pos + 1]
        length = int.from_bytes(out[pos + 2 : pos + 4], "big")
        seg = pos + 4
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            for i, new in enumerate(ids[: out[seg + 5]]):
                mapping[out[seg + 6 + 3 * i]] = new
                out[seg + 6 + 3 * i] = new
        elif marker == 0xDA:
            for i in range(out[seg]):
                out[seg + 1 + 2 * i] = mapping[out[seg + 1 + 2 * i]]
            break
        pos += 2 + length
    return bytes(out)


# -- what a slide's patches were decoded with -----------------------------------------------------------
@dataclass
class DecoderTally:
    """The decoders that produced one slide's patches (for its encoder attrs). The first region
    that fell back is logged, once per slide."""

    name: str
    patches: Counter = field(default_factory=Counter)
    fallbacks: Counter = field(default_factory=Counter)

    def add(self, decoder: str, count: int, fallback: str | None = None) -> None:
        self.patches[decoder] += count
        if fallback:
            if not self.fallbacks:
                log.warning("%s: %s; decoded with %s", self.name, fallback, decoder)
            self.fallbacks[fallback] += count

    @property
    def decoder(self) -> str:
        """The decoder of most of the slide's patches ("" before any)."""
        return self.patches.most_common(1)[0][0] if self.patches else ""

    def attrs(self) -> dict:
        return {"decoder": self.decoder, "decoders": dict(self.patches),
                **({"fallback": self.fallbacks.most_common(1)[0][0]} if self.fallbacks else {})}
