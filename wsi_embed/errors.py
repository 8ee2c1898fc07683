"""One error hierarchy. Each class says what went wrong; its message says what to do.

The CLI prints ``str(error)`` on one line and exits non-zero; nothing here is a bug.
:class:`RunWideError` subclasses concern every slide of a run (weights, device, options, the output
folder): they stop the run. Every other error fails one slide and the cohort goes on.
"""

from __future__ import annotations


class WsiEmbedError(Exception):
    """Base class for every error caused by input, configuration or environment."""


class RunWideError(WsiEmbedError):
    """A problem every slide would meet: the run stops instead of failing each slide."""


class SlideNotFound(WsiEmbedError, FileNotFoundError):
    pass


class UnreadableSlide(WsiEmbedError, ValueError):
    """The file exists but is not a slide, or is truncated/corrupt."""


class UnsupportedSlide(UnreadableSlide):
    """A valid file whose compression, pixel format or size this tool does not handle."""


class SlideOutOfLimits(WsiEmbedError, ValueError):
    """The slide claims a size, resolution or tile size that makes no physical sense."""


class SlideChanged(WsiEmbedError, RuntimeError):
    """The slide file changed while it was being embedded."""


class MissingMpp(WsiEmbedError, ValueError):
    pass


class OutputNotWritable(RunWideError, PermissionError):
    pass


class UnknownModel(RunWideError, KeyError):
    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class WeightsUnavailable(RunWideError, RuntimeError):
    """Published weights are neither cached nor downloadable."""


class WeightsMismatch(RunWideError, ValueError):
    """A weights file does not fit the chosen architecture."""


class InvalidOption(RunWideError, ValueError):
    pass


class IncompleteStore(WsiEmbedError, ValueError):
    pass


class CorruptStore(WsiEmbedError, ValueError):
    """A store whose metadata or chunks are damaged (checksum, missing file, wrong values)."""


class StoreConflict(WsiEmbedError, FileExistsError):
    """A store exists for this slide with other grid settings, or for another slide file."""


class LockLost(WsiEmbedError, RuntimeError):
    """Another process took over this slide's lock (we were judged dead); our work is discarded."""


class StoreWriteError(WsiEmbedError, OSError):
    """A slide's store or picture could not be written (full disk, quota, name too long)."""


def store_write_error(slide, store, exc: OSError) -> StoreWriteError:
    """One line for a store that cannot be written (full disk, quota, permissions): the slide file
    and the store it was writing."""
    return StoreWriteError(f"{slide}: cannot write its store {store} ({exc.strerror or exc}); "
                           "check free space and permissions, then rerun")


class LabelsError(WsiEmbedError, ValueError):
    """A labels table that cannot be used: a missing column, one class, a patient in two folds."""


class EncoderMismatch(WsiEmbedError, ValueError):
    """Stores whose embeddings cannot go together: one lacks the encoder, or dims differ."""


class IndexNotFound(WsiEmbedError, FileNotFoundError):
    """No search index (``index-<encoder>/index.json``) where one was named; wsi-embed index builds it."""


class InvalidQuery(WsiEmbedError, ValueError):
    """A search query that is malformed or names no indexed slide or embedded cell."""


class BadMask(WsiEmbedError, ValueError):
    """A user tissue mask or annotation file that cannot be used for its slide (unreadable, wrong
    aspect ratio, empty polygon, coordinates outside the slide); only that slide fails."""


class MaskNotFound(BadMask, FileNotFoundError):
    """A tissue mask or annotation file (or a folder's ``<slide_id>`` file) that is not there."""
