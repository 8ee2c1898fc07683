"""What a run is asked to do and what it reports: options, slide jobs and results.

Plain data without torch, so drivers, ``info`` and ``models`` stay quick to import.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from .artefacts import BLANK_THRESHOLD, BLUR_THRESHOLD
from .errors import InvalidOption
from .grid import GridSpec
from .locks import DEFAULT_STALE_AFTER, HEARTBEAT_EVERY, MIN_STALE_AFTER
from .slide import BACKENDS
from .tissue import TissueParams

MAX_WORKERS = 128  # processes per run: more than any node's cores; their shared slots must still be mapped

EMBEDDING_DTYPES = ("float16", "float32")
DECODE_MODES = ("auto", "cpu", "gpu")
DEFAULT_MAX_CELLS = 2_000_000  # more than a whole 40x resection at 0.5 µm/px and 224 px

Status = Literal["done", "skipped", "failed"]


@dataclass(frozen=True)
class EmbedOptions:
    grid: GridSpec = field(default_factory=GridSpec)
    min_tissue: float = 0.25
    tissue: TissueParams = field(default_factory=TissueParams)
    backend: str = "auto"
    dtype: str = "float16"
    block: int | None = None  # cells per region side (and Zarr chunk side); None: tile-aligned
    max_patches: int | None = None  # embed only the first N tissue cells (benchmarks)
    max_cells: int = DEFAULT_MAX_CELLS  # refuse slides whose grid claims more cells than this
    workers: int | None = None  # None: see loader.default_workers
    decode: str = "auto"  # JPEG tiles: auto (the GPU's decoder on CUDA), cpu, gpu
    prepare_processes: int | None = None  # slides planned in processes; None: see planner.default_prepare_processes
    batch_size: int = 64
    device: str = "auto"
    precision: str = "auto"
    compile: bool = False
    overwrite: bool = False
    verify: bool = False  # check the embeddings of complete stores before skipping them
    qc: bool = True
    lock_stale_after: float = DEFAULT_STALE_AFTER  # s before another host's unrefreshed lock is stale
    # tissue you can trust (wsi_embed.masks, wsi_embed.artefacts); a SlideJob's own paths win
    tissue_mask: str | None = None  # binary PNG/TIFF, or a folder of <slide_id>.png|.tif|.tiff
    annotations: str | None = None  # GeoJSON, or a folder of <slide_id>.geojson|.json
    annotation_classes: tuple[str, ...] | None = None  # keep only these classes (any case)
    drop_blank: bool = False
    drop_blurry: bool = False
    blank_threshold: float = BLANK_THRESHOLD  # grey-level std (0-255) under which a cell is blank
    blur_threshold: float = BLUR_THRESHOLD  # Laplacian variance under which a cell is blurry

    def __post_init__(self) -> None:
        if not 0.0 <= self.min_tissue <= 1.0:
            raise InvalidOption(f"--min-tissue must be between 0 and 1, got {self.min_tissue}")
        if self.dtype not in EMBEDDING_DTYPES:
            raise InvalidOption(f"--dtype must be one of {', '.join(EMBEDDING_DTYPES)}, got {self.dtype}")
        if self.batch_size < 1:
            raise InvalidOption(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.prepare_processes is not None and not 0 <= self.prepare_processes <= MAX_WORKERS:
            raise InvalidOption(f"--prepare-processes must be between 0 and {MAX_WORKERS}, got {self.prepare_processes}")
        if self.workers is not None and not 0 <= self.workers <= MAX_WORKERS:
            raise InvalidOption(f"--workers must be between 0 and {MAX_WORKERS}, got {self.workers} "
                                "(a loader process per core is the most that helps)")
        if self.backend not in BACKENDS:
            raise InvalidOption(f"unknown --backend {self.backend!r}; use one of {', '.join(BACKENDS)}")
        if not self.lock_stale_after > 0:
            raise InvalidOption(f"--lock-stale-after must be a positive number of seconds, got {self.lock_stale_after}")
        if self.lock_stale_after < MIN_STALE_AFTER:
            raise InvalidOption(f"--lock-stale-after {self.lock_stale_after:g} is under {MIN_STALE_AFTER:g} s: "
                                f"a running process refreshes its locks about every {HEARTBEAT_EVERY:g} s (less "
                                "often while it plans a large slide), so another host would take its live slides over")
        if self.decode not in DECODE_MODES:
            raise InvalidOption(f"unknown --decode {self.decode!r}; use one of {', '.join(DECODE_MODES)}")
        if self.max_cells < 1:
            raise InvalidOption(f"--max-cells must be at least 1, got {self.max_cells}")
        if not self.blank_threshold >= 0 or not self.blur_threshold >= 0:
            raise InvalidOption(f"--blank-threshold and --blur-threshold must be >= 0, got "
                                f"{self.blank_threshold} and {self.blur_threshold}")
        if self.annotation_classes is not None and not [c for c in self.annotation_classes if c.strip()]:
            raise InvalidOption("--annotation-classes names no class; give e.g. tumor,stroma")
        for flag, path in (("--tissue-mask", self.tissue_mask), ("--annotations", self.annotations)):
            if path is not None and not Path(path).exists():
                raise InvalidOption(f"{flag} {path}: no such file or folder; check the path")


@dataclass(frozen=True)
class SlideJob:
    path: Path
    slide_id: str
    slide_mpp: float | None = None  # overrides the file's resolution when given
    tissue_mask: Path | None = None  # this slide's mask (--list column tissue_mask); wins over --tissue-mask
    annotations: Path | None = None  # this slide's GeoJSON (--list column annotations)

    def __post_init__(self) -> None:  # str paths from Python callers work like the CLI's
        for name in ("path", "tissue_mask", "annotations"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, Path):
                object.__setattr__(self, name, Path(value))


@dataclass
class SlideResult:
    path: str
    slide_id: str
    status: Status
    error: str | None = None
    cells: int = 0
    seconds: float = 0.0
    encoders: list[str] = field(default_factory=list)
    store: str | None = None
    qc: str | None = None
    note: str | None = None  # why a slide was skipped ("complete", "locked by host:pid"), or what was redone

    def to_dict(self) -> dict:
        return asdict(self)


def slide_id_for(path: Path) -> str:
    name = Path(path).name
    for suffix in (".ome.tiff", ".ome.tif"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def check_models(names: list[str], weights: str | None = None) -> None:
    """Raise UnknownModel for a name that is neither registered nor a timm model (nor one of its
    pretrained tags), and InvalidOption for one weights file or URL given to several models, before
    any work."""
    from .encoders.registry import get_config
    from .errors import UnknownModel

    if len(set(names)) < len(names):
        raise InvalidOption("the same model is named twice in --model")
    spec = str(weights or "").strip()
    if len(names) > 1 and spec.lower() not in ("", "auto", "random"):
        raise InvalidOption(f"--weights {spec}: one weights file for {len(names)} models ({', '.join(names)}) would "
                            "be loaded into each of them; embed each model in its own run with its own --weights")
    for name in names:
        if not name.startswith("timm:"):
            get_config(name)
            continue
        import timm

        tname = name[len("timm:"):]
        if not timm.is_model(tname):
            raise UnknownModel(f"--model {name}: timm has no model {tname!r}; see timm.list_models() for the names")
        arch, _, tag = tname.partition(".")
        if tag and tname not in timm.list_pretrained(tname):
            tags = ", ".join(t.partition(".")[2] for t in timm.list_pretrained(f"{arch}.*")[:8]) or "none"
            raise UnknownModel(f"--model {name}: timm has no pretrained tag {tag!r} for {arch} (its tags: {tags})")


def model_name(model) -> str:
    """The registry name of a model given by name or as a loaded encoder."""
    from .encoders.registry import get_config

    if isinstance(model, str):
        return model if model.startswith("timm:") else get_config(model).name
    return model.config.name
