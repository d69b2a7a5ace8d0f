"""Typed errors of the backend. Each maps to one protocol error code (docs/protocol.md).

They subclass the matching builtin too, so callers may catch ``ValueError`` or ``OSError``.
"""

from __future__ import annotations

from typing import Any

from unigeoseg_protocol.errors import ErrorCode, ProtocolError


class UniGeoSegError(ProtocolError):
    """Root of the backend's errors; ``code`` says which protocol error it becomes."""

    code: ErrorCode = ErrorCode.INTERNAL

    def __init__(self, message: str, details: dict[str, Any] | None = None):
        super().__init__(type(self).code, message, details)


class InvalidInputError(UniGeoSegError, ValueError):
    code = ErrorCode.INVALID_ARGUMENT


class BadFrameError(UniGeoSegError, ValueError):
    code = ErrorCode.BAD_FRAME


class CRSError(UniGeoSegError, ValueError):
    code = ErrorCode.UNKNOWN_CRS


class OutOfBoundsError(UniGeoSegError, ValueError):
    code = ErrorCode.OUT_OF_BOUNDS


class EmptyPromptError(UniGeoSegError, ValueError):
    code = ErrorCode.EMPTY_PROMPT


class NoValidPixelsError(UniGeoSegError, ValueError):
    code = ErrorCode.NO_VALID_PIXELS


class UnknownImageError(UniGeoSegError, KeyError):
    code = ErrorCode.UNKNOWN_IMAGE

    def __str__(self) -> str:  # KeyError would quote the message
        return self.message


class EngineUnavailableError(UniGeoSegError, RuntimeError):
    code = ErrorCode.ENGINE_UNAVAILABLE


class CancelledError(UniGeoSegError):
    code = ErrorCode.CANCELLED


class DeadlineExceededError(UniGeoSegError, TimeoutError):
    code = ErrorCode.TIMEOUT


class WeightsError(UniGeoSegError, OSError):
    """A checkpoint could not be downloaded, verified or loaded."""

    code = ErrorCode.ENGINE_UNAVAILABLE
