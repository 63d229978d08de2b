"""Named exceptions for everything a user can get wrong.

Every message says what was wrong, which item, the limit, and the knob that changes it.
`InvalidInputError` (and subclasses) map to HTTP 400 on the server; they are ValueErrors so
callers that already catch ValueError keep working.
"""

from __future__ import annotations


class GlimpseError(Exception):
    """Base class of glimpse's own errors."""


class InvalidInputError(GlimpseError, ValueError):
    """A request, prompt or media item that glimpse refuses (HTTP 400)."""


class MediaError(InvalidInputError):
    """Media bytes that cannot be read: corrupt, truncated, unsupported format, bad base64."""


class MediaTooLargeError(InvalidInputError):
    """Media over a size ceiling (bytes, pixels, frames) before or after decoding."""


class VideoSamplingError(InvalidInputError):
    """A video whose metadata or length makes frame sampling impossible (fps 0, no frames, ...)."""


class LimitExceededError(InvalidInputError):
    """A per-request setting outside the operator's ceilings, or too many media items."""


class PromptError(InvalidInputError):
    """Placeholders and media do not match, or the prompt is too long for the model."""


class CheckpointError(GlimpseError):
    """A checkpoint folder that cannot be loaded: missing, unexpected, truncated or corrupt tensors."""


class DecodeBusyError(GlimpseError):
    """The server's decoding budget (--max-decoding-pixels) is taken and its waiting line is full (HTTP 429)."""


class PreprocessCancelled(GlimpseError):
    """Preprocessing stopped because its request was cancelled (client gone, request aborted)."""


class RankDiedError(GlimpseError):
    """A tensor-parallel rank (worker process) stopped: the engine cannot run another step."""
