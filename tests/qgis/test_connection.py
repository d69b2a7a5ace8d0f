"""The plugin's non-blocking backend connection and process launcher, inside a real (offscreen)
QGIS, against real ``unigeoseg serve`` processes running the tiny SAM.

Nothing here sleeps to synchronise: every wait is on a Qt signal or a condition polled by
``qtbot`` while Qt's event loop runs, with a bounded timeout.
"""

from __future__ import annotations

import os
import signal
import socket
import sys

import numpy as np
import pytest
from tests.conftest import backend_python

qgis_core = pytest.importorskip("qgis.core")
zmq = pytest.importorskip("zmq")

from qgis.PyQt.QtCore import QTimer  # noqa: E402
from qgis_plugin.connection import BackendConnection  # noqa: E402
from qgis_plugin.launcher import BackendLauncher  # noqa: E402
from qgis_plugin.unigeoseg_protocol import (  # noqa: E402
    Georeference,
    HelloReply,
    Prompt,
    SegmentOptions,
    decode_message,
    encode_message,
    ok_header,
)

pytestmark = [pytest.mark.qgis, pytest.mark.timeout(180)]

# A 30 cm UTM 33N tile whose top-left corner is at (500000, 4100000).
TILE = Georeference("EPSG:32633", (500000.0, 0.3, 0.0, 4100000.0, 0.0, -0.3))
WAIT_MS = 20000


def tile_pixels(size: int = 256, seed: int = 0) -> np.ndarray:
    """A bright square on a darker textured background (``size x size x 3`` uint8)."""
    rng = np.random.default_rng(seed)
    pixels = (rng.random((size, size, 3)) * 60).astype(np.uint8)
    pixels[60:140, 100:200] = (230, 220, 40)
    return pixels


def map_xy(col: float, row: float) -> tuple[float, float]:
    x0, dx, _, y0, _, dy = TILE.geotransform
    return x0 + col * dx, y0 + row * dy


def set_image_params() -> dict:
    return {"georeference": TILE.to_wire(), "raster": {"stretch": "auto"}}


def segment_params(image_id: str) -> dict:
    return {"image_id": image_id, "prompt": Prompt(points=(map_xy(150.5, 100.5),)).to_wire(),
            "options": SegmentOptions().to_wire()}


def free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Calls:
    """Records the callbacks of one request."""

    def __init__(self):
        self.replies: list = []
        self.errors: list[tuple[str, str]] = []
        self.progress: list[tuple[int, int, str]] = []

    def callbacks(self) -> dict:
        return {"on_reply": self.replies.append,
                "on_error": lambda code, message: self.errors.append((code, message)),
                "on_progress": lambda done, total, text: self.progress.append((done, total, text))}

    @property
    def answered(self) -> int:
        return len(self.replies) + len(self.errors)

    def result(self) -> dict:
        assert not self.errors, self.errors
        assert len(self.replies) == 1
        return self.replies[0].message.header["result"]


@pytest.fixture(autouse=True)
def _qgis(qgis_app):
    """Every test here runs inside the (offscreen) QgsApplication."""
    return qgis_app


@pytest.fixture
def plugin_log():
    """Messages the plugin writes to QGIS's log during the test: (message, level)."""
    from qgis.core import QgsApplication

    messages: list[tuple[str, object]] = []

    def record(message, tag, level):
        if tag == "UniGeoSeg":
            messages.append((message, level))

    QgsApplication.messageLog().messageReceived.connect(record)
    yield messages
    QgsApplication.messageLog().messageReceived.disconnect(record)


@pytest.fixture
def connect(qtbot):
    """``connect(address, heartbeat_s)``: an open connection that has said ``connected``."""
    made: list[BackendConnection] = []

    def factory(address: str, heartbeat_s: float = 2.0) -> BackendConnection:
        connection = BackendConnection(address, heartbeat_s=heartbeat_s)
        made.append(connection)
        connection.hellos = []
        connection.losses = []
        connection.connected.connect(connection.hellos.append)
        connection.disconnected.connect(connection.losses.append)
        with qtbot.waitSignal(connection.connected, timeout=WAIT_MS):
            connection.open()
        return connection

    yield factory
    for connection in made:
        connection.close()


def request_and_wait(qtbot, connection, op, params=None, arrays=None, timeout_s=60.0) -> Calls:
    calls = Calls()
    connection.request(op, params, arrays, timeout_s=timeout_s, **calls.callbacks())
    qtbot.waitUntil(lambda: calls.answered > 0, timeout=WAIT_MS)
    return calls


def assert_qgis_alive(qtbot):
    from qgis.core import QgsApplication, QgsVectorLayer

    assert QgsApplication.instance() is not None
    layer = QgsVectorLayer("Polygon?crs=EPSG:32633", "alive", "memory")
    assert layer.isValid()
    ticks = []
    QTimer.singleShot(0, lambda: ticks.append(1))
    qtbot.waitUntil(lambda: bool(ticks), timeout=5000)


# --------------------------------------------------------------------------- connection


def test_open_emits_connected_with_the_hello(connect, backend):
    connection = connect(backend.address)
    hello = connection.hellos[0]
    assert hello.protocol_version == 1
    assert hello.engines["sam"].available is True
    assert connection.is_connected and connection.hello_info == hello
    assert connection.address == backend.address


def test_set_image_then_segment_round_trip_through_callbacks(qtbot, connect, backend):
    connection = connect(backend.address)
    pixels = tile_pixels(seed=3)
    calls = request_and_wait(qtbot, connection, "set_image", set_image_params(),
                             {"pixels": pixels})
    image = calls.result()
    assert (image["width"], image["height"]) == (256, 256)
    assert calls.progress, "set_image streams progress events"
    assert all(total >= done >= 0 for done, total, _ in calls.progress)

    calls = request_and_wait(qtbot, connection, "segment", segment_params(image["image_id"]))
    result = calls.result()
    features = result["features"]
    assert features["type"] == "FeatureCollection"
    assert features["features"], "the seeded tiny SAM gives a non-empty mask at this click"
    assert features["features"][0]["geometry"]["type"] in ("Polygon", "MultiPolygon")
    assert connection.pending_count() == 0


def test_the_gui_event_loop_runs_while_a_request_is_in_flight(qtbot, connect, backend):
    connection = connect(backend.address)
    ticks = [0]
    timer = QTimer()
    timer.setInterval(0)
    timer.timeout.connect(lambda: ticks.__setitem__(0, ticks[0] + 1))
    timer.start()
    try:
        calls = Calls()
        at_reply: list[int] = []
        callbacks = calls.callbacks()
        on_reply = callbacks["on_reply"]
        callbacks["on_reply"] = lambda message: (at_reply.append(ticks[0]), on_reply(message))
        before = ticks[0]
        connection.request("set_image", set_image_params(), {"pixels": tile_pixels(1024, 4)},
                           **callbacks)
        # request() returned without waiting: callbacks only ever run from the event loop.
        assert calls.answered == 0 and ticks[0] == before
        qtbot.waitUntil(lambda: calls.answered > 0, timeout=WAIT_MS)
    finally:
        timer.stop()
    calls.result()
    assert at_reply[0] - before >= 1, "the GUI timer kept firing while the backend worked"


def test_a_request_past_its_deadline_fails_with_timeout_and_is_cancelled(qtbot):
    """Against a silent peer: the deadline is enforced here, and the backend is told."""
    router = zmq.Context.instance().socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    connection = BackendConnection(f"tcp://127.0.0.1:{port}", heartbeat_s=30.0)
    received: list = []  # (routing id, Message)

    def receive_until(predicate):
        while router.poll(0):
            frames = router.recv_multipart()
            received.append((frames[0], decode_message(frames[1:])))
        return predicate()

    try:
        connection.open()
        calls = Calls()
        request_id = connection.request("status", timeout_s=0.3, **calls.callbacks())
        qtbot.waitUntil(lambda: calls.answered > 0, timeout=5000)
        assert [code for code, _ in calls.errors] == ["timeout"]
        assert "0.3 s" in calls.errors[0][1]
        qtbot.waitUntil(lambda: receive_until(lambda: any(
            m.op == "cancel" and m.params.get("target") == request_id for _, m in received)),
            timeout=5000)
        assert [m.op for _, m in received if m.id == request_id] == ["status"]

        # A late reply is ignored; the peer answering a heartbeat makes it "connected".
        peer, probe = next((peer, m) for peer, m in received if m.op == "hello")
        router.send_multipart([peer, *encode_message(ok_header(request_id, {"late": True}))])
        fake = HelloReply(protocol_version=1, backend_version="fake", engines={},
                          device="cpu")
        with qtbot.waitSignal(connection.connected, timeout=5000) as blocker:
            router.send_multipart([peer, *encode_message(ok_header(probe.id,
                                                                   fake.to_result()))])
        assert blocker.args == [fake]
        assert len(calls.errors) == 1 and not calls.replies
    finally:
        connection.close()
        router.close(linger=0)


def test_a_send_that_would_block_fails_the_request_instead_of_blocking(qtbot):
    """Nobody listens: ZeroMQ queues up to its high-water mark, then refuses; requests past it
    fail with ``send_failed`` (the GUI thread never waits), and every request gets exactly
    one callback."""
    connection = BackendConnection(f"tcp://127.0.0.1:{free_loopback_port()}", heartbeat_s=30)
    connection.open()
    try:
        calls = [Calls() for _ in range(1200)]  # ZeroMQ's default high-water mark is 1000
        for c in calls:
            connection.request("status", timeout_s=60, **c.callbacks())
        qtbot.waitUntil(lambda: any(c.errors for c in calls), timeout=5000)
        failed = [c.errors[0] for c in calls if c.errors]
        assert failed and {code for code, _ in failed} == {"send_failed"}
        assert "send queue is full" in failed[0][1]
        assert connection.pending_count() == len(calls) - len(failed)
    finally:
        connection.close()
    assert all(c.answered == 1 and not c.replies for c in calls)
    assert {c.errors[0][0] for c in calls} == {"send_failed", "closed"}


def test_the_backends_own_timeout_reaches_on_error(qtbot, connect, backend):
    connection = connect(backend.address)
    calls = request_and_wait(qtbot, connection, "set_image", set_image_params(),
                             {"pixels": tile_pixels(1024, 5)}, timeout_s=0.001)
    assert [code for code, _ in calls.errors] == ["timeout"] and not calls.replies


def test_cancel_fails_the_request_once_and_the_connection_keeps_working(qtbot, connect,
                                                                          backend):
    connection = connect(backend.address)
    cancelled = Calls()
    request_id = connection.request("set_image", set_image_params(),
                                    {"pixels": tile_pixels(1024, 6)}, **cancelled.callbacks())
    assert connection.cancel(request_id) is True
    assert [code for code, _ in cancelled.errors] == ["cancelled"]  # at once
    assert connection.cancel(request_id) is False
    assert connection.pending_count() == 0

    # Later requests work; by the time they are answered, the backend's own "cancelled"
    # reply (and any late result) has come back, and was ignored.
    calls = request_and_wait(qtbot, connection, "set_image", set_image_params(),
                             {"pixels": tile_pixels(seed=7)})
    image = calls.result()
    calls = request_and_wait(qtbot, connection, "segment", segment_params(image["image_id"]))
    assert calls.result()["features"]["features"]
    status = request_and_wait(qtbot, connection, "status").result()
    assert status["queued"] == 0
    assert len(cancelled.errors) == 1 and not cancelled.replies


def test_close_fails_outstanding_requests_with_closed(qtbot, connect, backend):
    connection = connect(backend.address)
    calls = Calls()
    connection.request("set_image", set_image_params(), {"pixels": tile_pixels(1024, 8)},
                       **calls.callbacks())
    connection.close()
    assert [code for code, _ in calls.errors] == ["closed"]
    assert not connection.is_connected
    after = Calls()
    connection.request("status", **after.callbacks())
    qtbot.waitUntil(lambda: after.answered > 0, timeout=5000)
    assert [code for code, _ in after.errors] == ["closed"]
    assert len(calls.errors) == 1


def test_a_killed_backend_fails_requests_with_backend_lost(qtbot, connect, tiny_backend_factory,
                                                           plugin_log):
    from qgis.core import Qgis

    server = tiny_backend_factory()
    connection = connect(server.address, heartbeat_s=0.5)
    os.kill(server.process.pid, signal.SIGSTOP)  # it cannot answer before it dies
    calls = Calls()
    connection.request("set_image", set_image_params(), {"pixels": tile_pixels(seed=9)},
                       **calls.callbacks())
    with qtbot.waitSignal(connection.disconnected, timeout=WAIT_MS) as blocker:
        os.kill(server.process.pid, signal.SIGKILL)
        server.process.wait(timeout=30)
    assert server.address in blocker.args[0]
    qtbot.waitUntil(lambda: calls.answered > 0, timeout=WAIT_MS)
    assert [code for code, _ in calls.errors] == ["backend_lost"] and not calls.replies
    assert server.address in calls.errors[0][1]
    assert not connection.is_connected

    # While the backend is away, requests fail at once rather than wait for their timeout.
    later = Calls()
    connection.request("status", timeout_s=60, **later.callbacks())
    qtbot.waitUntil(lambda: later.answered > 0, timeout=5000)
    assert [code for code, _ in later.errors] == ["backend_lost"]
    assert len(calls.errors) == 1 and len(connection.losses) == 1
    assert not [m for m, level in plugin_log if level == Qgis.MessageLevel.Critical], plugin_log
    assert_qgis_alive(qtbot)


def test_a_frozen_backend_is_noticed_by_heartbeats_and_rejoins(qtbot, connect,
                                                               tiny_backend_factory):
    server = tiny_backend_factory()
    connection = connect(server.address, heartbeat_s=0.5)
    os.kill(server.process.pid, signal.SIGSTOP)  # the TCP connection stays up: only silence
    calls = Calls()
    connection.request("status", timeout_s=60, **calls.callbacks())
    with qtbot.waitSignal(connection.disconnected, timeout=WAIT_MS) as blocker:
        pass
    assert "stopped answering" in blocker.args[0]
    qtbot.waitUntil(lambda: calls.answered > 0, timeout=5000)
    assert [code for code, _ in calls.errors] == ["backend_lost"]

    with qtbot.waitSignal(connection.connected, timeout=WAIT_MS):
        os.kill(server.process.pid, signal.SIGCONT)
    assert connection.is_connected and len(connection.hellos) == 2
    assert request_and_wait(qtbot, connection, "status").result()["uptime_s"] > 0
    assert len(calls.errors) == 1


def test_a_backend_restarted_on_the_same_address_is_reconnected(qtbot, connect,
                                                                tiny_backend_factory):
    address = f"tcp://127.0.0.1:{free_loopback_port()}"
    first = tiny_backend_factory(address=address)
    assert first.address == address
    connection = connect(address, heartbeat_s=0.5)
    with qtbot.waitSignal(connection.disconnected, timeout=WAIT_MS):
        first.process.kill()
        first.process.wait(timeout=30)
    assert not connection.is_connected

    second = tiny_backend_factory(address=address)  # blocks until it listens
    assert second.address == address
    qtbot.waitUntil(lambda: len(connection.hellos) == 2, timeout=WAIT_MS)
    assert connection.is_connected and connection.hello_info.engines["sam"].available
    calls = request_and_wait(qtbot, connection, "set_image", set_image_params(),
                             {"pixels": tile_pixels(seed=10)})
    image = calls.result()
    calls = request_and_wait(qtbot, connection, "segment", segment_params(image["image_id"]))
    assert calls.result()["features"]["features"]
    assert len(connection.losses) == 1


# --------------------------------------------------------------------------- launcher


def test_the_launcher_starts_a_backend_that_a_connection_can_use(qtbot, connect,
                                                                 tiny_serve_args, plugin_log):
    from qgis.core import Qgis

    launcher = BackendLauncher()
    try:
        with qtbot.waitSignal(launcher.started, timeout=120000) as blocker:
            launcher.start(backend_python(), "tcp://127.0.0.1:*", tiny_serve_args)
        address = blocker.args[0]
        assert address.startswith("tcp://127.0.0.1:") and not address.endswith("*")
        assert launcher.is_running and launcher.is_ready and launcher.address == address
        with pytest.raises(RuntimeError):
            launcher.start(backend_python(), "tcp://127.0.0.1:*", [])

        connection = connect(address)
        assert connection.hello_info.engines["sam"].available
        calls = Calls()
        # A segment of an image the backend never saw: answered with a typed error, and
        # logged at INFO (hello and status are DEBUG, so heartbeats stay out of the log).
        request_id = connection.request("segment", {"image_id": "never-sent",
                                                    "prompt": {"points": [[1.0, 2.0]]}},
                                        **calls.callbacks())
        qtbot.waitUntil(lambda: calls.answered > 0, timeout=WAIT_MS)
        assert calls.errors and calls.errors[0][0] == "unknown_image"
        connection.close()
        # The backend's JSON-lines stderr lands in the plugin's log tab, readable, with the
        # request id and op; the heartbeats' hello requests are left out.
        qtbot.waitUntil(lambda: any(f"request_id {request_id}, op segment" in m
                                    for m, _ in plugin_log), timeout=WAIT_MS)
        assert any("backend: engine sam loaded" in m for m, _ in plugin_log)
        assert not any(m.startswith('backend: {"') or "op hello" in m for m, _ in plugin_log)

        with qtbot.waitSignal(launcher.finished, timeout=WAIT_MS) as finished:
            launcher.stop()
        assert finished.args == [0]
        assert not launcher.is_running and launcher.address is None
        launcher.stop()  # twice is fine
        assert not [m for m, level in plugin_log if level == Qgis.MessageLevel.Critical]
    finally:
        launcher.stop(timeout_ms=2000)


def test_the_launcher_reports_a_python_that_does_not_exist(qtbot, tmp_path):
    launcher = BackendLauncher()
    finished: list[int] = []
    launcher.finished.connect(finished.append)
    missing = str(tmp_path / "no" / "python")
    with qtbot.waitSignal(launcher.failed, timeout=WAIT_MS) as blocker:
        launcher.start(missing, "tcp://127.0.0.1:*", [])
    assert missing in blocker.args[0]
    assert not launcher.is_running and not finished
    launcher.stop()


def test_the_launcher_reports_a_python_without_the_backend(qtbot):
    launcher = BackendLauncher()
    failed: list[str] = []
    launcher.failed.connect(failed.append)
    with qtbot.waitSignal(launcher.finished, timeout=WAIT_MS) as blocker:
        launcher.start(sys.executable, "tcp://127.0.0.1:*", [])  # QGIS's Python: no backend
    assert blocker.args[0] != 0
    assert len(failed) == 1 and "before it was ready" in failed[0]
    assert "unigeoseg_backend" in failed[0]  # the last stderr lines say what went wrong
    assert not launcher.is_running
