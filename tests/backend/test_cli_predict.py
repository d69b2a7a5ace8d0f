"""``unigeoseg predict`` on real GeoTIFFs, in-process and through a running service."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pyogrio
import pytest
import rasterio
from affine import Affine
from pyproj import CRS, Transformer
from rasterio.windows import Window

from unigeoseg_backend.geo.raster_io import prompt_window, read_tile

ORIGIN = (600000.0, 5200000.0)


@pytest.fixture
def geotiff_16bit(tmp_path):
    """A 3000 x 2500 four-band uint16 UTM 32N GeoTIFF with a nodata strip and a bright field."""
    path = tmp_path / "scene.tif"
    rng = np.random.default_rng(3)
    data = (rng.random((4, 2500, 3000)) * 900 + 100).astype(np.uint16)
    data[:, 1200:1400, 1500:1800] = 3500
    data[:, :, :40] = 0  # nodata strip on the west edge
    profile = dict(driver="GTiff", width=3000, height=2500, count=4, dtype="uint16",
                   crs="EPSG:32632", transform=Affine(2.0, 0, ORIGIN[0], 0, -2.0, ORIGIN[1]),
                   nodata=0, tiled=True, blockxsize=256, blockysize=256)
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
    return path


def _run(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "unigeoseg_backend.cli.main", *args],
                          capture_output=True, text=True, timeout=timeout)


def _map(col, row):
    return ORIGIN[0] + 2.0 * col, ORIGIN[1] - 2.0 * row


def test_prompt_window_reads_only_the_region_around_the_prompt(geotiff_16bit):
    with rasterio.open(geotiff_16bit) as ds:
        window = prompt_window(ds, np.array([[1650.0, 1300.0]]), None, window_px=1024)
        tile = read_tile(ds, window)
    assert (window.width, window.height) == (1024, 1024)
    assert window.col_off <= 1650 <= window.col_off + 1024
    assert tile.pixels.shape == (1024, 1024, 3)
    gt = tile.georeference.geotransform
    assert (gt[0], gt[3]) == _map(window.col_off, window.row_off)


def test_prompt_window_is_shifted_inside_the_raster_at_its_edge(geotiff_16bit):
    with rasterio.open(geotiff_16bit) as ds:
        window = prompt_window(ds, np.array([[10.0, 2490.0]]), None, window_px=1024)
    assert window == Window(0, 2500 - 1024, 1024, 1024)


def test_large_boxes_are_read_decimated_with_an_exact_transform(geotiff_16bit):
    with rasterio.open(geotiff_16bit) as ds:
        tile = read_tile(ds, Window(0, 0, 3000, 2500), max_side_px=1000)
    assert tile.pixels.shape[:2] == (834, 1000)
    gt = tile.georeference.geotransform
    assert gt[1] == pytest.approx(2.0 * 3000 / 1000) and gt[5] == pytest.approx(-2.0 * 2500 / 834)
    assert np.isnan(tile.pixels[:, 0]).all()  # the nodata strip is carried as NaN


def test_predict_writes_a_geopackage_in_the_raster_crs(geotiff_16bit, tmp_path,
                                                       tiny_sam_checkpoint):
    out = tmp_path / "out.gpkg"
    x, y = _map(1650, 1300)
    result = _run("predict", str(geotiff_16bit), "-o", str(out), "--point", f"{x},{y}",
                  "--point", f"{x + 400},{y},0", "--sam-type", "tiny", "--sam-checkpoint",
                  str(tiny_sam_checkpoint), "--device", "cpu")
    assert result.returncode == 0, result.stderr
    info = pyogrio.read_info(out)
    assert CRS.from_user_input(info["crs"]) == CRS.from_epsg(32632)
    frame = pyogrio.read_dataframe(out)
    assert len(frame) >= 1
    assert set(frame.columns) >= {"score", "engine", "model", "task", "prompt", "created"}
    assert (frame["model"] == "sam_tiny").all()
    # Everything lies inside the 1024 px window read around the prompt, on the 2 m grid.
    minx, miny, maxx, maxy = frame.total_bounds
    assert minx >= ORIGIN[0] and maxy <= ORIGIN[1]
    assert maxx - minx <= 1024 * 2.0 and maxy - miny <= 1024 * 2.0
    coords = np.concatenate([np.asarray(g.exterior.coords) for g in frame.geometry])
    np.testing.assert_array_equal((coords[:, 0] - ORIGIN[0]) % 2.0, 0)
    np.testing.assert_array_equal((ORIGIN[1] - coords[:, 1]) % 2.0, 0)


def test_prompt_crs_points_give_the_same_result(geotiff_16bit, tmp_path, tiny_sam_checkpoint):
    x, y = _map(1650.5, 1300.5)
    lon, lat = Transformer.from_crs(32632, 4326, always_xy=True).transform(x, y)
    native, foreign = tmp_path / "native.gpkg", tmp_path / "foreign.gpkg"
    common = ["--sam-type", "tiny", "--sam-checkpoint", str(tiny_sam_checkpoint),
              "--device", "cpu"]
    assert _run("predict", str(geotiff_16bit), "-o", str(native), "--point", f"{x},{y}",
                *common).returncode == 0
    assert _run("predict", str(geotiff_16bit), "-o", str(foreign), "--point", f"{lon},{lat}",
                "--prompt-crs", "EPSG:4326", *common).returncode == 0
    a, b = pyogrio.read_dataframe(native), pyogrio.read_dataframe(foreign)
    assert a.geometry.union_all().equals(b.geometry.union_all())


def test_predict_through_the_service_equals_predict_in_process(geotiff_16bit, tmp_path,
                                                               tiny_backend,
                                                               tiny_sam_checkpoint):
    x, y = _map(1650, 1300)
    local, remote = tmp_path / "local.gpkg", tmp_path / "remote.gpkg"
    assert _run("predict", str(geotiff_16bit), "-o", str(local), "--point", f"{x},{y}",
                "--sam-type", "tiny", "--sam-checkpoint", str(tiny_sam_checkpoint),
                "--device", "cpu").returncode == 0
    result = _run("predict", str(geotiff_16bit), "-o", str(remote), "--point", f"{x},{y}",
                  "--server", tiny_backend.address)
    assert result.returncode == 0, result.stderr
    a, b = pyogrio.read_dataframe(local), pyogrio.read_dataframe(remote)
    assert a.geometry.union_all().equals(b.geometry.union_all())


def test_predict_refuses_to_overwrite_and_leaves_the_file_alone(geotiff_16bit, tmp_path,
                                                                tiny_sam_checkpoint):
    out = tmp_path / "keep.gpkg"
    out.write_bytes(b"analyst's precious file")
    x, y = _map(1650, 1300)
    result = _run("predict", str(geotiff_16bit), "-o", str(out), "--point", f"{x},{y}",
                  "--sam-type", "tiny", "--sam-checkpoint", str(tiny_sam_checkpoint))
    assert result.returncode == 1 and "--overwrite" in result.stderr
    assert out.read_bytes() == b"analyst's precious file"


@pytest.mark.parametrize("args, message", [
    (["--point", "1,2"], "outside"),
    ([], "at least one --point"),
    (["--point", "1,2", "--prompt-crs", "EPSG:0"], "CRS"),
])
def test_predict_bad_prompts_fail_with_a_readable_message(geotiff_16bit, tmp_path,
                                                          tiny_sam_checkpoint, args, message):
    result = _run("predict", str(geotiff_16bit), "-o", str(tmp_path / "x.gpkg"), *args,
                  "--sam-type", "tiny", "--sam-checkpoint", str(tiny_sam_checkpoint))
    assert result.returncode == 1
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "x.gpkg").exists()


def test_predict_without_sam_weights_clicks_with_the_default_model(geotiff_16bit, tmp_path):
    x, y = _map(1650, 1300)
    env = {**__import__("os").environ, "UNIGEOSEG_CACHE_DIR": str(tmp_path / "empty-cache")}
    env.pop("UNIGEOSEG_DEFAULT_MODEL", None)
    result = subprocess.run(
        [sys.executable, "-m", "unigeoseg_backend.cli.main", "predict", str(geotiff_16bit),
         "-o", str(tmp_path / "x.gpkg"), "--point", f"{x},{y}", "--device", "cpu"],
        capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "engine default, model default-v1@" in result.stdout
    assert (tmp_path / "x.gpkg").exists()
    missing = subprocess.run(
        [sys.executable, "-m", "unigeoseg_backend.cli.main", "predict", str(geotiff_16bit),
         "-o", str(tmp_path / "y.gpkg"), "--point", f"{x},{y}",
         "--sam-checkpoint", str(tmp_path / "missing.pth")],
        capture_output=True, text=True, timeout=300, env=env)
    assert missing.returncode != 0 and "does not exist" in missing.stderr
    assert not (tmp_path / "y.gpkg").exists()
