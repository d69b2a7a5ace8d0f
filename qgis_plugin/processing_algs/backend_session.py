"""One backend connection for one Processing run: a blocking protocol ``Client`` on the
algorithm's thread, whose waits honour the Cancel button, with readable errors.

pyzmq and the ``Client`` are imported only when an algorithm runs, so the provider loads (and
lists its algorithms) in a QGIS without pyzmq; running one then fails with a
QgsProcessingException that says how to install it.
"""

from __future__ import annotations

import time
from typing import TypeVar

from qgis.core import QgsProcessingException

from ..core.raster_window import RasterTile
from ..unigeoseg_protocol.errors import ErrorCode, RemoteError, RequestTimeout
from ..unigeoseg_protocol.operations import (
    CancelRequest,
    HelloReply,
    HelloRequest,
    Request,
    SegmentReply,
    SegmentRequest,
    SetImageRequest,
)
from ..unigeoseg_protocol.params import Prompt, SegmentOptions

ReplyT = TypeVar("ReplyT")

#: Seconds to wait for the backend's answer to ``hello`` before saying there is none.
HELLO_TIMEOUT_S = 3.0
#: Seconds between two checks of the cancel button while a request runs.
POLL_S = 0.1
#: Extra seconds to wait past a request's own deadline (the backend answers ``timeout``).
GRACE_S = 5.0
#: Errors that concern one point or tile only: it is reported and skipped.
SKIPPABLE_CODES = {ErrorCode.OUT_OF_BOUNDS.value, ErrorCode.NO_VALID_PIXELS.value,
                   ErrorCode.EMPTY_PROMPT.value}

PYZMQ_MISSING = (
    "UniGeoSeg needs the Python package pyzmq in QGIS's own Python to talk to its backend, and "
    "it is not installed ({error}). Install it, then restart QGIS: on Debian/Ubuntu `sudo apt "
    "install python3-zmq`; on Windows, in the OSGeo4W Shell, `python -m pip install pyzmq`; on "
    "macOS `/Applications/QGIS.app/Contents/MacOS/bin/python3 -m pip install pyzmq`; or let the "
    "UniGeoSeg panel install it into a plugin-private folder.")

def load_client_class():
    """The protocol ``Client`` class, or a QgsProcessingException when pyzmq is missing."""
    try:
        import zmq  # noqa: F401
    except ImportError as exc:
        raise QgsProcessingException(PYZMQ_MISSING.format(error=exc)) from exc
    from ..unigeoseg_protocol.client import Client

    return Client


class Cancelled(Exception):
    """The analyst pressed Cancel while waiting for the backend."""


def remote_error_message(exc: RemoteError, address: str) -> str:
    """A sentence for an ``ok: false`` reply, with what to do about the common ones."""
    code = str(exc.code)
    hints = {
        ErrorCode.ENGINE_UNAVAILABLE.value: "",
        ErrorCode.PAYLOAD_TOO_LARGE.value: " Use a smaller tile size.",
        ErrorCode.QUEUE_FULL.value: " The backend is busy: try again in a moment.",
        ErrorCode.TIMEOUT.value: " Raise the request timeout in the UniGeoSeg settings, use a "
                                 "smaller tile size, or a backend with a GPU.",
        ErrorCode.SHUTTING_DOWN.value: " Start it again with `unigeoseg serve`.",
        ErrorCode.INTERNAL.value: " The backend's log has the details.",
    }
    return f"The backend at {address} refused the request ({code}): {exc.message}" \
           f"{hints.get(code, '')}"


class BackendSession:
    """One connection to the backend for one algorithm run.

    Every wait is a series of short waits, so that the Cancel button is honoured within
    :data:`POLL_S`; a cancelled request is cancelled on the backend too (``cancel`` op).
    """

    def __init__(self, address: str, feedback, timeout_s: float, curve=None):
        self.address = address
        self.feedback = feedback
        self.timeout_s = timeout_s
        client_class = load_client_class()
        try:
            self.client = client_class(address, timeout_s=timeout_s, curve=curve)
        except Exception as exc:  # noqa: BLE001 - zmq.ZMQError for a malformed address
            raise QgsProcessingException(
                f"Invalid backend address {address!r} ({exc}): use e.g. "
                f"tcp://127.0.0.1:5557") from exc

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> BackendSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _cancel_on_backend(self, request_id: str) -> None:
        try:
            self.client.send(CancelRequest.OP, *CancelRequest(request_id).to_wire(),
                             timeout_s=1.0)
        except Exception:  # noqa: BLE001 - best effort: the socket is closed next
            pass

    def request(self, request: Request[ReplyT], timeout_s: float | None = None) -> ReplyT:
        """Send a typed request and wait for its typed reply.

        Raises:
            Cancelled: the feedback was cancelled (the backend was told to cancel too).
            RequestTimeout: no reply within ``timeout_s`` plus a grace period.
            RemoteError: the backend answered with an error.
        """
        timeout = self.timeout_s if timeout_s is None else timeout_s
        request_id = self.client.send(request.OP, *request.to_wire(), timeout_s=timeout)
        grace = GRACE_S if request.OP in (SetImageRequest.OP, SegmentRequest.OP) else 0.0
        deadline = time.monotonic() + timeout + grace

        def on_progress(done: int, total: int, message: str) -> None:
            self.feedback.pushDebugInfo(f"backend: {message} ({done}/{total})")

        while True:
            if self.feedback.isCanceled():
                self._cancel_on_backend(request_id)
                raise Cancelled(request_id)
            wait = min(POLL_S, max(deadline - time.monotonic(), 0.0))
            try:
                reply = self.client.receive(request_id, timeout_s=wait,
                                            on_progress=on_progress)
            except RequestTimeout:
                if time.monotonic() >= deadline:
                    self._cancel_on_backend(request_id)
                    raise RequestTimeout(f"no reply from {self.address} within {timeout:.0f} s",
                                         request_id=request_id) from None
            else:
                return request.parse_reply(reply)

    def hello(self) -> HelloReply:
        """The backend's ``hello``; QgsProcessingException when nobody answers."""
        try:
            return self.request(HelloRequest(), timeout_s=HELLO_TIMEOUT_S)
        except RequestTimeout as exc:
            raise QgsProcessingException(
                f"No backend at {self.address}: start it with `unigeoseg serve` (or from the "
                f"UniGeoSeg plugin), or set the right backend address. It did not answer within "
                f"{HELLO_TIMEOUT_S:.0f} s.") from exc
        except RemoteError as exc:
            raise QgsProcessingException(remote_error_message(exc, self.address)) from exc

    def segment(self, tile: RasterTile, prompt: Prompt,
                options: SegmentOptions) -> SegmentReply:
        """Segment one raster tile inline (pixels + georeference).

        The backend hashes the pixels, so a tile sent again reuses its cached embedding.
        """
        try:
            return self.request(SegmentRequest(prompt, options, pixels=tile.pixels,
                                               georeference=tile.georeference,
                                               raster=tile.raster))
        except RequestTimeout as exc:
            raise QgsProcessingException(
                f"The backend at {self.address} did not answer within {self.timeout_s:.0f} s: "
                f"raise the request timeout in the UniGeoSeg settings, use a smaller tile "
                f"size, or check that the backend still runs.") from exc


