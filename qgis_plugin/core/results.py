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
    QgsJsonUtils,
    QgsProject,
    QgsVectorFileWriter,
    QgsVectorLayer,
    QgsWkbTypes,
)
from qgis.PyQt.QtCore import QVariant

#: Attributes every accepted polygon carries.
RESULT_FIELDS = (("prompt", QVariant.String), ("task", QVariant.String),
                 ("engine", QVariant.String), ("model", QVariant.String),
                 ("score", QVariant.Double), ("source_layer", QVariant.String),
                 ("created", QVariant.String))


def result_fields() -> QgsFields:
    fields = QgsFields()
    for name, kind in RESULT_FIELDS:
        fields.append(QgsField(name, kind))
    return fields


def collection_crs(collection: dict[str, Any], default: str) -> QgsCoordinateReferenceSystem:
    """The CRS a FeatureCollection from the backend declares (its ``crs`` member)."""
    name = (collection.get("crs") or {}).get("properties", {}).get("name") or default
    crs = QgsCoordinateReferenceSystem(name)
    if not crs.isValid():
        crs = QgsCoordinateReferenceSystem.fromWkt(name)
    if not crs.isValid():
        raise ValueError(f"the backend returned polygons in an unknown CRS: {name[:80]}")
    return crs


def geometries_from_collection(collection: dict[str, Any]) -> list[QgsGeometry]:
    """The polygons of a GeoJSON FeatureCollection, coordinates untouched."""
    features = QgsJsonUtils.stringToFeatureList(json.dumps({"type": "FeatureCollection",
                                                            "features": collection["features"]}),
                                                QgsFields())
    return [f.geometry() for f in features]


def to_layer_features(collection: dict[str, Any], source_crs: QgsCoordinateReferenceSystem,
                      layer: QgsVectorLayer, source_layer_name: str) -> list[QgsFeature]:
    """Features for ``layer``: geometry transformed from ``source_crs`` to the layer's CRS,
    promoted to multipolygon when the layer wants it, attributes filled by field name."""
    transform = QgsCoordinateTransform(source_crs, layer.crs(), QgsProject.instance())
    wants_multi = QgsWkbTypes.isMultiType(layer.wkbType())
    out = []
    for geometry, feature in zip(geometries_from_collection(collection),
                                 collection["features"]):
        geometry = QgsGeometry(geometry)
        if geometry.transform(transform) != 0:
            raise ValueError("a polygon could not be transformed into the target layer's CRS")
        if wants_multi and not geometry.isMultipart():
            geometry.convertToMultiType()
        qgs_feature = QgsFeature(layer.fields())
        qgs_feature.setGeometry(geometry)
        properties = dict(feature.get("properties") or {}, source_layer=source_layer_name)
        for name, value in properties.items():
            index = layer.fields().indexFromName(name)
            if index >= 0:
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
