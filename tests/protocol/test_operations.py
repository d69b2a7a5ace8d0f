"""Request and reply types of each operation, the reply reader and the shared vocabulary."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from unigeoseg_protocol import (
    ENGINES,
    OPS,
    TASKS,
    TEXT_TASKS,
    CancelReply,
    CancelRequest,
    EngineInfo,
    ErrorCode,
    Georeference,
    HelloReply,
    Message,
    Progress,
    Prompt,
    ProtocolError,
    RasterOptions,
    RemoteError,
    Reply,
    RunningRequest,
    SegmentOptions,
    SegmentReply,
    SegmentRequest,
    SetImageReply,
    SetImageRequest,
    ShutdownReply,
    StatusReply,
    decode_message,
    default_engine,
    default_task,
    encode_message,
    error_header,
    ok_header,
    progress_header,
    read_reply,
    request_header,
)
from unigeoseg_protocol.operations import REQUEST_TYPES

GEOREF = Georeference("EPSG:32633", (500000.0, 0.5, 0.0, 4100000.0, 0.0, -0.5))
PIXELS = np.arange(4 * 5 * 3, dtype=np.uint16).reshape(4, 5, 3)
FEATURES = {"type": "FeatureCollection", "features": [],
            "crs": {"type": "name", "properties": {"name": "EPSG:32633"}}}


def _sent(request) -> Message:
    """What the backend decodes from a client's request."""
    params, arrays = request.to_wire()
    return decode_message(encode_message(request_header(request.OP, "r1", params), arrays))


def _answered(reply) -> Message:
    """What the client decodes from a backend's reply."""
    result, arrays = reply.to_wire()
    return decode_message(encode_message(ok_header("r1", result), arrays))


def _raw(params: dict, arrays: dict | None = None, op: str = "segment") -> Message:
    return decode_message(encode_message(request_header(op, "r1", params), arrays))


# --------------------------------------------------------------------------- vocabulary


def test_vocabulary_defaults_pick_the_task_and_the_engine():
    assert set(TEXT_TASKS) < set(TASKS) and "interactive" in TASKS
    assert ENGINES == ("sam", "unigeoseg", "default")
    assert default_task(has_geometry=True, has_text=False) == "interactive"
    assert default_task(has_geometry=True, has_text=True) == "referring"
    assert default_task(has_geometry=False, has_text=True) == "referring"
    assert default_engine("interactive") == "sam"
    assert [default_engine(task) for task in TEXT_TASKS] == ["unigeoseg"] * len(TEXT_TASKS)


def test_prompt_defaults_follow_the_vocabulary_on_both_sides():
    for prompt in (Prompt(points=((1.0, 2.0),)), Prompt(text="the pond"),
                   Prompt(box=(0.0, 0.0, 1.0, 1.0), text="with a roof")):
        wire = prompt.to_wire()
        del wire["task"]
        expected = default_task(bool(prompt.points) or prompt.box is not None, bool(prompt.text))
        assert prompt.task == Prompt.from_wire(wire).task == expected


def test_the_package_and_its_curve_keys_import_without_zmq():
    code = ("import sys; sys.modules['zmq'] = None\n"
            "import unigeoseg_protocol, unigeoseg_protocol.curve, unigeoseg_protocol.operations\n"
            "assert unigeoseg_protocol.CurveClientKeys is unigeoseg_protocol.curve.CurveClientKeys")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_the_client_module_re_exports_the_curve_keys():
    from unigeoseg_protocol import client, curve

    assert client.CurveClientKeys is curve.CurveClientKeys


def test_every_op_has_a_request_type_naming_it():
    assert OPS == ("hello", "set_image", "segment", "cancel", "status", "shutdown",
                   "train_upload", "train_start", "train_status", "train_cancel")
    assert all(REQUEST_TYPES[op].OP == op for op in OPS)


# --------------------------------------------------------------------------- requests


def test_set_image_request_travels_unchanged():
    request = SetImageRequest(PIXELS, GEOREF, RasterOptions(bands=(2, 1, 0), nodata=0.0),
                              engine="unigeoseg")
    parsed = SetImageRequest.from_message(_sent(request))
    np.testing.assert_array_equal(parsed.pixels, PIXELS)
    assert parsed.pixels.dtype == PIXELS.dtype
    assert (parsed.georeference, parsed.raster, parsed.engine) == \
        (request.georeference, request.raster, request.engine)


def test_set_image_request_defaults_to_sam_and_auto_stretch():
    parsed = SetImageRequest.from_message(_raw({"georeference": GEOREF.to_wire()},
                                               {"pixels": PIXELS}, op="set_image"))
    assert parsed.engine == "sam" and parsed.raster == RasterOptions()


def test_segment_request_by_image_id_travels_unchanged():
    request = SegmentRequest(Prompt(points=((500001.0, 4099999.0),), object_key="k"),
                             SegmentOptions(return_mask=True, output_crs="EPSG:4326"),
                             image_id="abc")
    message = _sent(request)
    assert message.arrays == {}
    parsed = SegmentRequest.from_message(message)
    assert (parsed.prompt, parsed.options, parsed.image_id, parsed.pixels) == \
        (request.prompt, request.options, "abc", None)


def test_segment_request_with_an_inline_tile_travels_unchanged():
    request = SegmentRequest(Prompt(text="the pond"), pixels=PIXELS, georeference=GEOREF)
    assert request.raster == RasterOptions()  # defaulted with the tile
    parsed = SegmentRequest.from_message(_sent(request))
    np.testing.assert_array_equal(parsed.pixels, PIXELS)
    assert (parsed.prompt, parsed.georeference, parsed.raster, parsed.image_id) == \
        (request.prompt, GEOREF, RasterOptions(), None)


@pytest.mark.parametrize("kwargs", [
    {},                                                            # neither
    {"image_id": "abc", "pixels": PIXELS, "georeference": GEOREF},  # both
    {"pixels": PIXELS},                                            # pixels without georeference
])
def test_segment_request_needs_an_image_id_or_a_georeferenced_tile(kwargs):
    with pytest.raises(ValueError, match="image_id, or pixels with a georeference"):
        SegmentRequest(Prompt(points=((1.0, 2.0),)), **kwargs)


POINT = {"points": [[500001, 4099999]]}


@pytest.mark.parametrize("op, params, arrays, code", [
    ("segment", {"georeference": GEOREF.to_wire(), "prompt": POINT}, None,
     ErrorCode.BAD_FRAME),  # no pixels frame
    ("set_image", {"georeference": GEOREF.to_wire()}, {"pixels": np.zeros(8, np.uint8)},
     ErrorCode.BAD_FRAME),  # 1-D pixels
    ("set_image", {"georeference": GEOREF.to_wire()},
     {"pixels": np.zeros((2, 2, 65), np.uint8)}, ErrorCode.BAD_FRAME),  # 65 bands
    ("set_image", {"georeference": GEOREF.to_wire()}, {"pixels": np.zeros((0, 2), np.uint8)},
     ErrorCode.BAD_FRAME),  # empty
    ("set_image", {"georeference": GEOREF.to_wire(), "engine": "gpt"}, {"pixels": PIXELS},
     ErrorCode.INVALID_ARGUMENT),
    ("set_image", {}, {"pixels": PIXELS}, ErrorCode.INVALID_ARGUMENT),  # no georeference
    ("segment", {"image_id": "", "prompt": POINT}, None, ErrorCode.INVALID_ARGUMENT),
    ("segment", {"image_id": 7, "prompt": POINT}, None, ErrorCode.INVALID_ARGUMENT),
    ("segment", {"image_id": "abc", "prompt": {}}, None, ErrorCode.EMPTY_PROMPT),
    ("segment", {"image_id": "abc", "prompt": POINT, "options": {"engine": "gpt"}}, None,
     ErrorCode.INVALID_ARGUMENT),
    ("cancel", {}, None, ErrorCode.INVALID_ARGUMENT),
    ("cancel", {"target": 5}, None, ErrorCode.INVALID_ARGUMENT),
])
def test_requests_are_validated_with_the_code_the_client_sees(op, params, arrays, code):
    with pytest.raises(ProtocolError) as info:
        REQUEST_TYPES[op].from_message(_raw(params, arrays, op))
    assert info.value.code == code


def test_cancel_request_travels_unchanged():
    assert CancelRequest.from_message(_sent(CancelRequest("r0"))) == CancelRequest("r0")


# --------------------------------------------------------------------------- replies


@pytest.mark.parametrize("reply", [
    SetImageReply(image_id="abc", width=5, height=4, engine="sam", model="sam_tiny",
                  embedding="computed", valid_fraction=0.75, elapsed_ms=12.5, server_ms=13.0),
    SetImageReply(image_id="abc", width=5, height=4, engine="sam", model="sam_tiny",
                  embedding="cached", valid_fraction=1.0, elapsed_ms=0.5),
    HelloReply(protocol_version=1, backend_version="0.1", device="cuda:0",
               engines={"sam": EngineInfo(True, loaded=True, model="sam_b",
                                          tasks=("interactive",)),
                        "unigeoseg": EngineInfo(False, reason="no --model")},
               gpu={"name": "H200", "memory_bytes": 1 << 30}, torch_version="2.5",
               max_message_bytes=1 << 20, authenticated=True),
    StatusReply(queued=2, running=RunningRequest("r0", "segment"), served=9, encodes=3,
                images_cached=2, embeddings_cached=1, embedding_cache_bytes=1024,
                uptime_s=4.5),
    StatusReply(queued=0, running=None, served=0, encodes=0, images_cached=0,
                embeddings_cached=0, embedding_cache_bytes=0, uptime_s=0.0),
    CancelReply("r0", cancelled=True, was="queued"),
    CancelReply("r0", cancelled=False, reason="not pending"),
    ShutdownReply(),
])
def test_replies_without_arrays_travel_unchanged(reply):
    assert type(reply).from_message(_answered(reply)) == reply
    assert type(reply).from_result(reply.to_result()) == reply


def test_hello_wire_keeps_todays_shape():
    hello = HelloReply(protocol_version=1, backend_version="0.1", device="cpu",
                       engines={"sam": EngineInfo(True, loaded=True, model="sam_tiny",
                                                  tasks=("interactive",)),
                                "unigeoseg": EngineInfo(False, reason="no --model")},
                       max_message_bytes=8, authenticated=False)
    assert hello.to_result() == {
        "protocol_version": 1, "backend_version": "0.1",
        "engines": {"sam": {"available": True, "loaded": True, "model": "sam_tiny",
                            "tasks": ["interactive"]},
                    "unigeoseg": {"available": False, "reason": "no --model"}},
        "device": "cpu", "gpu": None, "max_message_bytes": 8, "authenticated": False}
    assert hello.engine("unigeoseg").reason == "no --model"
    assert hello.engine("other").available is False


def test_segment_reply_travels_with_its_mask():
    mask = np.eye(4, 5, dtype=np.uint8)
    reply = SegmentReply(image_id="abc", features=FEATURES, score=0.9, engine="sam",
                         model="sam_tiny", timings_ms={"encode_ms": 0.0, "decode_ms": 1.5},
                         mask=mask, server_ms=3.0)
    message = _answered(reply)
    assert set(message.header["result"]) == {"image_id", "features", "score", "engine",
                                             "model", "timings_ms", "server_ms"}
    parsed = SegmentReply.from_message(message)
    np.testing.assert_array_equal(parsed.mask, mask)
    assert parsed.to_result() == reply.to_result()


def test_segment_reply_without_a_mask_has_no_array():
    reply = SegmentReply(image_id="abc", features=FEATURES, score=0.9, engine="sam",
                         model="sam_tiny")
    message = _answered(reply)
    assert message.arrays == {} and "server_ms" not in message.header["result"]
    assert SegmentReply.from_message(message).mask is None


@pytest.mark.parametrize("result", [
    {"features": FEATURES, "score": 1.0, "engine": "sam", "model": "m"},  # no image_id
    {"image_id": "a", "features": {"type": "Feature"}, "score": 1.0, "engine": "sam",
     "model": "m"},
    {"image_id": "a", "features": FEATURES, "score": "high", "engine": "sam", "model": "m"},
    {"image_id": "a", "features": FEATURES, "score": True, "engine": "sam", "model": "m"},
])
def test_a_malformed_reply_is_a_bad_message(result):
    with pytest.raises(ProtocolError) as info:
        SegmentReply.from_message(decode_message(encode_message(ok_header("r1", result))))
    assert info.value.code == ErrorCode.BAD_MESSAGE


def test_parsing_an_error_reply_raises_the_remote_error():
    message = decode_message(encode_message(error_header("r1", "unknown_image", "evicted")))
    with pytest.raises(RemoteError) as info:
        SegmentReply.from_message(message)
    assert info.value.code is ErrorCode.UNKNOWN_IMAGE and info.value.message == "evicted"
    progress = decode_message(encode_message(progress_header("r1", 0, 1, "encoding")))
    with pytest.raises(ProtocolError) as info:
        SetImageReply.from_message(progress)
    assert info.value.code == ErrorCode.BAD_MESSAGE


# --------------------------------------------------------------------------- read_reply


def test_read_reply_reads_progress_ok_and_error():
    progress = read_reply(Message(progress_header("r1", 1, 3, "encoding")))
    assert (progress.kind, progress.progress, progress.is_final) == \
        (Reply.PROGRESS, Progress(1, 3, "encoding"), False)
    ok = read_reply(Message(ok_header("r1", {"stopping": True})))
    assert (ok.kind, ok.result, ok.error, ok.request_id) == (Reply.OK, {"stopping": True},
                                                             None, "r1")
    error = read_reply(Message(error_header("r1", "queue_full", "retry", {"queued": 16})))
    assert error.kind == Reply.ERROR and error.is_final
    assert isinstance(error.error, RemoteError)
    assert (error.error.code, error.error.message, error.error.details, error.error.request_id) \
        == (ErrorCode.QUEUE_FULL, "retry", {"queued": 16}, "r1")


def test_read_reply_tolerates_what_a_newer_or_broken_peer_sends():
    progress = read_reply(Message({"v": 1, "id": "r1", "event": "progress", "done": "x"}))
    assert progress.progress == Progress(0, 0, "")
    newer = read_reply(Message(error_header("r1", "gpu_on_fire", "too hot")))
    assert newer.error is not None and newer.error.code == "gpu_on_fire"
    bare = read_reply(Message({"v": 1, "id": None, "ok": False}))
    assert bare.error is not None and bare.error.code is ErrorCode.INTERNAL
    assert bare.error.message and bare.request_id is None


def test_client_side_codes_are_error_codes_too():
    assert {ErrorCode.CLOSED, ErrorCode.BACKEND_LOST, ErrorCode.SEND_FAILED} <= set(ErrorCode)
    assert [str(code) for code in (ErrorCode.CLOSED, ErrorCode.BACKEND_LOST,
                                   ErrorCode.SEND_FAILED)] == ["closed", "backend_lost",
                                                               "send_failed"]
