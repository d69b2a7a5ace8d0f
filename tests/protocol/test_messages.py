"""The wire format: encoding, decoding and every way a message can be malformed."""

from __future__ import annotations

import json

import numpy as np
import pytest

from unigeoseg_protocol import (
    PROTOCOL_VERSION,
    WIRE_DTYPES,
    ErrorCode,
    Georeference,
    Prompt,
    ProtocolError,
    RasterOptions,
    SegmentOptions,
    decode_message,
    encode_message,
    request_header,
)


def _raw(header: dict, *frames: bytes) -> list[bytes]:
    return [json.dumps(header).encode(), *frames]


@pytest.mark.parametrize("dtype", WIRE_DTYPES)
def test_arrays_round_trip_bit_exactly_for_every_wire_dtype(dtype):
    rng = np.random.default_rng(1)
    array = (rng.random((5, 7, 3)) * 100).astype(dtype)
    frames = encode_message(request_header("set_image", "r1"), {"pixels": array})
    message = decode_message([bytes(f) for f in frames])
    assert message.op == "set_image" and message.id == "r1"
    np.testing.assert_array_equal(message.arrays["pixels"], array)
    assert message.arrays["pixels"].dtype == np.dtype(dtype)


def test_big_endian_and_non_contiguous_arrays_travel_as_little_endian_c_order():
    array = np.arange(24, dtype=">u2").reshape(4, 6)[:, ::2]
    message = decode_message([bytes(f) for f in encode_message({"id": "a"}, {"m": array})])
    np.testing.assert_array_equal(message.arrays["m"], array)


def test_empty_arrays_are_allowed():
    message = decode_message([bytes(f) for f in encode_message({"id": "a"},
                                                               {"m": np.zeros((0, 3))})])
    assert message.arrays["m"].shape == (0, 3)


@pytest.mark.parametrize("frames, code", [
    ([], ErrorCode.BAD_MESSAGE),
    ([b"\xff\xfe not utf8"], ErrorCode.BAD_MESSAGE),
    ([b"{not json"], ErrorCode.BAD_MESSAGE),
    ([b"[1, 2]"], ErrorCode.BAD_MESSAGE),
    (_raw({"v": 1}), ErrorCode.BAD_MESSAGE),                       # no id
    (_raw({"v": 1, "id": ""}), ErrorCode.BAD_MESSAGE),
    (_raw({"id": "x"}), ErrorCode.BAD_MESSAGE),                    # no version
    (_raw({"v": 99, "id": "x"}), ErrorCode.UNSUPPORTED_VERSION),
    (_raw({"v": 1, "id": "x", "params": [1]}), ErrorCode.BAD_MESSAGE),
    ([b'{"v": 1, "id": "x", "params": {"a": NaN}}'], ErrorCode.BAD_MESSAGE),
    (_raw({"v": 1, "id": "x", "arrays": {"p": {"frame": 1, "dtype": "uint8",
                                               "shape": [2, 2]}}}), ErrorCode.BAD_FRAME),
    (_raw({"v": 1, "id": "x", "arrays": {"p": {"frame": 1, "dtype": "uint8", "shape": [2, 2]}}},
          b"123"), ErrorCode.BAD_FRAME),                             # 3 bytes, needs 4
    (_raw({"v": 1, "id": "x", "arrays": {"p": {"frame": 1, "dtype": "float16",
                                               "shape": [2]}}}, b"1234"), ErrorCode.BAD_FRAME),
    (_raw({"v": 1, "id": "x", "arrays": {"p": {"frame": 1, "dtype": "object",
                                               "shape": [1]}}}, b"12345678"), ErrorCode.BAD_FRAME),
    (_raw({"v": 1, "id": "x", "arrays": {"p": {"frame": 1, "dtype": "uint8",
                                               "shape": [-1]}}}, b"1"), ErrorCode.BAD_FRAME),
    (_raw({"v": 1, "id": "x", "arrays": {"p": {"frame": 0, "dtype": "uint8",
                                               "shape": [1]}}}, b"1"), ErrorCode.BAD_FRAME),
    (_raw({"v": 1, "id": "x"}, b"undescribed"), ErrorCode.BAD_FRAME),
    (_raw({"v": 1, "id": "x", "arrays": {
        "a": {"frame": 1, "dtype": "uint8", "shape": [1]},
        "b": {"frame": 1, "dtype": "uint8", "shape": [1]}}}, b"1"), ErrorCode.BAD_FRAME),
])
def test_malformed_messages_raise_the_documented_code(frames, code):
    with pytest.raises(ProtocolError) as info:
        decode_message(frames)
    assert info.value.code == code


def test_errors_after_the_id_is_known_carry_the_request_id():
    with pytest.raises(ProtocolError) as info:
        decode_message(_raw({"v": 7, "id": "req-9"}))
    assert info.value.request_id == "req-9"


def test_payload_over_the_cap_is_refused_before_parsing():
    frames = _raw({"v": PROTOCOL_VERSION, "id": "x"}, b"0" * 2000)
    with pytest.raises(ProtocolError) as info:
        decode_message(frames, max_bytes=1000)
    assert info.value.code == ErrorCode.PAYLOAD_TOO_LARGE
    assert info.value.details["max_bytes"] == 1000


def test_params_round_trip_through_their_wire_form():
    georef = Georeference("EPSG:32633", (500000.0, 0.5, 0.0, 4100000.0, 0.0, -0.5))
    prompt = Prompt(points=((1.0, 2.0), (3.0, 4.0)), labels=(1, 0), box=(0.0, 0.0, 5.0, 5.0),
                    crs="EPSG:4326", object_key="obj-1")
    options = SegmentOptions(engine="sam", multimask=False, simplify=0.5, min_area=2.0,
                             output_crs="EPSG:3857", return_mask=True)
    raster = RasterOptions(bands=(2, 1, 0), nodata=0.0, stretch="minmax")
    assert Georeference.from_wire(georef.to_wire()) == georef
    assert Prompt.from_wire(prompt.to_wire()) == prompt
    assert SegmentOptions.from_wire(options.to_wire()) == options
    assert RasterOptions.from_wire(raster.to_wire()) == raster


@pytest.mark.parametrize("wire, code", [
    ({}, ErrorCode.EMPTY_PROMPT),
    ({"text": "   "}, ErrorCode.EMPTY_PROMPT),
    ({"points": [], "task": "interactive"}, ErrorCode.EMPTY_PROMPT),
    ({"text": "a pond", "task": "interactive"}, ErrorCode.EMPTY_PROMPT),
    ({"points": [[1, 2]], "task": "referring"}, ErrorCode.EMPTY_PROMPT),
    ({"points": [[1, "a"]]}, ErrorCode.INVALID_ARGUMENT),
    ({"points": [[1, 2, 3]]}, ErrorCode.INVALID_ARGUMENT),
    ({"points": [[1, 2]], "labels": [2]}, ErrorCode.INVALID_ARGUMENT),
    ({"points": [[1, 2]], "labels": [1, 1]}, ErrorCode.INVALID_ARGUMENT),
    ({"points": [[1e400, 2]]}, ErrorCode.INVALID_ARGUMENT),
    ({"box": [5, 5, 1, 1]}, ErrorCode.INVALID_ARGUMENT),
    ({"box": [1, 1, 5]}, ErrorCode.INVALID_ARGUMENT),
    ({"text": "x", "task": "dreaming"}, ErrorCode.INVALID_ARGUMENT),
    ({"text": "x" * 2001}, ErrorCode.INVALID_ARGUMENT),
    ("points", ErrorCode.INVALID_ARGUMENT),
])
def test_bad_prompts_are_refused_with_a_typed_error(wire, code):
    with pytest.raises(ProtocolError) as info:
        Prompt.from_wire(wire)
    assert info.value.code == code


def test_prompt_task_defaults_follow_the_prompt_kind():
    assert Prompt.from_wire({"points": [[1, 2]]}).task == "interactive"
    assert Prompt.from_wire({"text": "the pond"}).task == "referring"
    assert Prompt.from_wire({"points": [[1, 2]]}).labels == (1,)


@pytest.mark.parametrize("wire", [
    None, {"crs": "EPSG:4326"}, {"crs": "", "geotransform": [0, 1, 0, 0, 0, -1]},
    {"crs": "EPSG:4326", "geotransform": [0, 1, 0, 0, 0]},
    {"crs": "EPSG:4326", "geotransform": [0, 0, 0, 0, 0, 0]},
    {"crs": "EPSG:4326", "geotransform": [0, 1, 0, 0, 0, "x"]},
])
def test_bad_georeferences_are_invalid_arguments(wire):
    with pytest.raises(ProtocolError) as info:
        Georeference.from_wire(wire)
    assert info.value.code == ErrorCode.INVALID_ARGUMENT


@pytest.mark.parametrize("wire", [
    {"engine": "magic"}, {"simplify": -1}, {"multimask": "yes"}, {"return_mask": 1}, [1],
])
def test_bad_options_are_invalid_arguments(wire):
    with pytest.raises(ProtocolError) as info:
        SegmentOptions.from_wire(wire)
    assert info.value.code == ErrorCode.INVALID_ARGUMENT


def test_large_json_results_are_not_limited_by_a_header_cap():
    features = {"coordinates": [[i * 0.5, i * 0.25] for i in range(200_000)]}  # ~3.6 MB of JSON
    frames = [bytes(f) for f in encode_message({"id": "r", "ok": True, "result": features})]
    assert len(frames[0]) > 2 * 1024 * 1024
    assert decode_message(frames).header["result"] == features


def test_a_header_over_the_cap_is_payload_too_large():
    frames = [json.dumps({"v": 1, "id": "r", "pad": "x" * 5000}).encode()]
    with pytest.raises(ProtocolError) as info:
        decode_message(frames, max_bytes=1000)
    assert info.value.code == ErrorCode.PAYLOAD_TOO_LARGE


def test_prompts_built_in_python_default_their_task_like_wire_prompts():
    assert Prompt(text="the pond").task == "referring"
    assert Prompt(points=((1.0, 2.0),)).task == "interactive"
    assert Prompt(text="the pond", task="reasoning").task == "reasoning"


def test_a_fixed_value_range_round_trips_and_bad_ones_are_refused_in_words():
    raster = RasterOptions(bands=(2, 1, 0), value_range=((100.0, 900.0), (0.0, 1.0), (5, 6)))
    assert RasterOptions.from_wire(raster.to_wire()) == raster
    for bad, words in ((["x"], "pairs"), ([[1, 2], [3, 4]], "pairs"),
                       ([[5, 1], [0, 1], [0, 1]], "below"), ([[0, float("nan")]], "finite")):
        with pytest.raises(ProtocolError, match=words):
            RasterOptions.from_wire({"range": bad})
    with pytest.raises(ProtocolError, match="3 bands"):
        RasterOptions.from_wire({"bands": [0, 1, 2], "range": [[0, 1]]})
