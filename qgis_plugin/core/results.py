"""Polygons from the backend into vector layers: GeoJSON to QgsFeatures, and target layers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from qgis.core import (
    QgsCoordinateReferenceSystem,
    QgsCoordinateTransform,
    QgsFeature,
    QgsField,
    QgsFields,
    QgsGeometry,
    QgsLineString,
    QgsMultiPolygon,
    QgsPolygon,
    QgsProject,
    QgsRectangle,
    QgsVectorFileWriter,
    QgsVectorLayer,
    QgsWkbTypes,
)
from qgis.PyQt.QtCore import QVariant

from .crs import CrsError, crs_from_wire

#: Attributes of every polygon the plugin writes (the backend's provenance plus the source
#: layer), in the dock's target layers and in Processing outputs.
RESULT_FIELDS = (("prompt", QVariant.Type.String), ("task", QVariant.Type.String),
                 ("engine", QVariant.Type.String), ("model", QVariant.Type.String),
                 ("score", QVariant.Type.Double), ("source_layer", QVariant.Type.String),
                 ("created", QVariant.Type.String))


def result_fields() -> QgsFields:
    fields = QgsFields()
    for name, kind in RESULT_FIELDS:
        fields.append(QgsField(name, kind))
    return fields


def collection_crs(collection: dict[str, Any], default: str) -> QgsCoordinateReferenceSystem:
    """The CRS a FeatureCollection from the backend declares (its ``crs`` member), else the
    wire CRS ``default`` (the tile's): the one reading of a reply's CRS, for the panel's
    preview and, through :func:`to_layer_features`, every written feature."""
    name = (collection.get("crs") or {}).get("properties", {}).get("name") or default
    try:
        return crs_from_wire(name)
    except CrsError as exc:
        raise ValueError(f"the backend returned polygons in an {exc}") from exc


def _ring(coords: list) -> QgsLineString:
    return QgsLineString([float(c[0]) for c in coords], [float(c[1]) for c in coords])


def _polygon(rings: list) -> QgsPolygon | None:
    if not rings or not rings[0]:
        return None
    polygon = QgsPolygon()
    polygon.setExteriorRing(_ring(rings[0]))
    for interior in rings[1:]:
        polygon.addInteriorRing(_ring(interior))
    return polygon


def geojson_polygons(geometry: dict[str, Any] | None) -> list[QgsGeometry]:
    """QGIS polygons from a GeoJSON Polygon / MultiPolygon, coordinates copied bit for bit
    (one geometry per part; other geometry types give none)."""
    if not geometry:
        return []
    kind, coords = geometry.get("type"), geometry.get("coordinates") or []
    parts = [coords] if kind == "Polygon" else coords if kind == "MultiPolygon" else []
    return [QgsGeometry(p) for p in (_polygon(rings) for rings in parts) if p is not None]


def geojson_geometry(geometry: dict[str, Any] | None) -> QgsGeometry:
    """One QGIS geometry (a polygon, or a multipolygon of its parts) from a GeoJSON Polygon
    / MultiPolygon, coordinates copied bit for bit; empty for anything else."""
    parts = geojson_polygons(geometry)
    if len(parts) == 1 and (geometry or {}).get("type") == "Polygon":
        return parts[0]
    multi = QgsMultiPolygon()
    for part in parts:
        multi.addGeometry(part.constGet().clone())
    return QgsGeometry(multi)


def geometries_from_collection(collection: dict[str, Any]) -> list[QgsGeometry]:
    """The polygons of a GeoJSON FeatureCollection, one per feature, coordinates untouched."""
    return [geojson_geometry(feature.get("geometry")) for feature in collection["features"]]


def merge_tile_results(tiles: list[tuple[dict[str, Any], QgsRectangle | None]]
                       ) -> dict[str, Any]:
    """One FeatureCollection from per-tile FeatureCollections in one CRS.

    Each tile's polygons are clipped to its core (None: the whole tile is its core; see
    ``tiles.tile_windows``), then polygons of different tiles that share an
    edge across a seam are dissolved, so an object cut by tile edges becomes one polygon.
    Cores meet exactly, so no tolerance is needed. A merged polygon keeps the properties of
    its largest piece, with the ``score`` weighted by the pieces' areas.

    Polygons inside their core that touch no other tile's polygon are passed through
    untouched: GEOS overlays may move a vertex by a unit in the last place, and the
    backend's coordinates are exact.
    """
    pieces: list[_Piece] = []
    crs = None
    for tile, (collection, core) in enumerate(tiles):
        crs = crs or collection.get("crs")
        clip = QgsGeometry.fromRect(core) if core is not None else None
        for geometry, feature in zip(geometries_from_collection(collection),
                                     collection["features"]):
            clipped = clip is not None and not core.contains(geometry.boundingBox())
            if clipped:
                geometry = geometry.intersection(clip)
            if geometry.isEmpty() or geometry.area() <= 0:
                continue
            pieces.append(_Piece(tile, geometry, feature, untouched=not clipped))
    for piece in pieces:
        piece.neighbours = [other for other in pieces if piece.shares_edge_with(other)]
    merged = [piece.feature_dict() for piece in pieces if not piece.neighbours]
    for group in _seam_groups(pieces):
        merged.extend(_dissolve(group))
    out: dict[str, Any] = {"type": "FeatureCollection", "features": merged}
    if crs is not None:
        out["crs"] = crs
    return out


class _Piece:
    """One tile's polygon (clipped to the tile's core if it crossed it)."""

    def __init__(self, tile: int, geometry: QgsGeometry, feature: dict[str, Any],
                 untouched: bool):
        self.tile, self.geometry, self.feature, self.untouched = tile, geometry, feature, untouched
        self.properties = dict(feature.get("properties") or {})
        self.box = geometry.boundingBox()
        self.neighbours: list[_Piece] = []  # other tiles' pieces sharing an edge with this one

    def shares_edge_with(self, other: _Piece) -> bool:
        if other.tile == self.tile or not self.box.intersects(other.box):
            return False
        common = self.geometry.intersection(other.geometry)
        return common.length() > 0 or common.area() > 0

    def feature_dict(self) -> dict[str, Any]:
        if self.untouched:
            return self.feature
        return {"type": "Feature", "geometry": json.loads(self.geometry.asJson(17)),
                "properties": self.properties}


def _seam_groups(pieces: list[_Piece]) -> list[list[_Piece]]:
    """Connected groups of pieces that share seam edges (``_Piece.neighbours``)."""
    groups, seen = [], set()
    for piece in pieces:
        if not piece.neighbours or id(piece) in seen:
            continue
        group, stack = [], [piece]
        seen.add(id(piece))
        while stack:
            current = stack.pop()
            group.append(current)
            for other in current.neighbours:
                if id(other) not in seen:
                    seen.add(id(other))
                    stack.append(other)
        groups.append(group)
    return groups


def _dissolve(group: list[_Piece]) -> list[dict[str, Any]]:
    """The union of a seam group as features (usually one polygon)."""
    union = QgsGeometry.unaryUnion([piece.geometry for piece in group])
    out = []
    for part in union.asGeometryCollection():
        if QgsWkbTypes.geometryType(part.wkbType()) != QgsWkbTypes.GeometryType.PolygonGeometry:
            continue  # a clip can leave a line where a polygon touched a cut line
        shares = [(part.intersection(p.geometry).area(), p.properties) for p in group
                  if p.box.intersects(part.boundingBox())]
        shares = [(area, props) for area, props in shares if area > 0]
        properties = dict(max(shares, key=lambda share: share[0])[1]) if shares else {}
        scored = [(area, props["score"]) for area, props in shares
                  if isinstance(props.get("score"), (int, float))]
        if scored:
            properties["score"] = sum(a * v for a, v in scored) / sum(a for a, _ in scored)
        out.append({"type": "Feature", "geometry": json.loads(part.asJson(17)),
                    "properties": properties})
    return out


def to_layer_features(collection: dict[str, Any], default_crs: str,
                      fields: QgsFields, source_layer_name: str,
                      target_crs: QgsCoordinateReferenceSystem | None = None,
                      multi: bool = True, defaults: dict[str, Any] | None = None
                      ) -> list[QgsFeature]:
    """Features for a layer or sink with ``fields``, from a FeatureCollection of the backend.

    Geometries are the GeoJSON coordinates bit for bit, in the collection's CRS
    (:func:`collection_crs`: its ``crs`` member, else the wire CRS ``default_crs``),
    transformed into ``target_crs`` when one is given and differs. ``multi``: one
    multipolygon feature per GeoJSON feature (for multipolygon layers); else one polygon
    feature per part. Attributes are filled by
    field name from the feature's properties over ``defaults`` (e.g. the reply's ``engine``,
    ``model`` and ``score``), with ``source_layer``; missing ones stay NULL.
    """
    source_crs = collection_crs(collection, default_crs)
    transform = (QgsCoordinateTransform(source_crs, target_crs, QgsProject.instance())
                 if target_crs is not None and target_crs != source_crs else None)
    out = []
    for feature in collection.get("features") or []:
        properties = {**(defaults or {}), **(feature.get("properties") or {}),
                      "source_layer": source_layer_name}
        parts = geojson_polygons(feature.get("geometry"))
        geometries = [geojson_geometry(feature.get("geometry"))] if multi and parts else parts
        for geometry in geometries:
            if transform is not None and geometry.transform(transform) != 0:
                raise ValueError("a polygon could not be transformed into the target layer's "
                                 "CRS")
            if multi and not geometry.isMultipart():
                geometry.convertToMultiType()
            qgs_feature = QgsFeature(fields)
            qgs_feature.setGeometry(geometry)
            for name, value in properties.items():
                index = fields.indexFromName(name)
                if index >= 0 and value is not None:
                    qgs_feature.setAttribute(index, value)
            out.append(qgs_feature)
    return out


def add_features_undoably(layer: QgsVectorLayer, features: list[QgsFeature],
                          label: str = "UniGeoSeg segment") -> bool:
    """Add through the layer's edit buffer as one undoable command (Ctrl+Z removes it).

    The layer is put in edit mode if it is not; the analyst saves the edits as with any
    digitising. Either every feature is added or none is.
    """
    if not layer.isEditable() and not layer.startEditing():
        return False
    layer.beginEditCommand(label)
    if not layer.addFeatures(features):
        layer.destroyEditCommand()
        return False
    layer.endEditCommand()
    return True


def create_geopackage_layer(path: Path, layer_name: str,
                            crs: QgsCoordinateReferenceSystem) -> QgsVectorLayer:
    """A new, empty GeoPackage polygon layer with the result attributes."""
    options = QgsVectorFileWriter.SaveVectorOptions()
    options.driverName = "GPKG"
    options.layerName = layer_name
    if Path(path).exists():
        options.actionOnExistingFile = \
            QgsVectorFileWriter.ActionOnExistingFile.CreateOrOverwriteLayer
    writer = QgsVectorFileWriter.create(str(path), result_fields(),
                                        QgsWkbTypes.Type.MultiPolygon, crs,
                                        QgsProject.instance().transformContext(), options)
    if writer.hasError() != QgsVectorFileWriter.WriterError.NoError:
        raise OSError(f"cannot create {path}: {writer.errorMessage()}")
    del writer  # closes the file
    layer = QgsVectorLayer(f"{path}|layername={layer_name}", layer_name, "ogr")
    if not layer.isValid():
        raise OSError(f"cannot open the new layer {layer_name} in {path}")
    return layer
