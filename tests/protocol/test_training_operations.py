"""The fine-tuning operations' request and reply types (train_upload, train_start,
train_status, train_cancel) and the engine names of fine-tuned models."""

from __future__ import annotations

import numpy as np
import pytest

from unigeoseg_protocol import (
    ErrorCode,
    Georeference,
    Message,
    ProtocolError,
    SegmentOptions,
    SetImageRequest,
    TrainCancelRequest,
    TrainEvent,
    TrainJobReply,
    TrainStartRequest,
    TrainStatusRequest,
    TrainUploadReply,
    TrainUploadRequest,
    decode_message,
    encode_message,
    engine_family,
    fine_tuned_engine,
    is_engine,
    ok_header,
    request_header,
)
from unigeoseg_protocol.operations import MAX_UPLOAD_CHUNK_BYTES, REQUEST_TYPES


def _sent(request) -> Message:
    params, arrays = request.to_wire()
    return decode_message(encode_message(request_header(request.OP, "r1", params), arrays))


def _raw(op: str, params: dict, arrays: dict | None = None) -> Message:
    return decode_message(encode_message(request_header(op, "r1", params), arrays),
                          max_bytes=64 << 20)


def _parsed(op: str, params: dict, arrays: dict | None = None):
    return REQUEST_TYPES[op].from_message(_raw(op, params, arrays))


def _answered(reply) -> Message:
    result, arrays = reply.to_wire()
    return decode_message(encode_message(ok_header("r1", result), arrays))


def test_a_fine_tuned_model_is_an_engine_name_of_its_family():
    engine = fine_tuned_engine("default", "red-roofs")
    assert engine == "default:red-roofs" and engine_family(engine) == "default"
    assert is_engine(engine) and is_engine("default") and is_engine("sam")
    for bad in ("default:", "default:../x", "sam:red-roofs", "nope", "default:a b", 3):
        assert not is_engine(bad), bad


def test_requests_may_name_a_fine_tuned_engine():
    pixels = np.zeros((4, 4, 3), np.uint8)
    request = SetImageRequest(pixels, Georeference("EPSG:32633", (0, 1, 0, 0, 0, -1)),
                              engine="default:red-roofs")
    assert SetImageRequest.from_message(_sent(request)).engine == "default:red-roofs"
    assert SegmentOptions.from_wire({"engine": "default:red-roofs"}).engine == \
        "default:red-roofs"
    with pytest.raises(ProtocolError) as refused:
        SegmentOptions.from_wire({"engine": "default:../../etc"})
    assert refused.value.code == ErrorCode.INVALID_ARGUMENT


def test_train_upload_travels_unchanged():
    data = np.frombuffer(b"\x89PNG....", np.uint8)
    request = TrainUploadRequest("u1", "images/0.png", data, offset=0)
    received = TrainUploadRequest.from_message(_sent(request))
    assert (received.upload, received.path, received.offset) == ("u1", "images/0.png", 0)
    assert received.data.tobytes() == data.tobytes()


@pytest.mark.parametrize("path", ["/etc/passwd", "../x.png", "a/../../x.png", "a/./x.png",
                                  ".hidden.png", "a//x.png", "x.exe", "C:/x.png", "a\\x.png",
                                  "a/b/c/d/e.png", "x" * 300 + ".png", ""])
def test_train_upload_refuses_paths_outside_the_chip_set(path):
    with pytest.raises(ProtocolError) as refused:
        _parsed("train_upload", {"upload": "u1", "path": path},
                {"data": np.zeros(4, np.uint8)})
    assert refused.value.code == ErrorCode.INVALID_ARGUMENT, refused.value.message


def test_train_upload_refuses_a_piece_over_the_chunk_bound_and_a_bad_frame():
    with pytest.raises(ProtocolError) as refused:
        _parsed("train_upload", {"upload": "u1", "path": "train.jsonl"},
                {"data": np.zeros(MAX_UPLOAD_CHUNK_BYTES + 1, np.uint8)})
    assert refused.value.code == ErrorCode.PAYLOAD_TOO_LARGE
    with pytest.raises(ProtocolError) as refused:
        _parsed("train_upload", {"upload": "u1", "path": "train.jsonl"},
                {"data": np.zeros((2, 2), np.uint8)})
    assert refused.value.code == ErrorCode.BAD_FRAME
    with pytest.raises(ProtocolError) as refused:
        _parsed("train_upload", {"upload": "../u", "path": "train.jsonl"},
                {"data": np.zeros(2, np.uint8)})
    assert refused.value.code == ErrorCode.INVALID_ARGUMENT


def test_train_start_travels_unchanged():
    request = TrainStartRequest("red-roofs", upload="u1", max_steps=40, max_seconds=120.0)
    assert TrainStartRequest.from_message(_sent(request)) == request
    local = TrainStartRequest("trees", base="default:red-roofs", chips_dir="/tmp/chips",
                              max_steps=5)
    assert TrainStartRequest.from_message(_sent(local)) == local
    by_epochs = TrainStartRequest("trees", upload="u2", epochs=2.5)
    assert TrainStartRequest.from_message(_sent(by_epochs)) == by_epochs


@pytest.mark.parametrize("params", [
    {"name": "../x", "upload": "u1", "max_steps": 4},            # not a model name
    {"name": "x", "max_steps": 4},                                # no chips
    {"name": "x", "upload": "u1", "chips_dir": "/c", "max_steps": 4},  # both
    {"name": "x", "upload": "u1"},                                # no budget
    {"name": "x", "upload": "u1", "max_steps": 0},
    {"name": "x", "upload": "u1", "max_steps": 2.5},
    {"name": "x", "upload": "u1", "max_seconds": -1},
    {"name": "x", "upload": "u1", "epochs": 0},
    {"name": "x", "upload": "u1", "max_steps": 4, "base": "default:../y"},
])
def test_train_start_refuses_bad_params_in_words(params):
    with pytest.raises(ProtocolError) as refused:
        _parsed("train_start", params)
    assert refused.value.code == ErrorCode.INVALID_ARGUMENT, refused.value.message


def test_train_status_and_cancel_travel_unchanged():
    status = TrainStatusRequest("j1", after=7)
    assert TrainStatusRequest.from_message(_sent(status)) == status
    cancel = TrainCancelRequest("j1")
    assert TrainCancelRequest.from_message(_sent(cancel)) == cancel
    with pytest.raises(ProtocolError):
        _parsed("train_status", {"job": "j1", "after": -1})


def test_training_replies_travel_unchanged():
    upload = TrainUploadReply("u1", "train.jsonl", 120, 3, 4000)
    assert TrainUploadReply.from_message(_answered(upload)) == upload
    job = TrainJobReply(
        job="j1", name="red-roofs", base="default", state="succeeded", step=40, max_steps=40,
        elapsed_s=61.5, loss=0.42, eta_s=None, before_iou=0.1, after_iou=0.6,
        engine="default:red-roofs", data={"chips": 8, "objects": 8},
        events=(TrainEvent(0, 1.0, val_iou=0.1), TrainEvent(1, 2.5, loss=3.2)), cursor=2)
    received = TrainJobReply.from_message(_answered(job))
    assert received == job and received.finished


def test_a_training_reply_in_an_unknown_state_is_a_bad_message():
    result = TrainJobReply(job="j1", name="x", base="default", state="running").to_result()
    result["state"] = "exploded"
    with pytest.raises(ProtocolError) as refused:
        TrainJobReply.from_result(result)
    assert refused.value.code == ErrorCode.BAD_MESSAGE
