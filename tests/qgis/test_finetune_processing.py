"""Fine-tune chips in real QGIS (offscreen): a GeoTIFF in UTM and a GeoPackage of polygons in
EPSG:4326 become chips whose masks land on exactly the pixels the polygons cover, with the
invalid, outside and reprojected polygons reported; the "Fine-tune model" algorithm refuses
bad layers in words before it looks for a backend, fine-tunes a tiny default model through a
real backend (the backend's Python, ``UNIGEOSEG_BACKEND_PYTHON``) and reports the held-out
IoU, and Cancel stops the job with no model made."""

from __future__ import annotations

import json
import socket

import numpy as np
import pytest

qgis_core = pytest.importorskip("qgis.core")

from qgis.core import (  # noqa: E402
    QgsApplication,
    QgsCoordinateReferenceSystem,
    QgsCoordinateTransform,
    QgsPointXY,
    QgsProcessingException,
    QgsProcessingFeedback,
    QgsProject,
    QgsRasterLayer,
    QgsVectorLayer,
)
from qgis_plugin.core.finetune_chips import rasterise  # noqa: E402
from qgis_plugin.core.raster_window import raster_grid  # noqa: E402
from qgis_plugin.processing_algs import UniGeoSegProvider  # noqa: E402
from qgis_plugin.processing_algs.finetune import build_chip_set, plan_from_layers  # noqa: E402

pytestmark = pytest.mark.timeout(300)

ORIGIN = (500000.0, 4100000.0)  # UTM 33N, 0.5 m pixels
PIXEL = 0.5
WIDTH, HEIGHT = 640, 320
UTM = "EPSG:32633"
#: Squares (col0, row0, side) in pixels, edges on pixel edges: ten ponds in a row.
PONDS = [(40 + 56 * i, 100 + 7 * i, 12) for i in range(10)]


def _utm(col: float, row: float) -> tuple[float, float]:
    return ORIGIN[0] + col * PIXEL, ORIGIN[1] - row * PIXEL


@pytest.fixture
def raster(tmp_path):
    """A 640 x 320 3-band uint8 GeoTIFF in UTM with bright ponds on dark noise."""
    from osgeo import gdal, osr

    rng = np.random.default_rng(0)
    data = (rng.random((3, HEIGHT, WIDTH)) * 60).astype(np.uint8)
    for col, row, side in PONDS:
        data[:, row:row + side, col:col + side] = np.array([30, 90, 220], np.uint8)[:, None,
                                                                                     None]
    path = tmp_path / "scene.tif"
    dataset = gdal.GetDriverByName("GTiff").Create(str(path), WIDTH, HEIGHT, 3, gdal.GDT_Byte)
    dataset.SetGeoTransform((ORIGIN[0], PIXEL, 0.0, ORIGIN[1], 0.0, -PIXEL))
    srs = osr.SpatialReference()
    srs.ImportFromEPSG(32633)
    dataset.SetProjection(srs.ExportToWkt())
    for band in range(3):
        dataset.GetRasterBand(band + 1).WriteArray(data[band])
    dataset = None
    layer = QgsRasterLayer(str(path), "scene")
    assert layer.isValid()
    QgsProject.instance().addMapLayer(layer, False)
    yield layer
    QgsProject.instance().removeMapLayer(layer.id())


def _geopackage(path, polygons_utm: list[tuple[str, list[tuple[float, float]]]]) -> str:
    """Polygons given as UTM rings, stored in EPSG:4326 with a ``kind`` field."""
    from osgeo import ogr, osr

    to_wgs84 = QgsCoordinateTransform(QgsCoordinateReferenceSystem(UTM),
                                      QgsCoordinateReferenceSystem("EPSG:4326"),
                                      QgsProject.instance())
    srs = osr.SpatialReference()
    srs.ImportFromEPSG(4326)
    srs.SetAxisMappingStrategy(osr.OAMS_TRADITIONAL_GIS_ORDER)
    source = ogr.GetDriverByName("GPKG").CreateDataSource(str(path))
    layer = source.CreateLayer("objects", srs, ogr.wkbPolygon)
    layer.CreateField(ogr.FieldDefn("kind", ogr.OFTString))
    for kind, ring in polygons_utm:
        points = [to_wgs84.transform(QgsPointXY(x, y)) for x, y in ring]
        wkt = "POLYGON((" + ",".join(f"{p.x():.12f} {p.y():.12f}" for p in points) + "))"
        feature = ogr.Feature(layer.GetLayerDefn())
        feature.SetField("kind", kind)
        feature.SetGeometry(ogr.CreateGeometryFromWkt(wkt))
        layer.CreateFeature(feature)
    source = None
    return f"{path}|layername=objects"


def _square(col: float, row: float, side: float) -> list[tuple[float, float]]:
    corners = [(col, row), (col + side, row), (col + side, row + side), (col, row + side),
               (col, row)]
    return [_utm(c, r) for c, r in corners]


@pytest.fixture
def polygons(tmp_path):
    """The ponds, plus a self-crossing (repairable) one and one outside the raster."""
    bowtie = [_utm(300, 20), _utm(320, 40), _utm(320, 20), _utm(300, 40), _utm(300, 20)]
    entries = [("pond", _square(*pond)) for pond in PONDS]
    entries += [("pond", bowtie), ("pond", _square(2000, 100, 10))]
    layer = QgsVectorLayer(_geopackage(tmp_path / "objects.gpkg", entries), "objects", "ogr")
    assert layer.isValid() and layer.crs().authid() == "EPSG:4326"
    QgsProject.instance().addMapLayer(layer, False)
    yield layer
    QgsProject.instance().removeMapLayer(layer.id())


def test_masks_land_on_the_exact_pixels_of_polygons_in_another_crs(raster, polygons,
                                                                   tmp_path):
    grid = raster_grid(raster)
    context = QgsProject.instance().transformContext()
    plan, notes = plan_from_layers(raster, grid, polygons, polygons.crs(), context, "pond",
                                   None, 0.25)
    assert any("reprojected" in note for note in notes)
    assert any("1 invalid geometry(ies) repaired" in note for note in notes)
    assert any("1 polygon(s) lie outside the raster" in note for note in notes)
    root = tmp_path / "chips"
    summary = build_chip_set(raster, grid, plan, root, context)
    assert summary.chips["train"] and summary.chips["val"]

    # Every pond (and the repaired bowtie) rasterised on the raster's grid, in pixels.
    truth = np.zeros((HEIGHT, WIDTH), dtype=bool)
    for col, row, side in PONDS:
        truth[row:row + side, col:col + side] = True
    bowtie = next(o for o in plan.prepared.objects if o.bbox[1] < 50)
    truth |= rasterise(bowtie.parts, (0, 0, WIDTH, HEIGHT))
    from PIL import Image

    checked = 0
    for split in ("train", "val"):
        for line in (root / f"{split}.jsonl").read_text().splitlines():
            record = json.loads(line)
            col0, row0, width, height = record["chip"]["window"]
            assert record["chip"]["crs"] == UTM and record["chip"]["gsd_m"] == PIXEL
            if record["prompt"]["kind"] == "text" and record["target"] == "class":
                mask = np.asarray(Image.open(root / record["mask"])) > 0
                assert np.array_equal(mask, truth[row0:row0 + height, col0:col0 + width])
                checked += 1
    assert checked >= len(PONDS) - 1
    # The held-out ponds lie east of the training ones.
    east_of_train = min(polygons.getFeature(i).geometry().boundingBox().xMinimum()
                        for i in plan.split.val)
    assert all(polygons.getFeature(i).geometry().boundingBox().xMaximum() <= east_of_train
               for i in plan.split.train)


@pytest.fixture
def provider(qgis_processing):
    registry = QgsApplication.processingRegistry()
    instance = UniGeoSegProvider()
    assert registry.addProvider(instance)
    yield registry.providerById("unigeoseg")
    registry.removeProvider("unigeoseg")


class ErrorFeedback(QgsProcessingFeedback):
    def __init__(self):
        super().__init__()
        self.errors: list[str] = []

    def reportError(self, error, fatalError=False):  # noqa: N802, N803 - QGIS API
        self.errors.append(error)
        super().reportError(error, fatalError)


def _run_failing(parameters: dict) -> str:
    """What the analyst reads when the algorithm fails (QGIS 3.22 reports the algorithm's
    exception to the feedback, and raises a generic one)."""
    import processing

    feedback = ErrorFeedback()
    with pytest.raises(QgsProcessingException) as caught:
        processing.run("unigeoseg:finetunemodel", parameters, feedback=feedback)
    return "\n".join([str(caught.value), *feedback.errors])


def _unused_loopback_address() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{sock.getsockname()[1]}"


def test_bad_layers_are_refused_before_looking_for_a_backend(provider, raster, polygons,
                                                             tmp_path):
    assert provider.algorithm("finetunemodel") is not None
    base = {"INPUT": raster, "POLYGONS": polygons, "INSTRUCTION": "pond", "NAME": "ponds",
            "STEPS": 5, "BACKEND": _unused_loopback_address()}
    few = QgsVectorLayer(_geopackage(tmp_path / "few.gpkg",
                                     [("pond", _square(*p)) for p in PONDS[:3]]),
                         "few", "ogr")
    QgsProject.instance().addMapLayer(few, False)
    try:
        assert "at least 4" in _run_failing({**base, "POLYGONS": few})
    finally:
        QgsProject.instance().removeMapLayer(few.id())
    assert "give the instruction" in _run_failing({**base, "INSTRUCTION": ""})
    assert "Name the new model" in _run_failing({**base, "NAME": "../x"})
    assert "budget" in _run_failing({**base, "STEPS": 0, "MINUTES": 0})
    # Good layers: the chips are planned, then the missing backend is what stops it.
    assert "No backend at" in _run_failing(base)


@pytest.fixture
def training_backend(tmp_path, monkeypatch):
    """A backend (the backend's Python) whose default model is a tiny random one, with an
    empty weights cache of its own."""
    import subprocess
    import textwrap

    from tests.conftest import REPO, backend_python, start_backend

    monkeypatch.setenv("UNIGEOSEG_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("UNIGEOSEG_MODEL", raising=False)
    monkeypatch.delenv("UNIGEOSEG_DEFAULT_MODEL", raising=False)
    base = tmp_path / "base"
    subprocess.run([backend_python(), "-c", textwrap.dedent(f"""
        from tests.backend.default_model_folders import save_tiny_default_model
        from unigeoseg_backend.default_model.weights_io import GsdRange
        save_tiny_default_model({str(base)!r}, "ft-base", GsdRange(0.1, 100.0))
    """)], check=True, timeout=300, cwd=REPO)
    backend = start_backend(tmp_path, "--default-model", str(base))
    yield backend
    backend.stop()


class RecordingFeedback(ErrorFeedback):
    def __init__(self):
        super().__init__()
        self.infos: list[str] = []

    def pushInfo(self, info):  # noqa: N802 - QGIS API
        self.infos.append(info)
        super().pushInfo(info)


def test_the_algorithm_fine_tunes_a_model_and_reports_held_out_iou(provider, raster, polygons,
                                                                   training_backend, tmp_path):
    import processing

    feedback = RecordingFeedback()
    split_path = str(tmp_path / "split.gpkg")
    result = processing.run("unigeoseg:finetunemodel", {
        "INPUT": raster, "POLYGONS": polygons, "INSTRUCTION": "pond", "NAME": "ponds",
        "STEPS": 3, "BACKEND": training_backend.address, "SPLIT": split_path},
        feedback=feedback)
    print("\n".join(feedback.infos))
    assert result["ENGINE"] == "default:ponds", feedback.errors
    assert result["BEFORE_IOU"] is not None and result["AFTER_IOU"] is not None
    assert any(info.startswith("Held-out IoU:") for info in feedback.infos)
    assert any(info.startswith("step 3/3") for info in feedback.infos)
    assert (tmp_path / "cache" / "weights" / "finetuned" / "ponds" / "model_card.json").is_file()
    split = QgsVectorLayer(result["SPLIT"], "split", "ogr")
    assert split.isValid()
    kinds = sorted({f["split"] for f in split.getFeatures()})
    assert "train" in kinds and "val" in kinds


class CancelOnceStarted(RecordingFeedback):
    """Presses Cancel as soon as the job is reported started."""

    def pushInfo(self, info):  # noqa: N802 - QGIS API
        super().pushInfo(info)
        if info.startswith("Job "):
            self.cancel()


def test_cancel_stops_the_job_and_no_model_is_made(provider, raster, polygons,
                                                  training_backend, tmp_path):
    import processing

    feedback = CancelOnceStarted()
    result = processing.run("unigeoseg:finetunemodel", {
        "INPUT": raster, "POLYGONS": polygons, "INSTRUCTION": "pond", "NAME": "ponds",
        "STEPS": 500, "BACKEND": training_backend.address}, feedback=feedback)
    assert "ENGINE" not in result or result["ENGINE"] is None
    assert "Cancelled: no model was made" in feedback.infos
    assert not (tmp_path / "cache" / "weights" / "finetuned" / "ponds").exists()


def test_a_backend_on_another_machine_gets_the_chips_uploaded_in_pieces(
        provider, raster, polygons, training_backend, monkeypatch):
    import processing
    from qgis_plugin.processing_algs import finetune

    # The loopback backend stands in for a remote one: the chips travel over the protocol.
    monkeypatch.setattr(finetune, "_is_local", lambda address: False)
    monkeypatch.setattr(finetune, "MAX_UPLOAD_CHUNK_BYTES", 4096)
    feedback = RecordingFeedback()
    result = processing.run("unigeoseg:finetunemodel", {
        "INPUT": raster, "POLYGONS": polygons, "INSTRUCTION": "pond", "NAME": "ponds-remote",
        "STEPS": 2, "BACKEND": training_backend.address}, feedback=feedback)
    print("\n".join(feedback.infos))
    assert result["ENGINE"] == "default:ponds-remote", feedback.errors
    assert any(info.startswith("Uploaded ") for info in feedback.infos)
    assert not any("reads the chip folder" in info for info in feedback.infos)
