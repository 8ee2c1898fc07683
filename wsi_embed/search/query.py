"""Queries: a slide, a cell of a slide, a PNG patch (embedded with the index's own encoder and
weights), or an embedding made elsewhere with the index's encoder."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from ..errors import EncoderMismatch, InvalidOption, InvalidQuery, WeightsMismatch
from ..store import enclosing_store, group_name
from .index import SearchIndex, open_index

log = logging.getLogger(__name__)


def parse_patch(text: str) -> tuple[str, int, int]:
    """``SLIDE_ID:ROW,COL`` -> (slide_id, row, col). The last ``:`` splits, so ids may hold one."""
    slide_id, sep, cell = str(text).rpartition(":")
    parts = cell.split(",")
    try:
        if not sep or not slide_id or len(parts) != 2:
            raise ValueError
        row, col = int(parts[0]), int(parts[1])
        if row < 0 or col < 0:
            raise ValueError
    except ValueError:
        raise InvalidQuery(f"--patch {text!r}: expected SLIDE_ID:ROW,COL with ROW and COL cell numbers "
                           "from 0 (e.g. --patch slide_01:12,40)") from None
    return slide_id, row, col


def search(index_dir: str | os.PathLike | SearchIndex, *, slide: str | None = None,
           patch: tuple[str, int, int] | str | None = None, image: str | os.PathLike | None = None,
           embedding: np.ndarray | None = None, encoder: str | None = None, top_k: int = 10,
           weights: str | None = None, montage: str | os.PathLike | None = None) -> dict:
    """The ``top_k`` nearest slides (``slide=``) or patches (``patch=(slide_id, row, col)`` or
    ``"ID:ROW,COL"``, ``image=PNG``, or ``embedding=`` a vector made with ``encoder``), as
    ``{"query": {...}, "hits": [{"slide_id", "row", "col", "x", "y", "distance"}, ...]}``, nearest
    first. Slide hits carry ``slide_id`` and ``distance`` only. The distance is the cosine distance,
    1 - cos, of L2-normalised embeddings. The query itself is never a hit; the other cells of its
    slide may be. ``weights`` overrides where an image query finds the encoder's weights (they must
    be the ones the stores were made with). ``montage`` draws the query beside its hits to a PNG."""
    given = [name for name, v in (("--slide", slide), ("--patch", patch), ("--image", image),
                                  ("embedding", embedding)) if v is not None]
    if len(given) != 1:
        raise InvalidQuery(f"give exactly one query: --slide ID, --patch ID:ROW,COL or --image PNG "
                           f"({'got ' + ', '.join(given) if given else 'none given'})")
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1:
        raise InvalidOption(f"--top-k must be a whole number of at least 1, got {top_k!r}")
    if montage is not None:
        check_montage_path(montage)
    index = index_dir if isinstance(index_dir, SearchIndex) else open_index(index_dir)
    changed = index.changed_slides()
    if changed:
        log.warning("%s: %d of its %d stores changed after it was built (%s%s); its hits are from the stores as "
                    "they were: rebuild it with wsi-embed index %s --encoder %s", index.path, len(changed),
                    len(index.slides), ", ".join(changed[:3]), ", ..." if len(changed) > 3 else "",
                    index.path.parent, index.encoder)
    picture = None
    if slide is not None:
        number = index.slide_number(str(slide))
        hits = [{"slide_id": index.slides[i]["slide_id"], "distance": d}
                for i, d in index.nearest_slides(index.slide_vectors[number], top_k, exclude=number)]
        result = {"query": {"kind": "slide", "slide_id": str(slide)}, "hits": hits}
    else:
        exclude = None
        if patch is not None:
            slide_id, row, col = parse_patch(patch) if isinstance(patch, str) else patch
            exclude = index.cell_number(str(slide_id), int(row), int(col))
            vector = index.patch_vector(exclude)
            query = {"kind": "patch", **index.patch(exclude)}
        elif image is not None:
            pixels = read_image(image)
            vector = embed_image(index, pixels, weights=weights)
            picture = pixels
            query = {"kind": "image", "image": str(image), "width": pixels.shape[1], "height": pixels.shape[0]}
        else:
            vector = check_embedding(index, embedding, encoder)
            query = {"kind": "embedding", "encoder": encoder}
        hits = [{**index.patch(i), "distance": d} for i, d in index.nearest_patches(vector, top_k, exclude)]
        result = {"query": query, "hits": hits}
    if montage is not None:
        from .montage import draw_montage

        draw_montage(index, result, Path(montage), query_image=picture)
    return result


def check_montage_path(path: str | os.PathLike) -> None:
    """``--montage`` must name a PNG file outside any store, before any work is done."""
    path = Path(path)
    if path.is_dir():
        raise InvalidOption(f"--montage {path}: is a folder; give a file name ending in .png")
    if path.suffix.lower() != ".png":
        raise InvalidOption(f"--montage {path}: the montage is a PNG picture; give a file name ending in .png")
    store = enclosing_store(path.parent)
    if store is not None:
        raise InvalidOption(f"--montage {path}: inside the store {store}; write the montage outside it")


def check_embedding(index: SearchIndex, embedding, encoder: str | None) -> np.ndarray:
    """A query vector made elsewhere: it must come from the index's encoder, with its dim."""
    if encoder is None or group_name(encoder) != index.manifest["group"]:
        raise EncoderMismatch(f"{index.path}: the query was embedded with {encoder or 'an unnamed encoder'}, "
                              f"this index holds {index.encoder}; embed the query with {index.encoder} "
                              "(and name it), or use that encoder's index")
    vector = np.asarray(embedding, dtype=np.float32).reshape(-1)
    if vector.shape[0] != index.dim or not np.isfinite(vector).all():
        raise EncoderMismatch(f"{index.path}: the query embedding has {vector.shape[0]} values"
                              f"{'' if np.isfinite(vector).all() else ' (not all finite)'}, "
                              f"{index.encoder} gives {index.dim}; embed it with {index.encoder}")
    norm = float(np.linalg.norm(vector))
    if norm == 0:
        raise InvalidQuery(f"{index.path}: the query embedding is all zeros: it has no direction, so every cell "
                           "is at distance 1 from it; check how it was made")
    return vector / norm


MAX_QUERY_PIXELS = 50_000_000  # a patch query is a few hundred px; a bigger picture is a slide region
MAX_QUERY_PATCHES = 8  # an image more than this many patches across is a region, not a patch


def read_image(path: str | os.PathLike) -> np.ndarray:
    """(h, w, 3) uint8 RGB of an image file; alpha is composited on white (the glass); 16-bit and
    float grey scaled to 8 bits (PIL would clip it to white)."""
    import warnings

    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise InvalidQuery(f"{path}: no such image; give the path of a PNG patch")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                if im.width * im.height > MAX_QUERY_PIXELS:
                    raise InvalidQuery(f"{path}: {im.width} x {im.height} px is a slide region, not a patch; "
                                       "crop the patch you mean (a few hundred px) and search with that")
                im.load()
                return _to_rgb(im)
    except InvalidQuery:
        raise
    except Image.DecompressionBombError:
        raise InvalidQuery(f"{path}: too large to be a patch; crop the patch you mean and search with that") from None
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise InvalidQuery(f"{path}: not a readable image ({type(exc).__name__}); give a PNG patch") from None


def _to_rgb(im) -> np.ndarray:
    from PIL import Image

    if im.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        grey = np.asarray(im, dtype=np.float64)
        top = 65535.0 if im.mode.startswith("I;16") or grey.max() > 255 else 255.0
        if im.mode == "F" and grey.max() <= 1.0:
            top = 1.0
        grey = np.clip(np.rint(grey * (255.0 / top)), 0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=-1)
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        im = Image.alpha_composite(white, rgba)
    return np.asarray(im.convert("RGB"), dtype=np.uint8)


def _weights_spec(enc: dict, weights: str | None) -> str:
    if weights:
        return weights
    if enc.get("weights_random"):
        return "random"  # seeded: the same random weights as the stores'
    path = enc.get("weights_path")
    if path and Path(path).is_file():
        return str(path)
    return "auto"


def load_index_encoder(index: SearchIndex, weights: str | None = None):
    """The index's encoder with the weights its stores were made with, or :class:`WeightsMismatch`."""
    from ..encoders import load_encoder

    enc = index.manifest["encoder_attrs"]
    encoder = load_encoder(index.encoder, _weights_spec(enc, weights))
    have = encoder.weights
    if bool(enc.get("weights_random")) != have.random:
        made = "random weights" if enc.get("weights_random") else "real weights"
        raise WeightsMismatch(f"{index.path}: its stores were embedded with {made} of {index.encoder}, the "
                              f"weights found are {'random' if have.random else have.path}; pass --weights "
                              "with the weights the stores were made with")
    recorded = enc.get("weights_sha256")
    if not have.random and (recorded is None or recorded != have.sha256):
        raise WeightsMismatch(
            f"{index.path}: its stores were embedded with {index.encoder} weights sha256 "
            f"{str(recorded)[:12]}, the weights found ({have.path or have.spec}) have sha256 {str(have.sha256)[:12]}; "
            "pass --weights with the file the stores were made with")
    return encoder


def embed_image(index: SearchIndex, pixels: np.ndarray, *, weights: str | None = None) -> np.ndarray:
    """Embed an RGB patch as ``wsi-embed embed`` embeds a cell: the image stands for one patch at the
    index's resolution, so it is resized (antialiased) to the stores' patch size when it differs,
    then goes through the encoder runner (resize to the encoder's input, its mean/std), on the CPU in
    fp32. Returns the L2-normalised vector."""
    import torch
    import torch.nn.functional as F

    from ..infer import EncoderRunner

    patch_px = int(index.manifest["grid"]["patch_px"])
    h, w = pixels.shape[:2]
    mpp = index.manifest["grid"].get("target_mpp")
    at = f" at {mpp:g} µm/px" if mpp else ""
    if min(h, w) > MAX_QUERY_PATCHES * patch_px:  # a region or a whole slide, not a patch
        raise InvalidQuery(f"the image is {w} x {h} px, more than {MAX_QUERY_PATCHES} patches across; a query image "
                           f"stands for one {patch_px} px patch{at}: crop the patch you mean (a whole slide is "
                           "searched with --slide once it is embedded and indexed)")
    enc = index.manifest["encoder_attrs"]
    encoder = load_index_encoder(index, weights)
    if [round(v, 8) for v in encoder.config.mean] != [round(v, 8) for v in enc.get("mean", encoder.config.mean)] \
            or [round(v, 8) for v in encoder.config.std] != [round(v, 8) for v in enc.get("std", encoder.config.std)]:
        raise WeightsMismatch(f"{index.path}: {index.encoder} now normalises with mean/std {encoder.config.mean}/"
                              f"{encoder.config.std}, the stores used {enc.get('mean')}/{enc.get('std')}; "
                              "rebuild the stores with this version, or search with the version that made them")
    read_px = max([patch_px] + [int(s.get("read_px") or 0) for s in index.slides])  # a cut at grid.read_px is exact
    if min(h, w) > 2 * read_px:
        log.warning("%s: the image is %d x %d px, over twice a %d px patch%s; it is shrunk to one patch, so its "
                    "hits follow the whole picture, not its detail", index.path, w, h, patch_px, at)
    if max(h, w) > 1.15 * min(h, w):
        log.warning("%s: the image is %d x %d px, not square; it is stretched to a %d px patch",
                    index.path, w, h, patch_px)
    if min(h, w) < patch_px / 2:
        log.warning("%s: the image is %d x %d px, under half a patch; it is enlarged %.0fx to %d px, so its hits "
                    "follow that blur more than its tissue: crop a %d px patch%s instead",
                    index.path, w, h, patch_px / min(h, w), patch_px, patch_px, at)
    x = torch.from_numpy(np.array(pixels, dtype=np.uint8, copy=True))[None]  # torch wants it writable
    if (h, w) != (patch_px, patch_px):
        x = F.interpolate(x.permute(0, 3, 1, 2).float(), size=(patch_px, patch_px), mode="bilinear",
                          antialias=True, align_corners=False)
        x = x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()  # a patch is uint8
    runner = EncoderRunner(encoder, torch.device("cpu"), "fp32")
    vector = runner(x)[0].numpy().astype(np.float32)
    norm = float(np.linalg.norm(vector))
    return vector / norm if norm > 0 else vector


def format_table(result: dict) -> str:
    """The result as a readable table, for the terminal."""
    q = result["query"]
    if q["kind"] == "slide":
        head = f"query: slide {q['slide_id']}"
    elif q["kind"] == "patch":
        head = f"query: patch {q['slide_id']} row {q['row']} col {q['col']} (level-0 x {q['x']}, y {q['y']})"
    elif q["kind"] == "image":
        head = f"query: image {q['image']} ({q['width']} x {q['height']} px)"
    else:
        head = f"query: embedding ({q.get('encoder')})"
    lines = [head + "; distance = 1 - cosine similarity"]
    hits = result["hits"]
    width = max([len("slide_id")] + [len(h["slide_id"]) for h in hits])
    if q["kind"] == "slide":
        lines.append(f"{'rank':>4}  {'slide_id':<{width}}  {'distance':>8}")
        lines += [f"{i:>4}  {h['slide_id']:<{width}}  {h['distance']:>8.4f}" for i, h in enumerate(hits, 1)]
    else:
        lines.append(f"{'rank':>4}  {'slide_id':<{width}}  {'row':>5}  {'col':>5}  {'x':>7}  {'y':>7}  {'distance':>8}")
        lines += [f"{i:>4}  {h['slide_id']:<{width}}  {h['row']:>5}  {h['col']:>5}  {h['x']:>7}  {h['y']:>7}  "
                  f"{h['distance']:>8.4f}" for i, h in enumerate(hits, 1)]
    if not hits:
        lines.append("(no hits: the index holds nothing else)")
    return "\n".join(lines)
