"""A real ``unigeoseg serve`` process (tiny SAM) talked to over real ZeroMQ from this process."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import rasterio.features
import zmq
from affine import Affine
from shapely.geometry import shape

from unigeoseg_protocol import (
    EngineInfo,
    Georeference,
    HelloReply,
    Prompt,
    RemoteError,
    SegmentOptions,
    SegmentRequest,
    ShutdownReply,
)
from unigeoseg_protocol.client import Client
from unigeoseg_protocol.messages import decode_message

# A 30 cm UTM 33N tile whose top-left corner is at (500000, 4100000).
UTM_TILE = Georeference("EPSG:32633", (500000.0, 0.3, 0.0, 4100000.0, 0.0, -0.3))


def _tile(height=256, width=320, seed=0) -> np.ndarray:
    """A tile with a bright square on a darker textured background."""
    rng = np.random.default_rng(seed)
    pixels = (rng.random((height, width, 3)) * 60).astype(np.uint8)
    pixels[60:140, 100:200] = (230, 220, 40)
    return pixels


def _map_xy(georef: Georeference, col: float, row: float) -> list[float]:
    return list(Affine.from_gdal(*georef.geotransform) @ (col, row))


@pytest.fixture
def client(tiny_backend):
    with Client(tiny_backend.address, timeout_s=30) as c:
        yield c


def test_hello_reports_protocol_engines_and_device(client):
    wire = client.request("hello").message.header["result"]
    assert wire["protocol_version"] == 1
    assert wire["engines"]["sam"] == {"available": True, "loaded": True, "model": "sam_tiny",
                                      "tasks": ["interactive"]}
    assert wire["engines"]["unigeoseg"]["available"] is False
    assert wire["device"] == "cpu" and wire["gpu"] is None
    hello = client.hello()
    assert hello == HelloReply.from_result(wire) and hello.to_result() == wire
    assert hello.engine("sam") == EngineInfo(available=True, loaded=True, model="sam_tiny",
                                             tasks=("interactive",))


def test_second_click_on_the_same_tile_never_re_encodes(client):
    pixels = _tile(seed=1)
    first = client.set_image(pixels, UTM_TILE)
    again = client.set_image(pixels, UTM_TILE)
    assert first.embedding == "computed" and again.embedding == "cached"
    assert first.image_id == again.image_id
    encodes = client.status().encodes
    for col, row in [(150, 100), (120, 80), (10, 10)]:
        reply = client.segment(Prompt(points=(tuple(_map_xy(UTM_TILE, col, row)),)),
                               image_id=first.image_id)
        assert reply.timings_ms["encode_ms"] == 0.0
    assert client.status().encodes == encodes


def test_polygons_rasterise_back_to_the_returned_mask_exactly(client):
    pixels = _tile(seed=2)
    reply = client.segment(Prompt(points=(tuple(_map_xy(UTM_TILE, 150.5, 100.5)),)),
                           SegmentOptions(return_mask=True), pixels=pixels,
                           georeference=UTM_TILE)
    mask = reply.mask
    assert mask.shape == pixels.shape[:2] and mask.dtype == np.uint8
    assert 0 < mask.sum() < mask.size, "the seeded tiny SAM should give a non-trivial mask"
    features = reply.features
    assert features["type"] == "FeatureCollection"
    geoms = [shape(f["geometry"]) for f in features["features"]]
    burned = rasterio.features.rasterize(
        [(g, 1) for g in geoms], out_shape=mask.shape,
        transform=Affine.from_gdal(*UTM_TILE.geotransform), dtype=np.uint8)
    np.testing.assert_array_equal(burned, mask)
    props = features["features"][0]["properties"]
    assert set(props) >= {"score", "engine", "model", "task", "prompt", "created"}
    assert props["engine"] == "sam" and props["task"] == "interactive"


def test_output_crs_reprojects_the_same_polygons(client):
    from pyproj import Transformer

    pixels = _tile(seed=3)
    prompt = Prompt(points=(tuple(_map_xy(UTM_TILE, 150, 100)),))
    utm = client.segment(prompt, pixels=pixels, georeference=UTM_TILE)
    wgs = client.segment(prompt, SegmentOptions(output_crs="EPSG:4326"), pixels=pixels,
                         georeference=UTM_TILE)
    to_wgs = Transformer.from_crs("EPSG:32633", "EPSG:4326", always_xy=True)
    utm_ring = np.array(utm.features["features"][0]["geometry"]["coordinates"][0])
    wgs_ring = np.array(wgs.features["features"][0]["geometry"]["coordinates"][0])
    expected = np.column_stack(to_wgs.transform(utm_ring[:, 0], utm_ring[:, 1]))
    np.testing.assert_allclose(wgs_ring, expected, rtol=0, atol=1e-12)


def test_points_given_in_another_crs_land_on_the_same_pixel(client):
    from pyproj import Transformer

    pixels = _tile(seed=4)
    x, y = _map_xy(UTM_TILE, 150.5, 100.5)
    lon, lat = Transformer.from_crs("EPSG:32633", "EPSG:4326", always_xy=True).transform(x, y)
    native = client.segment(Prompt(points=((x, y),)), SegmentOptions(return_mask=True),
                            pixels=pixels, georeference=UTM_TILE)
    foreign = client.segment(Prompt(points=((lon, lat),), crs="EPSG:4326"),
                             SegmentOptions(return_mask=True), pixels=pixels,
                             georeference=UTM_TILE)
    np.testing.assert_array_equal(native.mask, foreign.mask)


def test_nan_and_nodata_pixels_never_become_polygons(client):
    pixels = _tile(seed=5).astype(np.float32)
    pixels[:, :160] = np.nan
    reply = client.segment(Prompt(points=(tuple(_map_xy(UTM_TILE, 200, 100)),)),
                           SegmentOptions(return_mask=True), pixels=pixels,
                           georeference=UTM_TILE)
    assert reply.mask[:, :160].sum() == 0


def test_sixteen_bit_multiband_tiles_are_segmented(client):
    rng = np.random.default_rng(6)
    pixels = (rng.random((200, 200, 5)) * 4000).astype(np.uint16)
    reply = client.segment(Prompt(points=(tuple(_map_xy(UTM_TILE, 20, 30)),)),
                           SegmentOptions(return_mask=True), pixels=pixels,
                           georeference=UTM_TILE)
    assert reply.mask.shape == (200, 200)


def test_object_key_feeds_the_previous_mask_back(client):
    pixels = _tile(seed=7)
    image_id = client.set_image(pixels, UTM_TILE).image_id
    first_point = tuple(_map_xy(UTM_TILE, 150, 100))
    plain = client.segment(Prompt(points=(first_point,)), SegmentOptions(return_mask=True),
                           image_id=image_id)
    client.segment(Prompt(points=(first_point,), object_key="obj"),
                   SegmentOptions(return_mask=True), image_id=image_id)
    refined = client.segment(Prompt(points=(first_point,), object_key="obj"),
                             SegmentOptions(return_mask=True), image_id=image_id)
    # Same point, but the second call with the key also sees the first call's mask logits.
    assert not np.array_equal(plain.mask, refined.mask) or plain.score != refined.score


# ---------------------------------------------------------------------- bad input


def _raw_request(address: str, frames: list[bytes], timeout_ms: int = 10000) -> dict:
    context = zmq.Context.instance()
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(address)
    try:
        sock.send_multipart(frames)
        assert sock.poll(timeout_ms), "the backend did not answer"
        return decode_message(sock.recv_multipart()).header
    finally:
        sock.close()


GOOD_GEO = UTM_TILE.to_wire()
PIXELS = {"pixels": {"frame": 1, "dtype": "uint8", "shape": [64, 64, 3]}}
PIXEL_BYTES = bytes(64 * 64 * 3)


def _req(params, op="segment", arrays=PIXELS, v=1):
    return json.dumps({"v": v, "id": "bad-1", "op": op, "params": params,
                       "arrays": arrays}).encode()


@pytest.mark.parametrize("frames, code", [
    ([b"\x00\x01garbage"], "bad_message"),
    ([b'{"v": 1, "op": "hello"}'], "bad_message"),
    ([b'{"v": 2, "id": "x", "op": "hello"}'], "unsupported_version"),
    ([b'{"v": 1, "id": "x", "op": "explode"}'], "unknown_op"),
    ([_req({"georeference": GOOD_GEO, "prompt": {"points": [[500001, 4099999]]}})],
     "bad_frame"),  # pixels frame missing
    ([_req({"georeference": GOOD_GEO, "prompt": {"points": [[500001, 4099999]]}},
           arrays={"pixels": {"frame": 1, "dtype": "complex64", "shape": [8]}}), bytes(64)],
     "bad_frame"),
    ([_req({"georeference": GOOD_GEO, "prompt": {"points": [[500001, 4099999]]}},
           arrays={"pixels": {"frame": 1, "dtype": "uint8", "shape": [4096]}}), bytes(4096)],
     "bad_frame"),  # 1-D pixels
    ([_req({"georeference": GOOD_GEO, "prompt": {"points": [[500001, 4099999]]}}),
      PIXEL_BYTES[:-1]], "bad_frame"),
    ([_req({"georeference": {"crs": "EPSG:999999", "geotransform": GOOD_GEO["geotransform"]},
            "prompt": {"points": [[500001, 4099999]]}}), PIXEL_BYTES], "unknown_crs"),
    ([_req({"georeference": {"crs": "not a crs at all", "geotransform":
                             GOOD_GEO["geotransform"]},
            "prompt": {"points": [[500001, 4099999]]}}), PIXEL_BYTES], "unknown_crs"),
    ([_req({"georeference": GOOD_GEO, "prompt": {"points": [[400000, 4099999]]}}),
      PIXEL_BYTES], "out_of_bounds"),
    ([_req({"georeference": GOOD_GEO, "prompt": {"box": [0, 0, 1, 1]}}), PIXEL_BYTES],
     "out_of_bounds"),
    ([_req({"georeference": GOOD_GEO, "prompt": {}}), PIXEL_BYTES], "empty_prompt"),
    ([_req({"georeference": GOOD_GEO, "prompt": {"text": ""}}), PIXEL_BYTES], "empty_prompt"),
    ([_req({"georeference": GOOD_GEO, "prompt": {"text": "the blue warehouse"},
            "options": {"engine": "unigeoseg"}}), PIXEL_BYTES], "engine_unavailable"),
    ([_req({"image_id": "0123456789abcdef", "prompt": {"points": [[1, 2]]}}, arrays={})],
     "unknown_image"),
    ([_req({"georeference": GOOD_GEO, "prompt": {"points": [[500001, 4099999]]},
            "options": {"output_crs": "EPSG:0"}}), PIXEL_BYTES], "unknown_crs"),
    ([_req({"georeference": GOOD_GEO, "prompt": {"points": [[500001, 4099999]]},
            "raster": {"bands": [7]}}), PIXEL_BYTES], "invalid_argument"),
    ([_req({"georeference": GOOD_GEO}, op="set_image",
           arrays={"pixels": {"frame": 1, "dtype": "float32", "shape": [8, 8]}}),
      np.full((8, 8), np.nan, np.float32).tobytes()], "no_valid_pixels"),
    ([b'{"v": 1, "id": "t", "op": "segment", "timeout_ms": -5, "params": {"image_id": "x",'
      b' "prompt": {"points": [[1, 2]]}}}'], "invalid_argument"),
])
def test_bad_input_gets_a_typed_error_and_the_service_keeps_serving(tiny_backend, frames, code):
    header = _raw_request(tiny_backend.address, frames)
    assert header["ok"] is False
    assert header["error"]["code"] == code, header
    assert header["error"]["message"]
    with Client(tiny_backend.address) as c:
        assert c.hello().protocol_version == 1
    assert tiny_backend.process.poll() is None


def test_payload_over_the_cap_gets_payload_too_large(tiny_backend):
    big = np.zeros((2048, 2048, 3), np.uint8)  # 12 MiB, over the fixture's 8 MiB cap
    with Client(tiny_backend.address) as c:
        with pytest.raises(RemoteError) as info:
            c.set_image(big, UTM_TILE)
        assert info.value.code == "payload_too_large"
        assert c.hello().protocol_version == 1


def test_a_request_past_its_deadline_gets_timeout(tiny_backend):
    pixels = _tile(1024, 1024, seed=8)
    with Client(tiny_backend.address) as c:
        request_id = c.send("segment", {
            "georeference": UTM_TILE.to_wire(),
            "prompt": Prompt(points=(tuple(_map_xy(UTM_TILE, 5, 5)),)).to_wire()},
            {"pixels": pixels}, timeout_s=0.001)
        with pytest.raises(RemoteError) as info:
            c.receive(request_id, timeout_s=30)
        assert info.value.code == "timeout"
        assert c.hello().protocol_version == 1


def _send_burst(client: Client, seeds: range) -> list[str]:
    """Send one 1024 px segment request per seed without waiting; returns their ids."""
    params = {"georeference": UTM_TILE.to_wire(),
              "prompt": Prompt(points=(tuple(_map_xy(UTM_TILE, 5, 5)),)).to_wire()}
    return [client.send("segment", params, {"pixels": _tile(1024, 1024, seed=seed)})
            for seed in seeds]


def _final_codes(client: Client, ids: list[str]) -> list[str]:
    """"ok" or the error code of each request's final reply, in order."""
    codes = []
    for request_id in ids:
        try:
            client.receive(request_id, timeout_s=60)
            codes.append("ok")
        except RemoteError as exc:
            codes.append(str(exc.code))
    return codes


def test_cancel_stops_a_queued_request(tiny_backend):
    with Client(tiny_backend.address, timeout_s=60) as c:
        ids = _send_burst(c, range(20, 26))
        cancelled = c.cancel(ids[-1])
        codes = _final_codes(c, ids)
        # The first five were not cancelled; the last one was still waiting behind them.
        assert codes[:5] == ["ok"] * 5
        assert cancelled.cancelled is True and codes[5] == "cancelled"
        assert c.hello().protocol_version == 1


def test_full_queue_is_refused_with_queue_full(backend_factory, tiny_sam_checkpoint):
    backend = backend_factory("--sam-type", "tiny", "--sam-checkpoint", str(tiny_sam_checkpoint),
                              "--queue-size", "1")
    with Client(backend.address, timeout_s=60) as c:
        codes = _final_codes(c, _send_burst(c, range(40, 52)))
        assert set(codes) <= {"ok", "queue_full"}
        assert codes[0] == "ok" and "queue_full" in codes
        reply = c.request("segment", *SegmentRequest(
            Prompt(points=(tuple(_map_xy(UTM_TILE, 5, 5)),)), pixels=_tile(seed=99),
            georeference=UTM_TILE).to_wire())
        assert reply.message.header["ok"]


def test_sigterm_shuts_the_service_down_cleanly(backend_factory, tiny_sam_checkpoint):
    backend = backend_factory("--sam-type", "tiny", "--sam-checkpoint", str(tiny_sam_checkpoint))
    with Client(backend.address) as c:
        c.hello()
    assert backend.stop() == 0
    assert '"shutting down"' in backend.log()


def test_shutdown_op_stops_the_service(backend_factory, tiny_sam_checkpoint):
    backend = backend_factory("--sam-type", "tiny", "--sam-checkpoint", str(tiny_sam_checkpoint))
    with Client(backend.address) as c:
        assert c.shutdown() == ShutdownReply(stopping=True)
    assert backend.process.wait(timeout=30) == 0


def test_logs_are_json_lines_naming_the_request(tiny_backend):
    with Client(tiny_backend.address) as c:
        request_id = c.send("segment", {
            "georeference": UTM_TILE.to_wire(),
            "prompt": Prompt(points=(tuple(_map_xy(UTM_TILE, 5, 5)),)).to_wire()},
            {"pixels": _tile(seed=11)})
        c.receive(request_id)
    lines = [json.loads(line) for line in tiny_backend.log().splitlines() if line.strip()]
    mine = [line for line in lines if line.get("request_id") == request_id]
    assert {line["msg"] for line in mine} >= {"request", "request done"}
    assert all(line["op"] == "segment" for line in mine)
    assert any("elapsed_ms" in line for line in mine)


def test_serving_on_a_non_loopback_address_without_curve_is_refused():
    result = subprocess.run(
        [sys.executable, "-m", "unigeoseg_backend.cli.main", "serve",
         "--address", "tcp://0.0.0.0:5999", "--device", "cpu"],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "refusing to listen on tcp://0.0.0.0:5999" in result.stderr


def test_a_bad_checkpoint_stops_serve_with_a_message_naming_the_tensors(tmp_path):
    import torch

    bad = tmp_path / "bad.pth"
    torch.save({"image_encoder.pos_embed": torch.zeros(1)}, bad)
    result = subprocess.run(
        [sys.executable, "-m", "unigeoseg_backend.cli.main", "serve", "--address",
         "tcp://127.0.0.1:*", "--device", "cpu", "--sam-type", "tiny", "--sam-checkpoint",
         str(bad)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "does not fit SAM tiny" in result.stderr and "missing" in result.stderr
