"""Vector files: GeoPackage / GeoJSON written atomically, read back with GDAL (pyogrio)."""

from __future__ import annotations

import datetime as dt
import json
import sqlite3

import numpy as np
import pyogrio
import pyogrio.raw
import pytest
import rasterio
import rasterio.features
import shapely
from affine import Affine
from pyproj import CRS

from unigeoseg_backend.errors import CRSError, InvalidInputError
from unigeoseg_backend.geo import vector_io
from unigeoseg_backend.geo.crs import same_crs
from unigeoseg_backend.geo.grid import TileGrid
from unigeoseg_backend.geo.vector_io import StagedLayer, VectorFileExistsError, write_vector
from unigeoseg_backend.geo.vectorize import mask_to_polygons, reproject_geometries

UTM = CRS.from_epsg(32633)
TRANSFORM = Affine(10.0, 0.0, 399960.0, 0.0, -10.0, 5300040.0)


def sample() -> tuple[list[shapely.Polygon], list[dict]]:
    mask = np.zeros((20, 30), dtype=bool)
    mask[2:6, 3:9] = True
    mask[3, 5] = False  # a hole
    mask[10:15, 20:25] = True
    polys = mask_to_polygons(mask, TRANSFORM)
    created = dt.datetime(2024, 5, 1, 12, 30, tzinfo=dt.timezone.utc)
    props = [{"score": np.float32(0.875) if i == 0 else 1, "engine": "sam",
              "model": "vit_b", "task": "interactive", "prompt": "points: 2",
              "created": created} for i in range(len(polys))]
    return polys, props


def listing(directory) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_gpkg_round_trip_keeps_crs_geometry_and_attributes(tmp_path) -> None:
    polys, props = sample()
    path = write_vector(tmp_path / "out.gpkg", polys, props, UTM)
    assert listing(tmp_path) == ["out.gpkg"]
    info = pyogrio.read_info(path, layer="segments")
    assert same_crs(CRS.from_user_input(info["crs"]), UTM)
    assert info["geometry_type"] == "Polygon" and info["features"] == 2
    df = pyogrio.read_dataframe(path, layer="segments")
    assert df.crs.to_epsg() == 32633
    for got, want in zip(df.geometry, polys, strict=True):
        assert shapely.equals_exact(got, want, tolerance=0.0)  # WKB: bit-exact coordinates
    assert df["score"].dtype == np.float64 and df["score"].tolist() == [0.875, 1.0]
    assert df["engine"].tolist() == ["sam", "sam"]
    assert df["created"].astype(str).tolist()[0].startswith("2024-05-01")
    with sqlite3.connect(path) as db:  # the GeoPackage itself names EPSG:32633
        (srs_id,) = db.execute("SELECT srs_id FROM gpkg_geometry_columns "
                               "WHERE table_name = 'segments'").fetchone()
    assert srs_id == 32633


def test_geojson_round_trip_is_exact(tmp_path) -> None:
    polys, props = sample()
    wgs = reproject_geometries(polys, UTM, CRS.from_epsg(4326))
    path = write_vector(tmp_path / "out.geojson", wgs, props, CRS.from_epsg(4326))
    df = pyogrio.read_dataframe(path)
    assert df.crs.to_epsg() == 4326
    for got, want in zip(df.geometry, wgs, strict=True):
        assert shapely.equals_exact(got, want, tolerance=0.0)
    utm_path = write_vector(tmp_path / "utm.geojson", polys, props, UTM)
    assert json.loads(utm_path.read_text())["crs"]["properties"]["name"].endswith("32633")
    assert pyogrio.read_dataframe(utm_path).crs.to_epsg() == 32633


def test_geojson_refuses_a_crs_it_cannot_record(tmp_path) -> None:
    polys, props = sample()
    custom = CRS.from_proj4("+proj=tmerc +lon_0=15.3 +k=0.9996 +x_0=500000 +ellps=GRS80")
    with pytest.raises(CRSError):
        write_vector(tmp_path / "out.geojson", polys, props, custom)
    assert listing(tmp_path) == []
    path = write_vector(tmp_path / "out.gpkg", polys, props, custom)  # GeoPackage stores WKT
    assert same_crs(CRS.from_user_input(pyogrio.read_info(path)["crs"]), custom)


def test_overwrite_flag(tmp_path) -> None:
    polys, props = sample()
    path = write_vector(tmp_path / "out.gpkg", polys, props, UTM)
    before = path.read_bytes()
    with pytest.raises(VectorFileExistsError) as info:
        write_vector(path, polys[:1], props[:1], UTM)
    assert isinstance(info.value, InvalidInputError) and isinstance(info.value, FileExistsError)
    assert path.read_bytes() == before
    write_vector(path, polys[:1], props[:1], UTM, overwrite=True)
    assert pyogrio.read_info(path)["features"] == 1
    assert listing(tmp_path) == ["out.gpkg"]


def test_failed_write_leaves_existing_file_untouched(tmp_path, monkeypatch) -> None:
    polys, props = sample()
    path = write_vector(tmp_path / "out.gpkg", polys, props, UTM)
    before = path.read_bytes()
    real_write = pyogrio.raw.write

    def write_then_fail(target, *args, **kwargs):
        real_write(target, *args, **kwargs)  # the new file is (partly) there ...
        raise OSError("No space left on device")  # ... when the disk fills up

    monkeypatch.setattr(vector_io.pyogrio.raw, "write", write_then_fail)
    with pytest.raises(OSError, match="No space"):
        write_vector(path, polys[:1], props[:1], UTM, overwrite=True)
    with pytest.raises(OSError, match="No space"), \
            StagedLayer(path, UTM, overwrite=True) as staged:
        staged.append(polys[:1], props[:1])
        staged.commit()
    assert path.read_bytes() == before
    assert listing(tmp_path) == ["out.gpkg"]  # no temp files left behind
    monkeypatch.undo()

    def bad_wkb(*args, **kwargs):
        raise RuntimeError("geometry encoding failed")

    monkeypatch.setattr(vector_io.shapely, "to_wkb", bad_wkb)
    with pytest.raises(RuntimeError):
        write_vector(path, polys, props, UTM, overwrite=True)
    assert path.read_bytes() == before
    assert listing(tmp_path) == ["out.gpkg"]


def test_bad_suffix_and_mismatched_properties(tmp_path) -> None:
    polys, props = sample()
    for name in ("out.shp", "out.json", "out"):
        with pytest.raises(InvalidInputError):
            write_vector(tmp_path / name, polys, props, UTM)
    with pytest.raises(InvalidInputError):
        write_vector(tmp_path / "out.gpkg", polys, props[:1], UTM)
    with pytest.raises(InvalidInputError), StagedLayer(tmp_path / "out.geojson", UTM) as staged:
        staged.append(polys[:1], props[:1])
        staged.append(polys[1:], props[1:])  # GeoJSON is written at once
    assert listing(tmp_path) == []


def test_staged_layer_streams_parts_into_one_layer_moved_in_place_at_commit(tmp_path) -> None:
    polys, props = sample()
    path = tmp_path / "segments.gpkg"
    with StagedLayer(path, UTM) as staged:
        staged.append(polys[:1], props[:1])
        staged.append([], [])
        staged.append(polys[1:], props[1:])
        assert staged.count == 2 and not path.exists()  # nothing at the target before commit
        assert staged.commit() == path
    assert listing(tmp_path) == ["segments.gpkg"]
    df = pyogrio.read_dataframe(path, layer="segments")
    assert df.crs.to_epsg() == 32633 and df["engine"].tolist() == ["sam", "sam"]
    for got, want in zip(df.geometry, polys, strict=True):
        assert shapely.equals_exact(got, want, tolerance=0.0)
    with pytest.raises(VectorFileExistsError), StagedLayer(path, UTM):
        pass
    assert listing(tmp_path) == ["segments.gpkg"]


def test_empty_layer(tmp_path) -> None:
    path = write_vector(tmp_path / "empty.gpkg", [], [], UTM)
    info = pyogrio.read_info(path)
    assert info["features"] == 0 and same_crs(CRS.from_user_input(info["crs"]), UTM)


def test_geotiff_to_geopackage_pipeline(tmp_path) -> None:
    """GeoTIFF mask -> polygons -> GeoPackage -> burnt back on the GeoTIFF grid."""
    rng = np.random.default_rng(5)
    mask = rng.random((40, 50)) < 0.5
    transform = Affine.translation(1700000.0, 6000000.0) @ Affine.rotation(25.0) \
        @ Affine.scale(4.5, -4.5)
    tif = tmp_path / "mask.tif"
    with rasterio.open(tif, "w", driver="GTiff", width=50, height=40, count=1, dtype="uint8",
                       crs="EPSG:3857", transform=transform) as ds:
        ds.write(mask.astype(np.uint8), 1)
    with rasterio.open(tif) as ds:
        grid = TileGrid(CRS.from_wkt(ds.crs.to_wkt()), ds.transform, ds.width, ds.height)
        band = ds.read(1)
    polys = mask_to_polygons(band, grid.transform)
    gpkg = write_vector(tmp_path / "mask.gpkg", polys, [{"score": 1.0}] * len(polys), grid.crs)
    df = pyogrio.read_dataframe(gpkg)
    assert df.crs.to_epsg() == 3857
    burnt = rasterio.features.rasterize([(g, 1) for g in df.geometry], out_shape=band.shape,
                                        transform=grid.transform, fill=0, dtype=np.uint8)
    np.testing.assert_array_equal(burnt, band)
