"""Default-model benchmark: per 512 px tile, on the CPU threads given (2 by default).

Measures, for one configuration of the default model (random weights, seeded, written and
loaded through the weights folder as the engine does):
  * encode: resampling and the image encoder on a 512 x 512 tile already at the trained
    pixel size (``DefaultEngine.encode``);
  * decode per prompt: text (through the phrase vocabulary), one click, a box, text with a
    click (``DefaultEngine.decode`` on the cached embedding: the vocabulary match, the mask
    decoder, sampling onto the tile grid, the click's region);
  * end to end through the Segmenter: the first prompt on a new tile (upload, encode, decode,
    polygons) and a second prompt on it (features reused);
  * encode on a 512 x 512 tile at 30 m (resampled to the trained pixel size first).

Text goes through the real all-MiniLM-L6-v2 when its package is installed (each phrase's
first embedding is not timed: the encoder caches phrases); otherwise the run says so and uses
fixed random vectors. It prints numbers and never passes or fails on time.

    python benchmarks/bench_default_model.py [--config default-v1] [--threads 2] [--repeats 20]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from unigeoseg_backend.default_model.network import build_default_model, parameter_count
from unigeoseg_backend.default_model.text_encoder import DEFAULT_CLASSES, PhraseVocabulary
from unigeoseg_backend.default_model.weights_io import (
    ClassCard,
    GsdRange,
    ModelCard,
    save_default_model,
)
from unigeoseg_backend.engines.base import EngineSettings, TilePrompt
from unigeoseg_backend.engines.default_engine import DefaultEngine
from unigeoseg_backend.geo.grid import TileGrid
from unigeoseg_backend.runtime import build_engines
from unigeoseg_backend.segmenter import Segmenter
from unigeoseg_protocol.params import Georeference, Prompt, RasterOptions, SegmentOptions

TILE = 512
TRAINED = GsdRange(8.0, 12.0)


class RandomVectors:
    """A stand-in text encoder (when MiniLM is not installed): a fixed vector per phrase."""

    def encode(self, phrases):
        rng = np.random.default_rng(0)
        return np.stack([rng.standard_normal(384).astype(np.float32) for _ in phrases]) \
            if phrases else np.zeros((0, 384), np.float32)


def text_vocabulary() -> tuple[PhraseVocabulary, str]:
    try:
        from unigeoseg_backend.default_model.text_encoder import default_text_encoder

        return PhraseVocabulary(default_text_encoder()), "all-MiniLM-L6-v2"
    except Exception as exc:  # noqa: BLE001 - any missing piece: say so and go on
        return PhraseVocabulary(RandomVectors()), f"random vectors ({exc})"


def timed(fn, repeats: int) -> tuple[float, object]:
    """Median milliseconds of ``repeats`` calls (after one warm-up), and the last result."""
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
    parser.add_argument("--config", default="default-v1")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    folder = Path(tempfile.mkdtemp(prefix="bench_default_model_"))
    model = build_default_model(args.config)
    card = save_default_model(model, ModelCard(
        name=args.config, version="bench", config=args.config,
        weights_file=f"{args.config}.safetensors", sha256="",
        text_encoder={"name": "all-MiniLM-L6-v2"}, gsd=TRAINED,
        classes=tuple(ClassCard(c.name, TRAINED) for c in DEFAULT_CLASSES)), folder)
    weights = folder / card.weights_file
    vocabulary, text_source = text_vocabulary()
    engine = DefaultEngine.loader(EngineSettings(torch.device("cpu"), default_model=folder))()
    engine._vocabulary = vocabulary
    print(f"{args.config}: {parameter_count(model):,} parameters, "
          f"{weights.stat().st_size / 1e6:.2f} MB safetensors; {args.threads} threads; "
          f"text: {text_source}")

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

    print(f"encode, 512 px at the trained 10 m:        {encode_ms:7.1f} ms")
    print(f"encode, 512 px at 30 m (-> "
          f"{resampled.resampling.model_shape[0]} px at 12 m): {encode_30m_ms:7.1f} ms")
    for name, ms in decode_ms.items():
        print(f"decode per prompt, {name:14}           {ms:7.1f} ms")
    print(f"end to end, first prompt on a new tile:    {statistics.median(first[1:]):7.1f} ms "
          f"(upload, encode, decode, polygons)")
    print(f"end to end, second prompt (features kept): {statistics.median(second[1:]):7.1f} ms")


if __name__ == "__main__":
    main()
