"""One click with segment-geospatial (samgeo), timed stage by stage; prints one JSON line.

Run by bench_click.py in a venv that has segment-geospatial:
    python samgeo_click.py RASTER CHECKPOINT X Y POINT_CRS DEVICE WORKDIR
"""

import json
import sys
import time
from pathlib import Path


def main() -> None:
    raster, checkpoint, x, y, point_crs, device, workdir = sys.argv[1:8]
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    timings = {}
    start = time.perf_counter()
    from samgeo import SamGeo, raster_to_vector

    sam = SamGeo(model_type="vit_b", checkpoint=checkpoint, automatic=False, device=device)
    timings["load_s"] = time.perf_counter() - start
    tick = time.perf_counter()
    sam.set_image(raster)
    timings["set_image_s"] = time.perf_counter() - tick
    tick = time.perf_counter()
    mask_path = str(workdir / "mask.tif")
    sam.predict(point_coords=[[float(x), float(y)]], point_labels=[1], point_crs=point_crs,
                output=mask_path)
    timings["predict_s"] = time.perf_counter() - tick
    tick = time.perf_counter()
    raster_to_vector(mask_path, str(workdir / "out.gpkg"))
    timings["raster_to_vector_s"] = time.perf_counter() - tick
    timings["total_s"] = time.perf_counter() - start
    print(json.dumps(timings))


if __name__ == "__main__":
    main()
