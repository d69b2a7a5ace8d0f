"""Whole-raster text segmentation: wall time, tiles/s and peak memory against raster size.

For each size it writes a synthetic square 3-band uint8 GeoTIFF (EPSG:32633, 0.5 m; tiled
512 x 512, deflate), one row of blocks at a time so that this script stays bounded too, then
runs ``unigeoseg predict RASTER --text ... --whole-raster`` in a subprocess with a tiny
UniGeoSeg (random weights, seeded, saved in the released layout) and reports the child's wall
time, tiles/s and peak RSS (``ru_maxrss`` of that child alone, from ``os.wait4``). The peak RSS
should stay flat as the raster grows: the CLI holds one tile row of mask cores, a batch of
tiles and the regions open across the last seam, and streams polygons to the GeoPackage.

    python benchmarks/bench_raster_text.py --sizes 2000,6000
    python benchmarks/bench_raster_text.py --sizes 4000,8000 --device cuda \\
        --random-model unigeoseg-official-sparseconv --batch-size 32   # full size on a GPU

Prints one JSON line per size; never passes or fails on time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import rasterio
from affine import Affine
from rasterio.windows import Window

BLOCK = 512


def write_raster(path: Path, size: int, seed: int = 0, nodata_grid: int = 0) -> None:
    """A ``size x size`` scene of noise and blue 'roofs', written one block row at a time.

    With ``nodata_grid`` N, every N-th row and column is nodata (0), which cuts the mask into
    cells of at most N x N px (a random-weight model marks most pixels, so without it the
    output is one labyrinth polygon as large as the raster, held open from seam to seam)."""
    profile = dict(nodata=0 if nodata_grid else None, driver="GTiff", width=size,
                   height=size, count=3, dtype="uint8",
                   crs="EPSG:32633", transform=Affine(0.5, 0.0, 500000.0, 0.0, -0.5, 4100000.0),
                   tiled=True, blockxsize=BLOCK, blockysize=BLOCK, compress="deflate",
                   BIGTIFF="IF_SAFER")
    with rasterio.open(path, "w", **profile) as dst:
        for r0 in range(0, size, BLOCK):
            h = min(BLOCK, size - r0)
            rng = np.random.default_rng((seed, r0))
            # Smooth-ish texture: coarse noise upsampled 8x, plus fine noise.
            coarse = rng.integers(0, 200, (3, h // 8 + 1, size // 8 + 1), dtype=np.uint8)
            band = np.repeat(np.repeat(coarse, 8, axis=1), 8, axis=2)[:, :h, :size]
            band = band + rng.integers(0, 40, band.shape, dtype=np.uint8)
            for _ in range(max(1, size // 400)):
                rr, cc = int(rng.integers(0, h)), int(rng.integers(0, size))
                band[:, rr:rr + int(rng.integers(10, 200)), cc:cc + int(rng.integers(10, 300))] = \
                    np.array([40, 90, 230], np.uint8)[:, None, None]
            if nodata_grid:
                np.maximum(band, 1, out=band)
                band[:, (np.arange(r0, r0 + h) % nodata_grid) == 0, :] = 0
                band[:, :, (np.arange(size) % nodata_grid) == 0] = 0
            dst.write(band, window=Window(0, r0, size, h))


def random_model(path: Path, name: str, device: str) -> Path:
    """A registry configuration with seeded random weights, saved in the released layout
    (built on ``device``, in bfloat16 on CUDA as the engine runs it)."""
    import torch

    from unigeoseg_backend.model.checkpoint import save_released
    from unigeoseg_backend.model.registry import get_config, tiny_tokenizer
    from unigeoseg_backend.model.unigeoseg import UniGeoSeg
    from unigeoseg_backend.runtime import select_device

    torch.manual_seed(0)
    target = select_device(device)
    dtype = torch.bfloat16 if target.type == "cuda" else torch.float32
    with torch.device(target):
        model = UniGeoSeg(get_config(name)).to(dtype=dtype).eval()
    save_released(model, tiny_tokenizer(), path)
    return path


def run_cli(raster: Path, model: Path, out: Path, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, "-m", "unigeoseg_backend.cli.main", "predict", str(raster),
           "--text", args.text, "--model", str(model), "--whole-raster", "--device", args.device,
           "--batch-size", str(args.batch_size), "--tile", str(args.tile),
           "--overlap", str(args.overlap), "-o", str(out), "--overwrite", "--no-progress"]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # wait4 gives this child's own rusage (RUSAGE_CHILDREN would be the max over all children).
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    stdout, stderr = proc.stdout.read(), proc.stderr.read()
    if proc.returncode != 0:
        raise RuntimeError(f"the CLI failed ({proc.returncode}): {stderr[-2000:]}")
    return {"wall_s": wall, "peak_rss_mb": usage.ru_maxrss / 1024, "cli": stdout.strip()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="2000,6000", help="raster sides in px")
    parser.add_argument("--model", type=Path,
                        help="a released-layout model (default: --random-model's weights)")
    parser.add_argument("--random-model", default="unigeoseg-tiny-sparseconv",
                        help="registry configuration to save with random weights when no "
                             "--model is given (unigeoseg-official-sparseconv: full size)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--tile", type=int, default=512)
    parser.add_argument("--overlap", type=int, default=64)
    parser.add_argument("--text", default="the buildings with blue roofs")
    parser.add_argument("--nodata-grid", type=int, default=0,
                        help="nodata every N-th row and column (0: none), see write_raster")
    parser.add_argument("--workdir", type=Path, help="keep rasters and outputs here")
    args = parser.parse_args()

    from unigeoseg_backend.geo.tiling import tile_grid

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        work = Path(tmp)
        model = args.model or random_model(work / args.random_model, args.random_model,
                                           args.device)
        for size in (int(s) for s in args.sizes.split(",")):
            raster, out = work / f"scene_{size}.tif", work / f"scene_{size}.gpkg"
            tick = time.perf_counter()
            write_raster(raster, size, nodata_grid=args.nodata_grid)
            made = time.perf_counter() - tick
            n_tiles = len(tile_grid(size, size, args.tile, args.overlap))
            result = run_cli(raster, model, out, args)
            print(json.dumps({
                "size_px": size, "tiles": n_tiles,
                "raster_mb": round(raster.stat().st_size / 2**20, 1),
                "write_raster_s": round(made, 1), "wall_s": round(result["wall_s"], 1),
                "tiles_per_s": round(n_tiles / result["wall_s"], 2),
                "peak_rss_mb": round(result["peak_rss_mb"], 1),
                "output_mb": round(out.stat().st_size / 2**20, 2), "device": args.device,
                "nodata_grid": args.nodata_grid,
                "cli": result["cli"]}), flush=True)
            raster.unlink()
            out.unlink()


if __name__ == "__main__":
    main()
