"""Error codes shared by the backend and its clients (docs/protocol.md lists them)."""

from __future__ import annotations

from enum import Enum
from typing import Any


class ErrorCode(str, Enum):
    """The ``error.code`` of a failed reply. Values are stable strings on the wire."""

    BAD_MESSAGE = "bad_message"                #: header is not JSON, or lacks v / id / op
    UNSUPPORTED_VERSION = "unsupported_version"  #: another protocol version
    UNKNOWN_OP = "unknown_op"                  #: op is not one of OPS (operations.py)
    INVALID_ARGUMENT = "invalid_argument"      #: a parameter has the wrong type or value
    BAD_FRAME = "bad_frame"                    #: array frame missing, or wrong dtype / shape / size
    PAYLOAD_TOO_LARGE = "payload_too_large"    #: message over the backend's byte cap
    UNKNOWN_CRS = "unknown_crs"                #: CRS text that PROJ cannot resolve
    OUT_OF_BOUNDS = "out_of_bounds"            #: a prompt lies outside the tile
    EMPTY_PROMPT = "empty_prompt"              #: no points, no box and no text
    NO_VALID_PIXELS = "no_valid_pixels"        #: every pixel is nodata or NaN
    UNKNOWN_IMAGE = "unknown_image"            #: image id not (or no longer) cached
    ENGINE_UNAVAILABLE = "engine_unavailable"  #: engine not installed, no weights, or wrong task
    UNKNOWN_JOB = "unknown_job"                #: no training job (or upload) of that id
    QUEUE_FULL = "queue_full"                  #: too many requests waiting; retry later
    TIMEOUT = "timeout"                        #: the request ran past its deadline
    CANCELLED = "cancelled"                    #: a cancel request stopped it
    SHUTTING_DOWN = "shutting_down"            #: the backend is stopping
    INTERNAL = "internal"                      #: a bug; the backend log has the traceback

    # Raised by clients, never sent by a backend (with TIMEOUT, CANCELLED and INVALID_ARGUMENT,
    # which clients raise too: a local deadline, a local cancel, params that cannot be encoded).
    CLOSED = "closed"                          #: the client was closed, or never opened
    BACKEND_LOST = "backend_lost"              #: the backend stopped answering or went away
    SEND_FAILED = "send_failed"                #: the request could not be queued for sending

    def __str__(self) -> str:
        return self.value


class ProtocolError(Exception):
    """An error that becomes an ``ok: false`` reply (backend) or is raised by the client.

    Attributes:
        code: an ErrorCode (or the raw code string a newer peer sent).
        message: a sentence an analyst can read.
        details: optional machine-readable context.
        request_id: the id of the request it answers, when known.
    """

    def __init__(self, code: ErrorCode | str, message: str, details: dict[str, Any] | None = None,
                 request_id: str | None = None):
        super().__init__(f"[{code}] {message}")
        self.code = code
        self.message = message
        self.details = details or {}
        self.request_id = request_id


class RemoteError(ProtocolError):
    """Raised by the client when the backend answered ``ok: false``."""


class RequestTimeout(ProtocolError, TimeoutError):
    """Raised by the client when no final reply arrived in time."""

    def __init__(self, message: str, request_id: str | None = None):
        super().__init__(ErrorCode.TIMEOUT, message, request_id=request_id)
