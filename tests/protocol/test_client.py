"""The blocking client reads every received message once and parses the typed reply from it."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from unigeoseg_protocol import (
    SegmentReply,
    SegmentRequest,
    decode_message,
    encode_message,
    ok_header,
    operations,
    progress_header,
)
from unigeoseg_protocol import client as client_module
from unigeoseg_protocol.client import Client
from unigeoseg_protocol.params import Prompt

zmq = pytest.importorskip("zmq")

FEATURES = {"type": "FeatureCollection", "features": [],
            "crs": {"type": "name", "properties": {"name": "EPSG:32633"}}}


def _answer_one_request(router, answered: threading.Event) -> None:
    """Receive one request, send a progress event and then the final reply with a mask."""
    if not router.poll(30_000):
        return
    peer, *frames = router.recv_multipart()
    request = decode_message(frames)
    reply = SegmentReply(image_id="abc", features=FEATURES, score=0.5, engine="sam",
                         model="sam_tiny", mask=np.ones((2, 3), np.uint8))
    router.send_multipart([peer, *encode_message(progress_header(request.id, 1, 2, "decoding"))])
    result, arrays = reply.to_wire()
    router.send_multipart([peer, *encode_message(ok_header(request.id, result), arrays)])
    answered.set()


def test_each_received_message_is_read_once(monkeypatch):
    reads = []
    original = operations.read_reply

    def counting_read_reply(message):
        reads.append(message.header.get("event", "final"))
        return original(message)

    # Both names the package reads replies through: the client's import and the module's own.
    monkeypatch.setattr(client_module, "read_reply", counting_read_reply)
    monkeypatch.setattr(operations, "read_reply", counting_read_reply)

    context = zmq.Context.instance()
    router = context.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    answered = threading.Event()
    server = threading.Thread(target=_answer_one_request, args=(router, answered))
    server.start()
    progress = []
    try:
        with Client(f"tcp://127.0.0.1:{port}", timeout_s=30, context=context) as client:
            reply = client.call(SegmentRequest(Prompt(text="a roof", task="referring"),
                                               image_id="abc"),
                                on_progress=lambda *event: progress.append(event))
    finally:
        server.join()
        router.close(linger=0)
    assert answered.is_set()
    assert progress == [(1, 2, "decoding")]
    assert reply.image_id == "abc" and reply.mask is not None and reply.mask.shape == (2, 3)
    assert reads == ["progress", "final"]
