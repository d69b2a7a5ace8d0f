"""Merging text results across tile seams (``core.results.merge_tile_results``), in QGIS."""

from __future__ import annotations

import pytest
from qgis.core import QgsGeometry, QgsPointXY, QgsRectangle


def _square(x0, y0, x1, y1, score):
    ring = [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]
    return {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring]},
            "properties": {"score": score, "engine": "unigeoseg", "task": "referring"}}


def _collection(*features):
    return {"type": "FeatureCollection", "features": list(features),
            "crs": {"type": "name", "properties": {"name": "EPSG:32633"}}}


def _geometry(feature) -> QgsGeometry:
    ring = feature["geometry"]["coordinates"][0]
    return QgsGeometry.fromPolygonXY([[QgsPointXY(x, y) for x, y in ring]])


def test_an_object_cut_by_a_seam_becomes_one_polygon_with_an_area_weighted_score():
    from qgis_plugin.core.results import merge_tile_results

    # Two overlapping tiles (x 0..10 and 8..18), cores cut at x = 9. The object spans
    # x 5..15; each tile saw it up to its own edge, and the overlap holds both views.
    lone = _square(0, 6, 2, 8, 0.5)
    left = _collection(_square(5, 0, 10, 4, 0.9), lone)
    right = _collection(_square(8, 0, 15, 4, 0.6))
    merged = merge_tile_results([(left, QgsRectangle(0, 0, 9, 10)),
                                 (right, QgsRectangle(9, 0, 18, 10))])
    assert merged["crs"] == left["crs"]
    features = sorted(merged["features"], key=lambda f: _geometry(f).area())
    assert [_geometry(f).area() for f in features] == pytest.approx([4.0, 40.0])
    # The lone polygon is the backend's, untouched (no overlay rounding); the object is
    # 4 x 4 in the left core (0.9) plus 6 x 4 in the right core (0.6).
    assert features[0] is lone
    seam = features[1]
    assert seam["properties"]["score"] == pytest.approx((16 * 0.9 + 24 * 0.6) / 40)
    assert seam["properties"]["engine"] == "unigeoseg"
    assert _geometry(seam).boundingBox() == QgsRectangle(5, 0, 15, 4)


def test_polygons_touching_at_a_corner_or_apart_stay_separate_and_empty_input_is_empty():
    from qgis_plugin.core.results import merge_tile_results

    corner = _collection(_square(0, 0, 2, 2, 0.5), _square(2, 2, 4, 4, 0.5))
    merged = merge_tile_results([(corner, None)])
    assert len(merged["features"]) == 2
    assert merge_tile_results([])["features"] == []
    assert merge_tile_results([(_collection(), QgsRectangle(0, 0, 1, 1))])["features"] == []
