"""One error hierarchy. Each class says what went wrong; its message says what to do.

The CLI prints ``str(error)`` on one line and exits non-zero; nothing here is a bug.
"""

from __future__ import annotations


class WsiEmbedError(Exception):
    """Base class for every error caused by input, configuration or environment."""


class SlideNotFound(WsiEmbedError, FileNotFoundError):
    pass


class UnreadableSlide(WsiEmbedError, ValueError):
    """The file exists but is not a slide, or is truncated/corrupt."""


class MissingMpp(WsiEmbedError, ValueError):
    pass


class OutputNotWritable(WsiEmbedError, PermissionError):
    pass


class UnknownModel(WsiEmbedError, KeyError):
    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class WeightsUnavailable(WsiEmbedError, RuntimeError):
    """Published weights are neither cached nor downloadable."""


class WeightsMismatch(WsiEmbedError, ValueError):
    """A weights file does not fit the chosen architecture."""


class IncompleteStore(WsiEmbedError, ValueError):
    pass


class StoreConflict(WsiEmbedError, FileExistsError):
    """A store exists for this slide with other grid settings."""


class InvalidOption(WsiEmbedError, ValueError):
    pass
