"""The engine interface: a third engine plugs in by registering, the segmenter refuses what an
engine's capabilities exclude, and the whole-raster pipeline runs on any engine as a library."""

from __future__ import annotations

import numpy as np
import pyogrio
import pytest
import rasterio
import torch
from affine import Affine

from unigeoseg_backend.engines.base import (
    Capabilities,
    Engine,
    EngineSettings,
    Prediction,
    TilePrompt,
)
from unigeoseg_backend.errors import (
    CancelledError,
    EmptyPromptError,
    EngineUnavailableError,
    InvalidInputError,
)
from unigeoseg_backend.pipelines.whole_raster import RasterRunOptions, segment_raster
from unigeoseg_backend.segmenter import CancelToken, EngineOffer, EngineRegistry, Segmenter
from unigeoseg_protocol import Georeference, Prompt, RasterOptions, SegmentOptions

UTM_TILE = Georeference("EPSG:32633", (500000.0, 0.5, 0.0, 4100000.0, 0.0, -0.5))


class BrightEngine(Engine):
    """A model-free third engine, registered like the real ones: the mask is the bright
    pixels (referring prompts), or the bright pixels inside the box (interactive)."""

    name = "bright"
    title = "Bright"
    capabilities = Capabilities(tasks=("referring", "interactive"), box=True, text=True)

    def __init__(self, device: str = "cpu") -> None:
        self.device = torch.device(device)  # only says where it would run
        self.encodes = 0

    @classmethod
    def loader(cls, settings: EngineSettings):
        if settings.model != "bright":
            raise EngineUnavailableError("the bright engine needs --model bright")
        return cls

    @property
    def model_id(self) -> str:
        return "bright-1"

    def encode(self, rgb: np.ndarray) -> np.ndarray:
        self.encodes += 1
        return rgb.mean(axis=2)

    def _decode(self, embedding: np.ndarray, prompt: TilePrompt) -> Prediction:
        mask = embedding > 128
        if prompt.box is not None:
            c0, r0, c1, r1 = (int(round(v)) for v in prompt.box)
            inside = np.zeros_like(mask)
            inside[r0:r1, c0:c1] = True
            mask &= inside
        return Prediction(mask=mask, score=0.75, low_res_logits=None)


def _map_xy(col: float, row: float) -> tuple[float, float]:
    return tuple(Affine.from_gdal(*UTM_TILE.geotransform) @ (col, row))


def _tile() -> np.ndarray:
    pixels = np.full((64, 96, 3), 20, np.uint8)
    pixels[10:30, 20:50] = 240
    pixels[40:60, 60:90] = 240
    return pixels


@pytest.fixture
def segmenter() -> Segmenter:
    return Segmenter(EngineRegistry([EngineOffer(BrightEngine, load=BrightEngine)]))


def test_a_registered_engine_answers_through_the_segmenter_and_encodes_once(segmenter):
    record = segmenter.add_image(_tile(), UTM_TILE, RasterOptions())
    text = segmenter.segment(record, Prompt(text="bright roofs"),
                             SegmentOptions(engine="bright", return_mask=True))
    assert text.engine == "bright" and text.model == "bright-1"
    assert len(text.features["features"]) == 2 and text.mask.sum() == 20 * 30 + 20 * 30
    box = segmenter.segment(record, Prompt(box=(*_map_xy(15, 35), *_map_xy(55, 5))),
                            SegmentOptions(engine="bright", return_mask=True))
    assert box.mask.sum() == 20 * 30  # only the roof inside the box
    assert box.features["features"][0]["properties"]["task"] == "interactive"
    assert segmenter.engines.get("bright").encodes == 1 and segmenter.encode_count == 1
    assert segmenter.engines.tasks("bright") == ["referring", "interactive"]


def test_prompts_outside_the_capabilities_are_refused_in_words(segmenter):
    record = segmenter.add_image(_tile(), UTM_TILE, RasterOptions())
    with pytest.raises(EngineUnavailableError, match="Bright answers box and text prompts "
                                                     "only, not reasoning"):
        segmenter.segment(record, Prompt(text="where to swim", task="reasoning"),
                          SegmentOptions(engine="bright"))
    assert segmenter.engines.loaded() == {}  # refused before the engine loaded
    with pytest.raises(EngineUnavailableError, match="not configured"):
        segmenter.segment(record, Prompt(text="roofs"), SegmentOptions(engine="sam"))


def test_capabilities_check_points_and_empty_prompts():
    limited = Capabilities(tasks=("interactive",), points=True, max_points=2)
    one = np.array([[1.0, 1.0]])
    limited.check(TilePrompt("interactive", points=one, labels=np.array([1])), "Limited")
    with pytest.raises(InvalidInputError, match="foreground points only"):
        limited.check(TilePrompt("interactive", points=one, labels=np.array([0])), "Limited")
    with pytest.raises(InvalidInputError, match="at most 2 foreground points"):
        limited.check(TilePrompt("interactive", points=np.ones((3, 2)),
                                 labels=np.ones(3, np.int64)), "Limited")
    with pytest.raises(EmptyPromptError):
        limited.check(TilePrompt("interactive"), "Limited")
    with pytest.raises(EmptyPromptError):
        Capabilities(tasks=("referring",), text=True).check(TilePrompt("referring"), "T")


def test_the_registry_offers_what_the_loaders_allow():
    offers = []
    for settings in (EngineSettings("cpu"), EngineSettings("cpu", model="bright")):
        try:
            offers.append(EngineOffer(BrightEngine, load=BrightEngine.loader(settings)))
        except EngineUnavailableError as exc:
            offers.append(EngineOffer(BrightEngine, unavailable=exc.message))
    assert EngineRegistry(offers[:1]).reasons_unavailable() == {
        "bright": "the bright engine needs --model bright"}
    assert EngineRegistry(offers[1:]).available() == ["bright"]


def test_engines_without_batching_segment_tiles_one_by_one():
    engine = BrightEngine()
    predictions = engine.segment_tiles([_tile(), _tile()[:32]], TilePrompt("referring", "x"))
    assert [p.mask.shape for p in predictions] == [(64, 96), (32, 96)]
    assert engine.encodes == 2


# -- the whole-raster pipeline as a library ---------------------------------------------------

@pytest.fixture
def raster(tmp_path):
    """300 x 200 RGB uint8, EPSG:32633, 0.5 m; bright blocks across tile seams."""
    path = tmp_path / "scene.tif"
    data = np.full((3, 200, 300), 20, np.uint8)
    data[:, 40:160, 50:250] = 240
    data[:, 180:190, 10:20] = 240
    with rasterio.open(path, "w", driver="GTiff", width=300, height=200, count=3,
                       dtype="uint8", crs="EPSG:32633",
                       transform=Affine(0.5, 0, 500000.0, 0, -0.5, 4100000.0)) as dst:
        dst.write(data)
    return path


@pytest.mark.parametrize("device", ["cpu", "cuda"])  # cuda: reading and vectorizing on threads
def test_segment_raster_merges_seams_reports_progress_and_writes_the_output(raster, tmp_path,
                                                                            device):
    out = tmp_path / "out.gpkg"
    seen = []
    summary = segment_raster(raster, Prompt(text="bright"), BrightEngine(device), out,
                             RasterRunOptions(tile=96, overlap=16, batch_size=4),
                             progress=lambda done, total, text: seen.append((done, total)))
    assert summary.polygons == 2 and summary.tiles == seen[-1][1] == seen[-1][0]
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)
    frame = pyogrio.read_dataframe(out)
    assert sorted(frame.geometry.area) == [10 * 10 * 0.25, 120 * 200 * 0.25]
    assert (frame["engine"] == "bright").all() and (frame["score"] == 0.75).all()
    assert str(summary).startswith(f"2 polygon(s) written to {out}")


def test_a_cancelled_or_refused_run_writes_nothing(raster, tmp_path):
    token = CancelToken()
    token.cancel()
    with pytest.raises(CancelledError):
        segment_raster(raster, Prompt(text="bright"), BrightEngine(), tmp_path / "a.gpkg",
                       cancel=token)
    with pytest.raises(EngineUnavailableError, match="not reasoning"):
        segment_raster(raster, Prompt(text="why", task="reasoning"), BrightEngine(),
                       tmp_path / "b.gpkg")
    with pytest.raises(InvalidInputError, match="text prompt only"):
        segment_raster(raster, Prompt(text="x", box=(0, 0, 1, 1)), BrightEngine(),
                       tmp_path / "c.gpkg")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scene.tif"]
