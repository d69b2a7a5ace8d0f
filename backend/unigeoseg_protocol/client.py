"""A small blocking client for the backend (DEALER socket), used by the CLI, tests and scripts.

The QGIS plugin's connection drives a non-blocking socket from Qt's event loop instead; both are
transport only: requests and replies are the types of ``operations.py``; every received message
is read once, by ``operations.read_reply``, and the typed reply parses from that ``Reply``.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import zmq
from numpy.typing import NDArray

from .curve import CurveClientKeys
from .errors import ProtocolError, RequestTimeout
from .messages import (
    DEFAULT_MAX_MESSAGE_BYTES,
    Message,
    decode_message,
    encode_message,
    request_header,
)
from .operations import (
    CancelReply,
    CancelRequest,
    HelloReply,
    HelloRequest,
    Reply,
    Request,
    SegmentReply,
    SegmentRequest,
    SetImageReply,
    SetImageRequest,
    ShutdownReply,
    ShutdownRequest,
    StatusReply,
    StatusRequest,
    read_reply,
)
from .params import Georeference, Prompt, RasterOptions, SegmentOptions

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_ADDRESS", "Client", "CurveClientKeys", "ProgressCallback", "new_request_id"]

DEFAULT_ADDRESS = "tcp://127.0.0.1:5557"

ProgressCallback = Callable[[int, int, str], None]

ReplyT = TypeVar("ReplyT")


def new_request_id() -> str:
    return uuid.uuid4().hex


class Client:
    """Blocking request/reply over a DEALER socket.

    Args:
        address: backend endpoint, e.g. ``tcp://127.0.0.1:5557``.
        timeout_s: default time to wait for a final reply.
        curve: keys for a backend that requires CURVE authentication.
        max_reply_bytes: replies larger than this are rejected.
    """

    def __init__(self, address: str = DEFAULT_ADDRESS, timeout_s: float = 60.0,
                 curve: CurveClientKeys | None = None,
                 max_reply_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 context: zmq.Context[Any] | None = None):
        self.address = address
        self.timeout_s = timeout_s
        self.max_reply_bytes = max_reply_bytes
        self._context = context or zmq.Context.instance()
        self._curve = curve
        self._socket = self._open_socket()
        # Messages for requests sent by this client but not yet received, read while waiting
        # for another request (several requests may be in flight on one socket).
        self._outstanding: set[str] = set()
        self._inbox: dict[str, list[Message]] = {}

    def _open_socket(self) -> zmq.Socket[bytes]:
        sock: zmq.Socket[bytes] = self._context.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        if self._curve is not None:
            sock.curve_serverkey = self._curve.server_public
            sock.curve_publickey = self._curve.public
            sock.curve_secretkey = self._curve.secret
        sock.connect(self.address)
        return sock

    def close(self) -> None:
        self._socket.close(linger=0)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ generic request

    def send(self, op: str, params: Mapping[str, Any] | None = None,
             arrays: Mapping[str, NDArray[Any]] | None = None, timeout_s: float | None = None,
             request_id: str | None = None) -> str:
        """Send a request without waiting; returns its id (see :meth:`receive`)."""
        request_id = request_id or new_request_id()
        timeout = self.timeout_s if timeout_s is None else timeout_s
        header = request_header(op, request_id, params, timeout_ms=int(timeout * 1000))
        # A DEALER with no connected peer (backend down, CURVE handshake refused) blocks on
        # send: wait for it to become writable within the timeout instead of hanging.
        if not self._socket.poll(int(timeout * 1000), zmq.POLLOUT):
            raise RequestTimeout(f"could not send to {self.address} within {timeout:.1f} s: is "
                                 f"the backend running (and are the CURVE keys right)?",
                                 request_id=request_id)
        self._socket.send_multipart(encode_message(header, arrays), flags=zmq.NOBLOCK,
                                    copy=False)
        self._outstanding.add(request_id)
        return request_id

    def receive(self, request_id: str, timeout_s: float | None = None,
                on_progress: ProgressCallback | None = None) -> Reply:
        """Wait for the final ``ok`` reply to ``request_id`` (read: pass it to a request's
        ``parse_reply``); progress events go to ``on_progress``.

        Raises:
            RemoteError: the backend answered ``ok: false``.
            RequestTimeout: no final reply within the timeout.
        """
        timeout = self.timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout
        while True:
            try:
                message = self._next_message(request_id, deadline)
            except ProtocolError:
                self._outstanding.discard(request_id)
                raise
            if message is None:
                self._outstanding.discard(request_id)
                self._inbox.pop(request_id, None)
                raise RequestTimeout(f"no reply from {self.address} within {timeout:.1f} s",
                                     request_id=request_id)
            reply = read_reply(message)
            if reply.progress is not None:
                if on_progress is not None:
                    on_progress(*reply.progress)
                continue
            self._outstanding.discard(request_id)
            self._inbox.pop(request_id, None)
            if reply.error is not None:
                # No local may keep the exception: frame -> reply -> exception -> traceback ->
                # frame is a cycle that keeps the caller's frames (an open output file, say)
                # alive until the garbage collector runs.
                try:
                    raise reply.error
                finally:
                    del reply
            return reply

    def _next_message(self, request_id: str, deadline: float) -> Message | None:
        """The next message for ``request_id`` (buffering others'), or None at the deadline."""
        while True:
            queued = self._inbox.get(request_id)
            if queued:
                return queued.pop(0)
            remaining_ms = int((deadline - time.monotonic()) * 1000)
            if remaining_ms <= 0 or not self._socket.poll(remaining_ms, zmq.POLLIN):
                return None
            frames = self._socket.recv_multipart(copy=False)
            try:
                message = decode_message(frames, self.max_reply_bytes)
            except ProtocolError as exc:
                if exc.request_id == request_id:
                    raise  # e.g. a reply over max_reply_bytes: fail this request, not hang
                logger.warning("dropping undecodable reply: %s", exc)
                continue
            if message.id == request_id:
                return message
            if message.id in self._outstanding:
                self._inbox.setdefault(message.id, []).append(message)
            else:
                logger.debug("dropping stale reply to request %s", message.id)

    def request(self, op: str, params: Mapping[str, Any] | None = None,
                arrays: Mapping[str, NDArray[Any]] | None = None, timeout_s: float | None = None,
                on_progress: ProgressCallback | None = None,
                cancel_on_timeout: bool = True) -> Reply:
        """Send a request and wait for its final reply (see :meth:`receive`)."""
        request_id = self.send(op, params, arrays, timeout_s)
        try:
            return self.receive(request_id, timeout_s, on_progress)
        except RequestTimeout:
            if cancel_on_timeout:
                try:
                    self.send(CancelRequest.OP, *CancelRequest(request_id).to_wire(),
                              timeout_s=0.5)
                except (RequestTimeout, zmq.ZMQError):
                    pass  # the backend is unreachable: nothing to cancel there
            raise

    def call(self, request: Request[ReplyT], timeout_s: float | None = None,
             on_progress: ProgressCallback | None = None) -> ReplyT:
        """Send a typed request (``SegmentRequest``, ...) and return its typed reply."""
        params, arrays = request.to_wire()
        return request.parse_reply(self.request(request.OP, params, arrays, timeout_s,
                                                on_progress))

    # ------------------------------------------------------------------ operations

    def hello(self, timeout_s: float | None = 5.0) -> HelloReply:
        return self.call(HelloRequest(), timeout_s)

    def status(self, timeout_s: float | None = 5.0) -> StatusReply:
        return self.call(StatusRequest(), timeout_s)

    def cancel(self, target_id: str, timeout_s: float | None = 5.0) -> CancelReply:
        return self.call(CancelRequest(target_id), timeout_s)

    def shutdown(self, timeout_s: float | None = 5.0) -> ShutdownReply:
        return self.call(ShutdownRequest(), timeout_s)

    def set_image(self, pixels: NDArray[Any], georeference: Georeference,
                  raster: RasterOptions | None = None, engine: str = "sam",
                  timeout_s: float | None = None,
                  on_progress: ProgressCallback | None = None) -> SetImageReply:
        """Upload a tile; the backend encodes it (or reuses the cached embedding)."""
        return self.call(SetImageRequest(pixels, georeference, raster or RasterOptions(), engine),
                         timeout_s, on_progress)

    def segment(self, prompt: Prompt, options: SegmentOptions | None = None,
                image_id: str | None = None, pixels: NDArray[Any] | None = None,
                georeference: Georeference | None = None, raster: RasterOptions | None = None,
                timeout_s: float | None = None,
                on_progress: ProgressCallback | None = None) -> SegmentReply:
        """Segment a cached image (``image_id``) or an inline tile (``pixels`` + georeference).

        The reply's ``features`` is a GeoJSON FeatureCollection and its ``mask`` the binary
        mask when ``options.return_mask`` is set.
        """
        return self.call(SegmentRequest(prompt, options or SegmentOptions(), image_id, pixels,
                                        georeference, raster), timeout_s, on_progress)

