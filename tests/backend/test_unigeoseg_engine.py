"""The UniGeoSeg text engine: in process, in a real ``unigeoseg serve``, and in ``predict``.

A tiny configuration of the real model (random weights, seeded) with a tiny byte-level BPE
tokenizer is saved in the released layout with ``save_released`` and loaded back by the code
under test, so every test runs the very code a real model runs, only narrower.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pyogrio
import pytest
import rasterio
import rasterio.features
import torch
from affine import Affine
from shapely.geometry import shape
from tests.conftest import start_backend

from unigeoseg_backend.engines.base import EngineSettings, Prediction, TilePrompt
from unigeoseg_backend.engines.unigeoseg_engine import UniGeoSegEngine, model_dtype
from unigeoseg_backend.errors import EngineUnavailableError, InvalidInputError, WeightsError
from unigeoseg_backend.model.preprocess import logits_to_tile
from unigeoseg_backend.segmenter import EngineOffer, EngineRegistry, Segmenter
from unigeoseg_protocol import TASKS, Georeference, Prompt, RemoteError, SegmentOptions
from unigeoseg_protocol.client import Client

UTM_TILE = Georeference("EPSG:32633", (500000.0, 0.3, 0.0, 4100000.0, 0.0, -0.3))
TEXT = "the warehouse with the blue roof"


def _tile(height=200, width=300, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    pixels = (rng.random((height, width, 3)) * 60).astype(np.uint8)
    pixels[height // 4:height // 2, width // 3:2 * width // 3] = (40, 90, 230)
    return pixels


def _map_xy(georef: Georeference, col: float, row: float) -> tuple[float, float]:
    return tuple(Affine.from_gdal(*georef.geotransform) @ (col, row))


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    from unigeoseg_backend.model.checkpoint import load_released

    return load_released(tiny_model_dir, device="cpu")


@pytest.fixture
def engine(loaded):
    return UniGeoSegEngine(loaded, torch.device("cpu"))


class CountingEngine:
    """The real engine, with its encoder runs counted."""

    def __init__(self, engine: UniGeoSegEngine):
        self._engine = engine
        self.name, self.capabilities, self.encodes = engine.name, engine.capabilities, 0

    @property
    def model_id(self) -> str:
        return self._engine.model_id

    def encode(self, rgb):
        self.encodes += 1
        return self._engine.encode(rgb)

    def decode(self, *args, **kwargs):
        return self._engine.decode(*args, **kwargs)


def _registry(engine) -> EngineRegistry:
    return EngineRegistry([EngineOffer(UniGeoSegEngine, load=lambda: engine)])


# ---------------------------------------------------------------------- (a) in process


def test_engine_reports_its_name_model_tasks_and_dtype(engine, loaded):
    assert engine.name == "unigeoseg" and engine.model_id == loaded.name
    assert set(engine.capabilities.tasks) == set(TASKS)
    assert tuple(engine.capabilities.tasks) == ("referring", "reasoning", "interactive")
    assert model_dtype(torch.device("cpu")) == torch.float32
    assert model_dtype(torch.device("cuda")) == torch.bfloat16
    assert engine.model.dtype == torch.float32


def test_bfloat16_weights_run_and_agree_with_float32(engine, tiny_model_dir):
    """The dtype the engine gets on CUDA, run here on the CPU."""
    from unigeoseg_backend.model.checkpoint import load_released

    half = UniGeoSegEngine(load_released(tiny_model_dir, device="cpu", dtype=torch.bfloat16),
                           torch.device("cpu"))
    assert half.model.dtype == torch.bfloat16
    rgb = _tile(seed=4)
    prompt = TilePrompt(text=TEXT, task="referring")
    full = engine.decode(engine.encode(rgb), prompt)
    low = half.decode(half.encode(rgb), prompt)
    assert low.mask.shape == full.mask.shape and low.mask.dtype == bool
    assert (low.mask == full.mask).mean() > 0.98
    assert low.score == pytest.approx(full.score, abs=0.02)


@pytest.mark.parametrize("height, width", [(200, 300), (300, 200), (128, 128), (37, 501)])
def test_masks_are_on_the_tile_grid_whatever_its_shape(engine, height, width):
    embedding = engine.encode(_tile(height, width))
    assert (embedding.letterbox.height, embedding.letterbox.width) == (height, width)
    assert embedding.nbytes == embedding.vision.nbytes > 0
    prediction = engine.decode(embedding, TilePrompt(text=TEXT, task="referring"))
    assert isinstance(prediction, Prediction)
    assert prediction.mask.shape == (height, width) and prediction.mask.dtype == bool
    assert isinstance(prediction.low_res_logits, torch.Tensor)


def test_score_is_the_mean_sigmoid_inside_the_mask(engine):
    embedding = engine.encode(_tile())
    prediction = engine.decode(embedding, TilePrompt(text=TEXT, task="reasoning"))
    logits = logits_to_tile(prediction.low_res_logits[0, 0], embedding.letterbox)
    np.testing.assert_array_equal(prediction.mask, (logits > 0).numpy())
    inside = torch.sigmoid(logits[logits > 0])
    expected = float(inside.mean()) if inside.numel() else 0.0
    assert prediction.score == pytest.approx(expected, abs=1e-6)
    assert 0.0 <= prediction.score <= 1.0


def test_three_tasks_on_one_tile_encode_it_once(engine):
    counting = CountingEngine(engine)
    segmenter = Segmenter(_registry(counting))
    pixels = _tile(seed=1)
    record = segmenter.add_image(pixels, UTM_TILE, _raster())
    prompts = [Prompt(text=TEXT, task="referring"),
               Prompt(text="areas where people could swim", task="reasoning"),
               Prompt(points=(_map_xy(UTM_TILE, 150, 50),), task="interactive"),
               Prompt(box=(*_map_xy(UTM_TILE, 30, 150), *_map_xy(UTM_TILE, 120, 20)),
                      task="interactive", text="the blue roof")]
    for prompt in prompts:
        result = segmenter.segment(record, prompt,
                                   SegmentOptions(engine="unigeoseg", return_mask=True))
        assert result.mask.shape == pixels.shape[:2] and result.mask.dtype == np.uint8
        assert result.engine == "unigeoseg" and result.model == engine.model_id
        assert result.features["type"] == "FeatureCollection"
        for feature in result.features["features"]:
            assert feature["properties"]["task"] == prompt.task
    assert counting.encodes == 1 and segmenter.encode_count == 1


def test_set_image_with_engine_unigeoseg_encodes_with_it(engine):
    counting = CountingEngine(engine)
    segmenter = Segmenter(_registry(counting))
    first = segmenter.set_image(_tile(seed=2), UTM_TILE, _raster(), engine_name="unigeoseg")
    assert first.engine == "unigeoseg" and first.embedding == "computed"
    assert first.model == engine.model_id
    result = segmenter.segment(segmenter.get_image(first.image_id),
                               Prompt(text=TEXT, task="referring"),
                               SegmentOptions())  # a text task picks unigeoseg by default
    assert result.timings_ms["encode_ms"] == 0.0
    assert counting.encodes == 1


def test_interactive_instruction_uses_normalised_foreground_points_and_box(engine):
    embedding = engine.encode(_tile(200, 300))
    text = engine.instruction(embedding, TilePrompt(
        task="interactive", points=np.array([[150.0, 50.0], [10.0, 10.0]]),
        labels=np.array([1, 0])))
    assert text.endswith("point [0.500,0.250].")
    text = engine.instruction(embedding, TilePrompt(
        task="interactive", text="with [x] roof", points=np.array([[150.0, 50.0]]),
        labels=np.array([1]), box=np.array([30.0, 20.0, 120.0, 150.0])))
    assert "box x0,y0=[0.100,0.100], x1,y1=[0.400,0.750]." in text  # the box wins
    assert text.endswith("with (x) roof")


@pytest.mark.parametrize("points, labels, message", [
    ([[10.0, 10.0], [20.0, 20.0]], [0, 0], "foreground points only"),
    ([[10.0, 10.0]] * 4, [1, 1, 1, 1], "at most 3 foreground points"),
])
def test_interactive_prompts_unigeoseg_cannot_express_are_refused(engine, points, labels,
                                                                   message):
    embedding = engine.encode(_tile())
    with pytest.raises(InvalidInputError, match=message) as info:
        engine.decode(embedding, TilePrompt(task="interactive", points=np.array(points),
                                            labels=np.array(labels)))
    assert info.value.code == "invalid_argument"


def test_sam_is_not_asked_text_and_the_text_engine_needs_a_model(tiny_sam_checkpoint):
    from unigeoseg_backend.runtime import build_engines

    segmenter = Segmenter(build_engines(EngineSettings(torch.device("cpu"), tiny_sam_checkpoint,
                                                       "tiny")))
    record = segmenter.add_image(_tile(), UTM_TILE, _raster())
    with pytest.raises(EngineUnavailableError, match="SAM answers point and box"):
        segmenter.segment(record, Prompt(text=TEXT, task="referring"),
                          SegmentOptions(engine="sam"))
    with pytest.raises(EngineUnavailableError, match="--model"):
        segmenter.segment(record, Prompt(text=TEXT, task="referring"),
                          SegmentOptions(engine="unigeoseg"))


def test_a_model_name_resolves_in_the_weights_cache(tmp_path, monkeypatch):
    from unigeoseg_backend.weights import resolve_model

    monkeypatch.setenv("UNIGEOSEG_CACHE_DIR", str(tmp_path))
    with pytest.raises(WeightsError, match="no UniGeoSeg model 'unigeoseg-x'"):
        resolve_model("unigeoseg-x")
    with pytest.raises(WeightsError, match="does not exist"):
        resolve_model(str(tmp_path / "nowhere" / "model"))
    cached = tmp_path / "weights" / "models" / "unigeoseg-x"
    cached.mkdir(parents=True)
    assert resolve_model("unigeoseg-x") == cached
    assert resolve_model(str(cached)) == cached


def _raster():
    from unigeoseg_protocol.params import RasterOptions

    return RasterOptions()


# ---------------------------------------------------------------------- (b) the service


@pytest.fixture(scope="module")
def text_backend(tmp_path_factory, tiny_model_dir, tiny_sam_checkpoint):
    backend = start_backend(tmp_path_factory.mktemp("text-backend"), "--model",
                            str(tiny_model_dir), "--sam-type", "tiny", "--sam-checkpoint",
                            str(tiny_sam_checkpoint))
    yield backend
    backend.stop()


def test_hello_lists_the_text_engine_with_its_tasks(text_backend, loaded):
    with Client(text_backend.address, timeout_s=30) as client:
        hello = client.hello().to_result()
    assert hello["engines"]["unigeoseg"] == {
        "available": True, "loaded": True, "model": loaded.name,
        "tasks": ["referring", "reasoning", "interactive"]}
    assert hello["engines"]["sam"]["tasks"] == ["interactive"]


def test_text_segment_returns_polygons_that_rasterise_to_the_mask(text_backend, loaded):
    pixels = _tile(256, 320, seed=3)
    with Client(text_backend.address, timeout_s=60) as client:
        image_id = client.set_image(pixels, UTM_TILE, engine="unigeoseg").image_id
        encodes = client.status().encodes
        reply = client.segment(Prompt(text=TEXT, task="referring"),
                               SegmentOptions(return_mask=True), image_id=image_id)
        again = client.segment(Prompt(text="areas where people could swim", task="reasoning"),
                               image_id=image_id)
        assert client.status().encodes == encodes  # both prompts reuse the tile's features
    result = reply.to_result()
    assert result["engine"] == "unigeoseg" and result["model"] == loaded.name
    assert again.timings_ms["encode_ms"] == 0.0
    mask = reply.mask
    assert mask.shape == pixels.shape[:2] and mask.dtype == np.uint8
    assert 0 < mask.sum() < mask.size, "the seeded tiny model should give a non-trivial mask"
    features = result["features"]
    assert features["type"] == "FeatureCollection"
    burned = rasterio.features.rasterize(
        [(shape(f["geometry"]), 1) for f in features["features"]], out_shape=mask.shape,
        transform=Affine.from_gdal(*UTM_TILE.geotransform), dtype=np.uint8)
    np.testing.assert_array_equal(burned, mask)
    props = features["features"][0]["properties"]
    assert props["engine"] == "unigeoseg" and props["task"] == "referring"
    assert props["prompt"] == TEXT and props["score"] == result["score"]


def test_a_text_prompt_for_sam_still_gets_engine_unavailable(text_backend):
    with Client(text_backend.address, timeout_s=30) as client:
        with pytest.raises(RemoteError) as info:
            client.segment(Prompt(text=TEXT, task="referring"), SegmentOptions(engine="sam"),
                           pixels=_tile(), georeference=UTM_TILE)
        assert info.value.code == "engine_unavailable"
        with pytest.raises(RemoteError) as info:  # four foreground points
            client.segment(Prompt(points=(_map_xy(UTM_TILE, 10, 10),) * 4),
                           SegmentOptions(engine="unigeoseg"), pixels=_tile(),
                           georeference=UTM_TILE)
        assert info.value.code == "invalid_argument" and "at most 3" in info.value.message
        assert client.hello().protocol_version == 1


def _serve(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "unigeoseg_backend.cli.main", "serve",
                           "--address", "tcp://127.0.0.1:*", "--device", "cpu", *args],
                          capture_output=True, text=True, timeout=120)


def test_a_bad_model_dir_stops_serve_with_a_message(tmp_path, tiny_model_dir):
    empty = tmp_path / "empty-model"
    empty.mkdir()
    result = _serve("--model", str(empty))
    assert result.returncode == 1
    assert str(empty) in result.stderr and "Traceback" not in result.stderr
    missing = tmp_path / "no" / "such-model"
    result = _serve("--model", str(missing))
    assert result.returncode == 1
    assert "does not exist" in result.stderr and str(missing) in result.stderr


# ---------------------------------------------------------------------- (c) predict

ORIGIN = (600000.0, 5200000.0)


@pytest.fixture
def geotiff(tmp_path):
    """A 900 x 700 RGB uint8 UTM 32N GeoTIFF, 2 m pixels."""
    path = tmp_path / "scene.tif"
    rng = np.random.default_rng(5)
    data = (rng.random((3, 700, 900)) * 80).astype(np.uint8)
    data[:, 300:400, 400:520] = 220
    profile = dict(driver="GTiff", width=900, height=700, count=3, dtype="uint8",
                   crs="EPSG:32632", transform=Affine(2.0, 0, ORIGIN[0], 0, -2.0, ORIGIN[1]))
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
    return path


def _predict(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "unigeoseg_backend.cli.main", "predict", *args],
                          capture_output=True, text=True, timeout=300, env=env)


def test_predict_text_writes_a_geopackage_of_the_centre_window(geotiff, tmp_path,
                                                               tiny_model_dir, loaded,
                                                               text_backend):
    out = tmp_path / "text.gpkg"
    result = _predict(str(geotiff), "--text", TEXT, "--model", str(tiny_model_dir),
                      "--device", "cpu", "-o", str(out))
    assert result.returncode == 0, result.stderr
    frame = pyogrio.read_dataframe(out)
    assert len(frame) >= 1
    assert (frame["task"] == "referring").all() and (frame["prompt"] == TEXT).all()
    assert (frame["engine"] == "unigeoseg").all() and (frame["model"] == loaded.name).all()
    # Everything lies in the 512 px window at the raster's centre, on its 2 m grid.
    col0, row0 = (900 - 512) // 2, (700 - 512) // 2
    minx, miny, maxx, maxy = frame.total_bounds
    assert minx >= ORIGIN[0] + 2.0 * col0 and maxx <= ORIGIN[0] + 2.0 * (col0 + 512)
    assert maxy <= ORIGIN[1] - 2.0 * row0 and miny >= ORIGIN[1] - 2.0 * (row0 + 512)
    # The same through the running service.
    remote = tmp_path / "remote.gpkg"
    result = _predict(str(geotiff), "--text", TEXT, "--server", text_backend.address,
                      "-o", str(remote))
    assert result.returncode == 0, result.stderr
    other = pyogrio.read_dataframe(remote)
    assert frame.geometry.union_all().equals(other.geometry.union_all())


def test_predict_reasoning_text_around_a_point(geotiff, tmp_path, tiny_model_dir):
    out = tmp_path / "reason.gpkg"
    x, y = ORIGIN[0] + 2.0 * 120, ORIGIN[1] - 2.0 * 100
    result = _predict(str(geotiff), "--text", "areas where people could swim", "--task",
                      "reasoning", "--point", f"{x},{y}", "--window", "256", "--model",
                      str(tiny_model_dir), "--device", "cpu", "-o", str(out))
    assert result.returncode == 0, result.stderr
    frame = pyogrio.read_dataframe(out)
    assert (frame["task"] == "reasoning").all()
    # The 256 px window around the point, pushed against the raster's top-left corner.
    minx, miny, maxx, maxy = frame.total_bounds
    assert minx >= ORIGIN[0] and maxx <= ORIGIN[0] + 2.0 * 256
    assert maxy <= ORIGIN[1] and miny >= ORIGIN[1] - 2.0 * 256


def test_predict_text_without_a_unigeoseg_model_is_answered_by_the_default_model(geotiff,
                                                                                 tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "UNIGEOSEG_MODEL"}
    result = _predict(str(geotiff), "--text", TEXT, "--device", "cpu",
                      "-o", str(tmp_path / "x.gpkg"), env=env)
    print(result.stdout)
    assert result.returncode == 0 and "Traceback" not in result.stderr
    assert "engine default" in result.stdout
    # the shipped default model knows no warehouses: no polygons, and it says so
    assert "0 polygon(s)" in result.stdout and "does not segment" in result.stdout


def test_predict_text_uses_the_configured_default_model(geotiff, tmp_path, tiny_model_dir):
    out = tmp_path / "default.gpkg"
    env = {k: v for k, v in os.environ.items() if k != "UNIGEOSEG_MODEL"}
    env["UNIGEOSEG_MODEL"] = str(tiny_model_dir)
    result = _predict(str(geotiff), "--text", TEXT, "--device", "cpu", "-o", str(out), env=env)
    assert result.returncode == 0, result.stderr
    frame = pyogrio.read_dataframe(out)
    assert (frame["prompt"] == TEXT).all()
