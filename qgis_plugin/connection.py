"""A non-blocking connection to the backend: a ZeroMQ DEALER socket driven by Qt's event loop.

Everything here runs on the GUI thread and never waits: requests are sent with ``NOBLOCK``,
replies are read when Qt's ``QSocketNotifier`` says the socket may have something, and a
``QTimer`` enforces deadlines and sends heartbeats. Callbacks (``on_reply``, ``on_error``,
``on_progress``) therefore run on the GUI thread, from the event loop, and may touch widgets
and layers directly.

Liveness: every ``heartbeat_s`` a ``hello`` is sent. When nothing comes back for about two
heartbeat periods (or ZeroMQ reports that the backend closed the TCP connection), the
connection is declared lost: ``disconnected`` is emitted, every outstanding request fails with
``backend_lost``, and the socket is recreated so that nothing queued for the dead backend is
delivered to a new one. Heartbeats go on; the first ``hello`` answered emits ``connected``
again.

This is the only plugin module that imports ``zmq`` at module level; import it only when a
connection is made, so that the plugin loads (and can say what is missing) without pyzmq.
"""

from __future__ import annotations

import time
import traceback
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import zmq
from qgis.PyQt.QtCore import QObject, QSocketNotifier, QTimer, pyqtSignal
from zmq.utils.monitor import recv_monitor_message

from .core.log import critical, log, warn
from .unigeoseg_protocol import (
    DEFAULT_MAX_MESSAGE_BYTES,
    ProtocolError,
    decode_message,
    encode_message,
    request_header,
)
from .unigeoseg_protocol.curve import CurveClientKeys
from .unigeoseg_protocol.errors import ErrorCode
from .unigeoseg_protocol.operations import (
    CancelRequest,
    HelloReply,
    HelloRequest,
    Reply,
    Request,
    read_reply,
)

#: ``on_reply(reply)``: the final ``ok`` reply as read once by ``read_reply`` (its message's
#: arrays travel with it); :meth:`BackendConnection.call` parses it into the typed reply.
ReplyCallback = Callable[[Reply], None]
#: ``on_error(code, text)``: ``code`` is an ``ErrorCode`` value (a newer backend's unknown
#: code as it came); this side raises CLOSED, CANCELLED, TIMEOUT, BACKEND_LOST, SEND_FAILED
#: and INVALID_ARGUMENT.
ErrorCallback = Callable[[str, str], None]
ProgressCallback = Callable[[int, int, str], None]

_TICK_MS = 200
_MAX_MESSAGES_PER_DRAIN = 64
_CONTROL_TIMEOUT_S = 5.0  # timeout_ms sent with heartbeats and cancels

_CONNECTING, _CONNECTED, _LOST, _CLOSED = "connecting", "connected", "lost", "closed"


@dataclass
class _Request:
    id: str
    op: str
    deadline: float | None
    timeout_s: float | None
    on_reply: ReplyCallback | None
    on_error: ErrorCallback | None
    on_progress: ProgressCallback | None


def _call(callback: Callable | None, *args: Any) -> None:
    """Run a user callback; an exception in it is logged, never propagated into Qt."""
    if callback is None:
        return
    try:
        callback(*args)
    except Exception:  # noqa: BLE001 - a callback bug must not break the connection
        critical(f"error in a backend reply callback:\n{traceback.format_exc()}")


class BackendConnection(QObject):
    """Asynchronous requests to a ``unigeoseg serve`` backend over one DEALER socket.

    Args:
        address: the backend endpoint, e.g. ``tcp://127.0.0.1:5557``.
        heartbeat_s: seconds between heartbeats; the backend is declared lost after about
            two periods without an answer.
        parent: the usual Qt parent.
        curve: CURVE keys, for a backend that requires authentication (``core/curve.py``).

    Signals:
        connected(HelloReply): the backend's ``hello``, on the first answered heartbeat after
            :meth:`open` and again after every reconnection.
        disconnected(str): a sentence saying why: the backend stopped answering, closed the
            connection, or never answered after :meth:`open`. Not emitted by :meth:`close`.
    """

    connected = pyqtSignal(object)  # HelloReply
    disconnected = pyqtSignal(str)

    def __init__(self, address: str, heartbeat_s: float = 2.0, parent: QObject | None = None,
                 curve: CurveClientKeys | None = None):
        super().__init__(parent)
        self._curve = curve
        if heartbeat_s <= 0:
            raise ValueError("heartbeat_s must be positive")
        self._address = address
        self._heartbeat_s = float(heartbeat_s)
        self._lost_after_s = 2.0 * self._heartbeat_s
        self._max_reply_bytes = DEFAULT_MAX_MESSAGE_BYTES
        self._context: zmq.Context | None = None
        self._socket: zmq.Socket | None = None
        self._notifier: QSocketNotifier | None = None
        self._monitor: zmq.Socket | None = None
        self._monitor_notifier: QSocketNotifier | None = None
        self._state = _CLOSED
        self._hello: HelloReply | None = None
        self._pending: dict[str, _Request] = {}
        self._probes: dict[str, float] = {}      # heartbeat id -> time sent
        self._awaiting_since: float | None = None  # first probe sent since we last heard
        self._last_probe = 0.0
        self._deferred: list[tuple[_Request, ErrorCode | str, str]] = []  # to report soon

        self._timer = QTimer(self)
        self._timer.setInterval(max(20, min(_TICK_MS, int(self._heartbeat_s * 250))))
        self._timer.timeout.connect(self._on_tick)
        # A zero-interval single shot: runs "as soon as the event loop is back", used to
        # drain after sends and to report failures decided inside request().
        self._soon = QTimer(self)
        self._soon.setSingleShot(True)
        self._soon.setInterval(0)
        self._soon.timeout.connect(self._on_soon)

    # ------------------------------------------------------------------ public API

    @property
    def address(self) -> str:
        return self._address

    @property
    def is_connected(self) -> bool:
        """True between a ``connected`` and the next ``disconnected`` (or :meth:`close`)."""
        return self._state == _CONNECTED

    @property
    def hello_info(self) -> HelloReply | None:
        """The last ``hello`` received (kept after a disconnection), or None."""
        return self._hello

    def open(self) -> None:
        """Connect (asynchronously) and start heartbeating; ``connected`` follows. Idempotent."""
        if self._state != _CLOSED:
            return
        self._context = zmq.Context.instance()
        self._state = _CONNECTING
        self._create_socket()
        self._timer.start()
        self._send_probe(time.monotonic())

    def close(self) -> None:
        """Close the socket (linger 0), stop timers, fail outstanding requests with ``closed``."""
        if self._state == _CLOSED and not self._deferred:
            return
        self._state = _CLOSED
        self._timer.stop()
        self._soon.stop()
        self._destroy_socket()
        self._probes.clear()
        self._awaiting_since = None
        pending = list(self._pending.values())
        self._pending.clear()
        self._flush_deferred()
        for request in pending:
            _call(request.on_error, str(ErrorCode.CLOSED),
                  f"the connection to the backend at {self._address} was closed before the "
                  f"{request.op} request was answered")

    def request(self, op: str, params: Mapping[str, Any] | None = None,
                arrays: Mapping[str, Any] | None = None, timeout_s: float | None = 120.0,
                on_reply: ReplyCallback | None = None, on_error: ErrorCallback | None = None,
                on_progress: ProgressCallback | None = None) -> str:
        """Send a request without waiting; returns its id.

        Exactly one of ``on_reply(reply)`` (the ``Reply``) or ``on_error(code, message)`` is
        called later, from the event loop (never from inside this call);
        ``on_progress(done, total, text)`` for each progress event before that. ``timeout_s``
        (None = no deadline) is enforced here and sent to the backend as ``timeout_ms``; on
        expiry the backend is told to cancel and ``on_error("timeout", ...)`` is called.

        Error codes from this side (``ErrorCode`` values): ``closed``, ``cancelled``,
        ``timeout``, ``backend_lost`` (also when the request is made while the backend is known
        to be unreachable), ``send_failed``, ``invalid_argument``; otherwise the backend's
        ``error.code``.
        """
        request_id = uuid.uuid4().hex
        now = time.monotonic()
        request = _Request(request_id, op, None if timeout_s is None else now + timeout_s,
                           timeout_s, on_reply, on_error, on_progress)
        if self._state == _CLOSED or self._socket is None:
            self._fail_soon(request, ErrorCode.CLOSED, f"the connection to the backend at "
                                                       f"{self._address} is not open")
            return request_id
        if self._state == _LOST:
            self._fail_soon(request, ErrorCode.BACKEND_LOST,
                            f"the backend at {self._address} is not answering; the {op} "
                            f"request was not sent (start the backend, or check its address)")
            return request_id
        timeout_ms = None if timeout_s is None else max(1, int(timeout_s * 1000))
        try:
            frames = encode_message(request_header(op, request_id, params, timeout_ms), arrays)
        except ProtocolError as exc:
            self._fail_soon(request, exc.code, exc.message)
            return request_id
        except (TypeError, ValueError) as exc:
            self._fail_soon(request, ErrorCode.INVALID_ARGUMENT,
                            f"the {op} request cannot be encoded: {exc}")
            return request_id
        error = self._send(frames)
        if error is not None:
            self._fail_soon(request, ErrorCode.SEND_FAILED,
                            f"could not send the {op} request to the backend at "
                            f"{self._address}: {error}")
            return request_id
        self._pending[request_id] = request
        self._soon.start()  # drain soon: a send can swallow the socket's read edge
        return request_id

    def call(self, request: Request, timeout_s: float | None = 120.0,
             on_reply: Callable[[Any], None] | None = None,
             on_error: ErrorCallback | None = None,
             on_progress: ProgressCallback | None = None) -> str:
        """:meth:`request` for a typed request of the protocol (``SetImageRequest``,
        ``SegmentRequest``, ...): ``on_reply`` receives its typed reply
        (``request.parse_reply`` of the reply already read); a reply that does not parse goes
        to ``on_error``."""

        def typed(reply: Reply) -> None:
            try:
                typed_reply = request.parse_reply(reply)
            except ProtocolError as exc:
                _call(on_error, str(exc.code), exc.message)
                return
            _call(on_reply, typed_reply)

        params, arrays = request.to_wire()
        return self.request(request.OP, params, arrays, timeout_s, on_reply=typed,
                            on_error=on_error, on_progress=on_progress)

    def cancel(self, request_id: str) -> bool:
        """Fail ``request_id`` now with ``cancelled`` and ask the backend to drop it.

        ``on_error("cancelled", ...)`` is called before this returns; a late reply is ignored.
        Returns False when the request was not outstanding (already answered or unknown).
        """
        request = self._pending.pop(request_id, None)
        if request is None:
            return False
        self._send_control(CancelRequest(request_id))
        _call(request.on_error, str(ErrorCode.CANCELLED),
              f"the {request.op} request was cancelled")
        return True

    def pending_count(self) -> int:
        """Requests sent and not yet answered."""
        return len(self._pending)

    # ------------------------------------------------------------------ socket lifecycle

    def _create_socket(self) -> None:
        assert self._context is not None
        sock = self._context.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        if self._curve is not None:  # before connect: the handshake uses them
            sock.curve_serverkey = self._curve.server_public
            sock.curve_publickey = self._curve.public
            sock.curve_secretkey = self._curve.secret
        # ZeroMQ reports a dropped TCP session at once: a crashed backend is noticed in
        # milliseconds instead of two heartbeat periods. Heartbeats still cover a frozen one.
        try:
            monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        except zmq.ZMQError as exc:
            warn(f"no ZeroMQ socket monitor ({exc}); relying on heartbeats alone")
            monitor = None
        sock.connect(self._address)
        self._socket = sock
        self._notifier = QSocketNotifier(sock.getsockopt(zmq.FD), QSocketNotifier.Type.Read, self)
        self._notifier.activated.connect(self._on_activity)
        self._monitor = monitor
        if monitor is not None:
            self._monitor_notifier = QSocketNotifier(monitor.getsockopt(zmq.FD),
                                                     QSocketNotifier.Type.Read, self)
            self._monitor_notifier.activated.connect(self._on_activity)

    def _destroy_socket(self) -> None:
        # Notifiers first: Qt must stop watching a descriptor before ZeroMQ closes it.
        for notifier in (self._notifier, self._monitor_notifier):
            if notifier is not None:
                notifier.setEnabled(False)
                notifier.activated.disconnect()
                notifier.deleteLater()
        self._notifier = self._monitor_notifier = None
        if self._socket is not None:
            if self._monitor is not None:
                try:
                    self._socket.disable_monitor()
                except zmq.ZMQError:
                    pass
                self._monitor.close(linger=0)
            self._socket.close(linger=0)
        self._socket = self._monitor = None

    def _recreate_socket(self) -> None:
        self._destroy_socket()
        self._probes.clear()
        self._create_socket()

    def _send(self, frames: list) -> str | None:
        """Queue one message without blocking; returns None, or why it could not be sent."""
        if self._socket is None:
            return "the connection is closed"
        try:
            self._socket.send_multipart(frames, flags=zmq.NOBLOCK)
        except zmq.Again:
            return ("its send queue is full (the backend is not reading its messages); "
                    "try again later")
        except zmq.ZMQError as exc:
            return str(exc)
        return None

    def _send_control(self, control: CancelRequest | HelloRequest) -> str | None:
        """Fire-and-forget request (cancel, heartbeat): its reply is matched by id or ignored."""
        request_id = uuid.uuid4().hex
        params, _ = control.to_wire()
        frames = encode_message(request_header(control.OP, request_id, params,
                                               int(_CONTROL_TIMEOUT_S * 1000)))
        if self._send(frames) is not None:
            return None
        self._soon.start()
        return request_id

    def _send_probe(self, now: float) -> None:
        probe_id = self._send_control(HelloRequest())
        self._last_probe = now
        if self._awaiting_since is None:
            self._awaiting_since = now
        if probe_id is not None:
            self._probes[probe_id] = now
        horizon = now - 2 * self._lost_after_s - self._heartbeat_s
        for old in [pid for pid, sent in self._probes.items() if sent < horizon]:
            del self._probes[old]

    # ------------------------------------------------------------------ event loop slots

    def _on_activity(self, *_args: Any) -> None:
        try:
            self._drain()
        except Exception:  # noqa: BLE001 - never let an exception escape into Qt
            critical(f"backend connection error:\n{traceback.format_exc()}")

    def _on_soon(self) -> None:
        try:
            self._flush_deferred()
            self._drain()
        except Exception:  # noqa: BLE001
            critical(f"backend connection error:\n{traceback.format_exc()}")

    def _on_tick(self) -> None:
        try:
            self._drain()
            if self._state == _CLOSED:
                return
            now = time.monotonic()
            self._expire(now)
            self._heartbeat(now)
        except Exception:  # noqa: BLE001
            critical(f"backend connection error:\n{traceback.format_exc()}")

    # ------------------------------------------------------------------ reading

    def _drain(self) -> None:
        """Read every message waiting (the ZeroMQ descriptor is edge-triggered), then the
        monitor's events: replies that arrived before a disconnection are still delivered."""
        if self._drain_messages():
            self._drain_monitor()

    def _drain_messages(self) -> bool:
        """True when the socket is empty; False when it changed or more must wait a turn."""
        sock = self._socket
        for _ in range(_MAX_MESSAGES_PER_DRAIN):
            if sock is None or sock is not self._socket:
                return False  # closed or recreated by a callback
            try:
                if not sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                    return True
                frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return True
            except zmq.ZMQError as exc:
                warn(f"reading from the backend at {self._address} failed: {exc}")
                return False
            self._handle(frames)
        self._soon.start()  # more may be waiting: continue after other events had a turn
        return False

    def _drain_monitor(self) -> None:
        monitor = self._monitor
        while monitor is not None and monitor is self._monitor:
            try:
                if not monitor.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                    return
                event = recv_monitor_message(monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            except zmq.ZMQError:
                return
            if event.get("event") == zmq.EVENT_DISCONNECTED and self._state == _CONNECTED:
                self._lose(f"the backend at {self._address} closed the connection "
                           f"(it stopped or crashed)")
                return

    def _handle(self, frames: list) -> None:
        try:
            message = decode_message(frames, self._max_reply_bytes)
        except ProtocolError as exc:
            self._heard()
            request = self._pending.pop(exc.request_id, None) if exc.request_id else None
            if request is not None:
                _call(request.on_error, str(exc.code), exc.message)
            else:
                warn(f"dropped an unreadable message from the backend at {self._address}: "
                     f"{exc.message}")
            return
        self._heard()
        reply = read_reply(message)
        request_id = reply.request_id
        if request_id in self._probes:
            del self._probes[request_id]
            self._on_hello(reply)
            return
        request = self._pending.get(request_id) if request_id else None
        if request is None:
            if request_id is None and reply.error is not None:
                warn(f"the backend at {self._address} refused a message: "
                     f"{reply.error.code}: {reply.error.message}")
            return  # late reply to a cancelled / timed-out request, or a control reply
        if reply.progress is not None:
            _call(request.on_progress, *reply.progress)
            return
        del self._pending[request_id]
        if reply.error is not None:
            _call(request.on_error, str(reply.error.code), reply.error.message)
        else:
            _call(request.on_reply, reply)

    def _heard(self) -> None:
        self._awaiting_since = None

    def _on_hello(self, reply: Reply) -> None:
        if reply.error is not None:
            warn(f"the backend at {self._address} answered hello with "
                 f"{reply.error.code}: {reply.error.message}")
            return
        try:
            hello = HelloRequest().parse_reply(reply)
        except ProtocolError as exc:
            warn(f"the backend at {self._address} answered hello with an unreadable reply: "
                 f"{exc.message}")
            return
        self._hello = hello
        if self._state in (_CONNECTING, _LOST):
            self._state = _CONNECTED
            log(f"connected to the backend at {self._address} (version "
                f"{hello.backend_version}, device {hello.device})")
            self.connected.emit(hello)

    # ------------------------------------------------------------------ deadlines, liveness

    def _expire(self, now: float) -> None:
        expired = [r for r in self._pending.values() if r.deadline is not None and now > r.deadline]
        for request in expired:
            if self._pending.pop(request.id, None) is None:
                continue  # answered by an earlier callback in this loop
            self._send_control(CancelRequest(request.id))
            _call(request.on_error, str(ErrorCode.TIMEOUT),
                  f"no reply from the backend at {self._address} to the {request.op} request "
                  f"within {request.timeout_s:g} s")

    def _heartbeat(self, now: float) -> None:
        silent = (self._awaiting_since is not None
                  and now - self._awaiting_since > self._lost_after_s)
        if self._state == _CONNECTED:
            if silent:
                self._lose(f"the backend at {self._address} stopped answering")
            elif now - self._last_probe >= self._heartbeat_s:
                self._send_probe(now)
        elif self._state == _CONNECTING:
            if silent:
                self._lose(f"no backend answered at {self._address}")
            elif now - self._last_probe >= self._heartbeat_s:
                self._send_probe(now)
        elif self._state == _LOST and now - self._last_probe >= self._lost_after_s:
            # A fresh socket for every retry: nothing stale can reach a backend that comes
            # back, and a half-open connection cannot swallow the probes for ever.
            self._awaiting_since = None
            self._recreate_socket()
            self._send_probe(now)

    def _lose(self, reason: str) -> None:
        """The backend is gone: tell the GUI, fail what was outstanding, start over."""
        self._state = _LOST
        self._awaiting_since = None
        self._recreate_socket()
        pending = list(self._pending.values())
        self._pending.clear()
        warn(f"{reason}; {len(pending)} request(s) abandoned, reconnecting")
        self._send_probe(time.monotonic())
        self.disconnected.emit(reason)
        for request in pending:
            _call(request.on_error, str(ErrorCode.BACKEND_LOST),
                  f"{reason}; the {request.op} request was abandoned")

    # ------------------------------------------------------------------ deferred failures

    def _fail_soon(self, request: _Request, code: ErrorCode | str, message: str) -> None:
        self._deferred.append((request, code, message))
        self._soon.start()

    def _flush_deferred(self) -> None:
        deferred, self._deferred = self._deferred, []
        for request, code, message in deferred:
            _call(request.on_error, str(code), message)
