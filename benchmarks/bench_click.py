"""Click-path benchmark: what an analyst waits for between a click and a polygon.

Measures, for each SAM configuration (random weights, seeded):
  * transport: a raw ZeroMQ round trip of a 1024 x 1024 RGB tile (no backend logic);
  * protocol: ``set_image`` of an already-cached tile through the service (framing,
    validation, content hash, cache lookup);
  * encode: the image encoder on a 1024 x 1024 tile, in process;
  * bare decoder: prompt encoder + mask decoder + upsampling, in process (``SamEngine.decode``);
  * click through the service with a cached embedding, end to end (request to GeoJSON reply),
    split into decode, polygonize (+ reprojection and GeoJSON) and the rest (transport,
    validation, queueing);
and, side by side on one GeoTIFF with the same random vit_b checkpoint: segment-geospatial
(``SamGeo.set_image`` + ``predict`` + ``raster_to_vector``, run in its own venv), ``unigeoseg
predict``, and a first click through the service (encode included).

It prints numbers and ratios and never passes or fails on time. The same command runs on a GPU.

    python benchmarks/bench_click.py --models tiny,vit_b [--samgeo-python .venv-samgeo/bin/python]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import rasterio
import torch
import zmq
from affine import Affine

from unigeoseg_backend.engines.base import TilePrompt
from unigeoseg_backend.engines.sam import SAM_CONFIGS, SamEngine, build_sam
from unigeoseg_backend.geo.crs import parse_crs
from unigeoseg_backend.geo.vectorize import (
    feature_collection,
    mask_to_polygons,
    reproject_geometries,
)
from unigeoseg_backend.runtime import device_info, select_device
from unigeoseg_protocol import Georeference, Prompt
from unigeoseg_protocol.client import Client
from unigeoseg_protocol.messages import decode_message, encode_message, ok_header, request_header

HERE = Path(__file__).resolve().parent
TILE = 1024
GEOREF = Georeference("EPSG:32633", (500000.0, 0.5, 0.0, 4100000.0, 0.0, -0.5))


def make_tile(size: int = TILE, seed: int = 0) -> np.ndarray:
    """Textured background with a few bright rectangles and a disc: several objects to click."""
    rng = np.random.default_rng(seed)
    tile = (rng.random((size, size, 3)) * 70).astype(np.uint8)
    tile[200:420, 300:560] = (220, 200, 60)
    tile[600:700, 100:900] = (60, 120, 220)
    yy, xx = np.mgrid[:size, :size]
    tile[(yy - 800) ** 2 + (xx - 300) ** 2 < 90 ** 2] = (230, 230, 230)
    return tile


def map_xy(col: float, row: float) -> tuple[float, float]:
    return tuple(Affine.from_gdal(*GEOREF.geotransform) @ (col, row))


def median_ms(fn, repeats: int, sync=None) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def object_mask_pipeline_ms(tile: np.ndarray, repeats: int) -> dict:
    """Non-model work of a click on a realistic mask (the tile's white disc, one object):
    polygonize, reproject to EPSG:4326, GeoJSON, reply framing and parsing.

    Random weights give speckled masks (hundreds of polygons, tens of thousands of vertices)
    that no trained model produces, so this is measured on a real object's footprint too.
    """
    mask = (tile == 230).all(axis=2)
    transform = Affine.from_gdal(*GEOREF.geotransform)
    src, dst = parse_crs(GEOREF.crs), parse_crs("EPSG:4326")
    state = {}

    def polygonize():
        polygons = mask_to_polygons(mask, transform)
        polygons = reproject_geometries(polygons, src, dst)
        state["features"] = feature_collection(polygons, {"score": 0.9}, dst)

    def frame():
        state["frames"] = [bytes(f) for f in encode_message(
            ok_header("x", {"features": state["features"]}))]

    def parse():
        decode_message(state["frames"])

    polygonize_ms = median_ms(polygonize, repeats)
    frame_ms = median_ms(frame, repeats)
    parse_ms = median_ms(parse, repeats)
    vertices = sum(len(ring) for f in state["features"]["features"]
                   for ring in f["geometry"]["coordinates"])
    return {"object_polygonize_ms": polygonize_ms, "object_reply_frame_ms": frame_ms,
            "object_reply_parse_ms": parse_ms, "object_vertices": vertices}


def write_checkpoint(sam_type: str, folder: Path) -> Path:
    torch.manual_seed(0)
    path = folder / f"sam_{sam_type}_random.pth"
    torch.save(build_sam(SAM_CONFIGS[sam_type]).state_dict(), path)
    return path


def start_service(checkpoint: Path, sam_type: str, device: str, log: Path):
    command = [sys.executable, "-m", "unigeoseg_backend.cli.main", "serve", "--address",
               "tcp://127.0.0.1:*", "--sam-type", sam_type, "--sam-checkpoint",
               str(checkpoint), "--device", device, "--log-level", "WARNING"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=open(log, "wb"))
    line = process.stdout.readline().decode()
    if not line.startswith("unigeoseg serving on "):
        process.kill()
        raise RuntimeError(f"service did not start: {line!r}\n{log.read_text()}")
    return process, line.rsplit(" ", 1)[1].strip()


def raw_zmq_round_trip_ms(tile: np.ndarray, repeats: int) -> float:
    """Transport floor: a ROUTER thread that echoes a small header back for each tile."""
    context = zmq.Context.instance()
    router = context.socket(zmq.ROUTER)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    stop = threading.Event()

    def echo():
        poller = zmq.Poller()
        poller.register(router, zmq.POLLIN)
        while not stop.is_set():
            if poller.poll(50):
                frames = router.recv_multipart(copy=False)
                router.send_multipart([frames[0], b'{"ok":true}'])

    thread = threading.Thread(target=echo, daemon=True)
    thread.start()
    dealer = context.socket(zmq.DEALER)
    dealer.connect(f"tcp://127.0.0.1:{port}")
    frames = encode_message(request_header("set_image", "x"), {"pixels": tile})

    def once():
        dealer.send_multipart(frames, copy=False)
        dealer.recv_multipart()

    once()
    result = median_ms(once, repeats)
    stop.set()
    thread.join()
    dealer.close(0)
    router.close(0)
    return result


def bench_model(sam_type: str, device: torch.device, repeats: int, workdir: Path) -> dict:
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    checkpoint = write_checkpoint(sam_type, workdir)
    tile = make_tile()
    engine = SamEngine.from_checkpoint(checkpoint, sam_type, device)
    encode_repeats = 1 if (device.type == "cpu" and sam_type != "tiny") else 5
    engine.encode(tile)  # warm-up (allocations, cuDNN autotune)
    if sync:
        sync()
    encode_ms = median_ms(lambda: engine.encode(tile), encode_repeats, sync)
    embedding = engine.encode(tile)
    click = TilePrompt(task="interactive", points=np.array([[430.5, 310.5]]),
                       labels=np.array([1]))
    engine.decode(embedding, click)
    bare_ms = median_ms(lambda: engine.decode(embedding, click), repeats, sync)
    engine = embedding = None  # free the in-process model before the service loads its own

    process, address = start_service(checkpoint, sam_type, str(device), workdir / "svc.log")
    try:
        with Client(address, timeout_s=600) as client:
            first = time.perf_counter()
            image_id = client.set_image(tile, GEOREF).image_id
            first_set_image_ms = (time.perf_counter() - first) * 1000
            protocol_ms = median_ms(lambda: client.set_image(tile, GEOREF), repeats)
            encodes_before = client.status().encodes
            prompt = Prompt(points=(map_xy(430.5, 310.5),))
            samples = []
            for _ in range(repeats + 1):
                start = time.perf_counter()
                reply = client.segment(prompt, image_id=image_id)
                total = (time.perf_counter() - start) * 1000
                samples.append((total, reply))
            samples = samples[1:]  # first click warms the decoder path in the service
            re_encodes = client.status().encodes - encodes_before
            service_round_trip_ms = median_ms(client.status, repeats)
            client.shutdown()
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    totals = [s[0] for s in samples]
    decode = [s[1].timings_ms["decode_ms"] for s in samples]
    polygonize = [s[1].timings_ms["polygonize_ms"] for s in samples]
    click_ms = statistics.median(totals)
    realistic = object_mask_pipeline_ms(tile, repeats)
    # A click whose mask is a real object: service round trip + polygonize + reply framing.
    realistic_non_model = (service_round_trip_ms + realistic["object_polygonize_ms"]
                           + realistic["object_reply_frame_ms"]
                           + realistic["object_reply_parse_ms"])
    decode_ms = statistics.median(decode)
    polygonize_ms = statistics.median(polygonize)
    return {
        "sam_type": sam_type, "transport_ms": raw_zmq_round_trip_ms(tile, repeats),
        "protocol_set_image_cached_ms": protocol_ms, "encode_ms": encode_ms,
        "first_set_image_ms": first_set_image_ms, "bare_decoder_ms": bare_ms,
        "click_end_to_end_ms": click_ms, "click_decode_ms": decode_ms,
        "click_polygonize_ms": polygonize_ms,
        "click_other_ms": click_ms - decode_ms - polygonize_ms,
        "non_model_ms": click_ms - decode_ms,
        "click_over_bare_plus_5ms": click_ms / (bare_ms + 5.0),
        "re_encodes_on_later_clicks": re_encodes,
        "random_mask_polygons": len(samples[-1][1].features["features"]),
        "service_round_trip_ms": service_round_trip_ms, **realistic,
        "object_click_non_model_ms": realistic_non_model,
        "object_click_over_bare_plus_5ms": (bare_ms + realistic_non_model) / (bare_ms + 5.0),
    }


def write_geotiff(path: Path, tile: np.ndarray) -> None:
    profile = dict(driver="GTiff", width=tile.shape[1], height=tile.shape[0], count=3,
                   dtype="uint8", crs=GEOREF.crs,
                   transform=Affine.from_gdal(*GEOREF.geotransform))
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(np.moveaxis(tile, -1, 0))


def side_by_side(device: torch.device, workdir: Path, samgeo_python: str | None) -> dict:
    """One click on a fresh 1024 x 1024 GeoTIFF with the same random vit_b checkpoint."""
    checkpoint = workdir / "sam_vit_b_random.pth"
    if not checkpoint.exists():
        write_checkpoint("vit_b", workdir)
    raster = workdir / "scene.tif"
    write_geotiff(raster, make_tile(seed=5))
    x, y = map_xy(430.5, 310.5)
    out = {}

    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "unigeoseg_backend.cli.main", "predict", str(raster),
                    "-o", str(workdir / "predict.gpkg"), "--point", f"{x},{y}", "--overwrite",
                    "--sam-checkpoint", str(checkpoint), "--device", str(device)],
                   check=True, capture_output=True)
    out["unigeoseg_predict_s"] = time.perf_counter() - start

    process, address = start_service(checkpoint, "vit_b", str(device), workdir / "svc2.log")
    try:
        with rasterio.open(raster) as ds:
            pixels = np.moveaxis(ds.read(), 0, -1)
        with Client(address, timeout_s=600) as client:
            start = time.perf_counter()
            client.segment(Prompt(points=((x, y),)), pixels=pixels, georeference=GEOREF)
            out["service_first_click_s"] = time.perf_counter() - start
            start = time.perf_counter()
            client.segment(Prompt(points=((x + 20, y),)), pixels=pixels, georeference=GEOREF)
            out["service_next_click_s"] = time.perf_counter() - start
            client.shutdown()
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()

    if samgeo_python:
        result = subprocess.run([samgeo_python, str(HERE / "samgeo_click.py"), str(raster),
                                 str(checkpoint), str(x), str(y), "EPSG:32633", str(device),
                                 str(workdir / "samgeo")], capture_output=True, text=True)
        if result.returncode == 0:
            out["samgeo"] = json.loads(result.stdout.strip().splitlines()[-1])
        else:
            out["samgeo_error"] = result.stderr[-2000:]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny,vit_b")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--samgeo-python", help="a Python with segment-geospatial installed")
    parser.add_argument("--skip-side-by-side", action="store_true")
    parser.add_argument("--out", type=Path, help="also write the results as JSON here")
    args = parser.parse_args()

    device = select_device(args.device)
    results = {"machine": {"platform": platform.platform(), "cpu_threads": torch.get_num_threads(),
                           **device_info(device)}, "models": []}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        for sam_type in args.models.split(","):
            row = bench_model(sam_type, device, args.repeats, workdir)
            results["models"].append(row)
            print(json.dumps(row, indent=1), flush=True)
        if not args.skip_side_by_side:
            results["side_by_side"] = side_by_side(device, workdir, args.samgeo_python)
            print(json.dumps(results["side_by_side"], indent=1), flush=True)
    print_table(results)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1))


def print_table(results: dict) -> None:
    print(f"\nmachine: {results['machine']}")
    keys = ["transport_ms", "protocol_set_image_cached_ms", "encode_ms", "bare_decoder_ms",
            "click_end_to_end_ms", "click_decode_ms", "click_polygonize_ms", "click_other_ms",
            "non_model_ms", "click_over_bare_plus_5ms", "re_encodes_on_later_clicks",
            "random_mask_polygons", "service_round_trip_ms", "object_polygonize_ms",
            "object_reply_frame_ms", "object_reply_parse_ms", "object_vertices",
            "object_click_non_model_ms", "object_click_over_bare_plus_5ms"]
    names = [m["sam_type"] for m in results["models"]]
    print("| metric | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for key in keys:
        values = [m[key] for m in results["models"]]
        print(f"| {key} | " + " | ".join(f"{v:.2f}" if isinstance(v, float) else str(v)
                                          for v in values) + " |")
    side = results.get("side_by_side")
    if side:
        print("\nside by side, one click on a fresh 1024 x 1024 GeoTIFF, random vit_b:")
        for key, value in side.items():
            print(f"  {key}: {value}")
        samgeo = side.get("samgeo")
        if samgeo:
            total = samgeo["total_s"]
            print(f"  ratio samgeo / unigeoseg predict: {total / side['unigeoseg_predict_s']:.2f}")
            print(f"  ratio samgeo / service first click: "
                  f"{total / side['service_first_click_s']:.2f}")
            click_s = samgeo["predict_s"] + samgeo["raster_to_vector_s"]
            print(f"  ratio samgeo predict+vectorize / service next click: "
                  f"{click_s / side['service_next_click_s']:.2f}")


if __name__ == "__main__":
    main()
