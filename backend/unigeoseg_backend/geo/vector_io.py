"""Write segment polygons to GeoPackage / GeoJSON files, atomically.

A write never modifies the target in place: the new file is built next to it (same directory,
so same filesystem) and moved over it with one ``os.replace``. A crash, a full disk or an error
half-way leaves the previous file byte for byte as it was. The CRS GDAL recorded is read back
and checked before the move, so a file never claims a CRS other than its coordinates'.

:func:`write_vector` writes a file at once; :class:`StagedLayer` streams features into a
GeoPackage part by part (whole-raster runs) with the same guarantees.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import math
import os
import shutil
import tempfile
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyogrio
import pyogrio.raw
import shapely
from pyproj import CRS

from ..errors import CRSError, InvalidInputError
from .crs import crs_to_text, parse_crs, same_crs
from .vectorize import per_feature

logger = logging.getLogger(__name__)

DRIVERS = {".gpkg": "GPKG", ".geojson": "GeoJSON"}
#: Attributes always stored as real numbers, even when every value given is an integer, so
#: that a later append of 0.87 does not meet an integer column.
REAL_FIELDS = frozenset({"score"})
#: GeoJSON: 17 significant figures round-trip every float64 coordinate exactly (GDAL's
#: default for the 2008 format is 15 decimals, which is not exact for degrees).
_GEOJSON_OPTIONS = {"SIGNIFICANT_FIGURES": "17"}

_locks_guard = threading.Lock()
_locks: dict[str, threading.Lock] = {}


class VectorFileExistsError(InvalidInputError, FileExistsError):
    """The target file exists and ``overwrite`` is False."""


def _path_lock(path: Path) -> threading.Lock:
    """One lock per target file, so two requests of this process never interleave their
    read-copy-replace cycles on it (other processes are not covered)."""
    key = os.path.normcase(os.path.abspath(path))
    with _locks_guard:
        return _locks.setdefault(key, threading.Lock())


def _driver_for(path: Path) -> str:
    driver = DRIVERS.get(path.suffix.lower())
    if driver is None:
        raise InvalidInputError(f"cannot write {path.name!r}: the file name must end in "
                                f"{' or '.join(DRIVERS)}")
    return driver


# -- attributes ------------------------------------------------------------------------------

def _attr_value(value: Any) -> Any:
    """An attribute value as a plain scalar: numpy scalars unwrapped, dates as ISO 8601 text,
    lists and dicts as JSON text, NaN as null."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, (_dt.datetime, _dt.date)):
        return value.isoformat()
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value)
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def _field_array(name: str, values: list[Any]) -> tuple[np.ndarray, np.ndarray]:
    """One attribute column as ``(data, null_mask)``; the dtype picks the OGR field type
    (bool, int64, float64, or text for anything else)."""
    null = np.array([v is None for v in values], dtype=bool)
    present = [v for v in values if v is not None]
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in present)
    if present and all(isinstance(v, bool) for v in present) and name not in REAL_FIELDS:
        return np.array([bool(v) if v is not None else False for v in values], dtype=bool), null
    if present and numeric and name not in REAL_FIELDS \
            and all(isinstance(v, int) for v in present):
        return np.array([v if v is not None else 0 for v in values], dtype=np.int64), null
    if present and numeric:
        return np.array([v if v is not None else math.nan for v in values],
                        dtype=np.float64), null
    if name in REAL_FIELDS and not present:
        return np.full(len(values), math.nan), null
    return np.array([None if v is None else str(v) for v in values], dtype=object), null


def _fields(properties: Sequence[Mapping[str, Any]] | Mapping[str, Any] | None,
            n: int) -> tuple[list[str], list[np.ndarray], list[np.ndarray]]:
    """Attribute names, columns and null masks for ``n`` features. Names are the union of the
    dicts' keys in first-seen order; a key a dict lacks is null there."""
    props = per_feature(properties, n)
    names: dict[str, None] = {}
    for p in props:
        if not isinstance(p, Mapping):
            raise InvalidInputError(f"properties must be dicts, got {type(p).__name__}")
        names.update(dict.fromkeys(str(k) for k in p))
    columns, masks = [], []
    for name in names:
        data, null = _field_array(name, [_attr_value(p.get(name)) for p in props])
        columns.append(data)
        masks.append(null)
    return list(names), columns, masks


def _geometry_wkb(geoms: Sequence[shapely.Geometry]) -> tuple[np.ndarray, str]:
    """WKB of the geometries and the layer geometry type."""
    arr = np.asarray(list(geoms), dtype=object).reshape(-1)
    if not all(isinstance(g, shapely.Geometry) for g in arr):
        raise InvalidInputError("geometries must be shapely geometries")
    types = set(shapely.get_type_id(arr).tolist()) if arr.size else {3}
    if types == {3}:
        geometry_type = "Polygon"
    elif types <= {3, 6}:
        geometry_type = "MultiPolygon"  # promote_to_multi converts the polygons
    else:
        geometry_type = "Unknown"
    return shapely.to_wkb(arr), geometry_type


# -- the atomic write ------------------------------------------------------------------------

def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # Windows cannot open directories; os.replace is still atomic there
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_layer(path: Path, driver: str, layer: str, geoms: Sequence[shapely.Geometry],
                 properties: Any, crs: CRS, append: bool) -> None:
    """Write (or append) one layer with pyogrio; the CRS is passed as exact text (pyogrio's
    DataFrame writer would round it to an EPSG code that matches at only 70% confidence)."""
    wkb, geometry_type = _geometry_wkb(geoms)
    names, columns, masks = _fields(properties, len(wkb))
    pyogrio.raw.write(str(path), wkb, columns, names, field_mask=masks, layer=layer,
                      driver=driver, geometry_type=geometry_type, crs=crs_to_text(crs),
                      promote_to_multi=geometry_type == "MultiPolygon", append=append,
                      layer_options=_GEOJSON_OPTIONS if driver == "GeoJSON" else None)


def _check_written_crs(path: Path, layer: str, crs: CRS) -> None:
    """Read back the CRS GDAL recorded and refuse a file that would mislabel its coordinates
    (GeoJSON, for one, silently drops a CRS that has no authority code)."""
    written = pyogrio.read_info(str(path), layer=layer).get("crs")
    if written is None or not same_crs(parse_crs(written), crs):
        raise CRSError(f"{path.suffix} cannot record the CRS {crs.name!r} "
                       f"(it would read back as {written!r}); write a .gpkg instead",
                       details={"crs": crs_to_text(crs)})


def _commit_file(tmp: Path, path: Path, overwrite: bool) -> None:
    """Move the finished ``tmp`` onto ``path`` atomically."""
    _fsync(tmp)
    if overwrite:
        os.replace(tmp, path)
    else:
        # link() fails if the target appeared meanwhile, where replace() would clobber it.
        try:
            os.link(tmp, path)
        except FileExistsError as exc:
            raise _exists(path) from exc
        except OSError:  # a filesystem without hard links: check, then replace
            if path.exists():
                raise _exists(path) from None
            os.replace(tmp, path)
    _fsync_dir(path.parent)


def _exists(path: Path) -> VectorFileExistsError:
    return VectorFileExistsError(f"{path} exists; pass overwrite=True to replace it",
                                 details={"path": str(path)})


class StagedLayer:
    """A new vector file with one layer, built in a private folder next to ``path`` and moved
    onto ``path`` by :meth:`commit`.

    Use it as a context manager: leaving the ``with`` block removes the folder, and with it
    whatever was written when :meth:`commit` was not reached (an error, Ctrl+C), so ``path`` is
    either untouched or the complete new file. While the block runs, no other write of this
    process goes to ``path``.

    Args:
        path: target file; the suffix picks the driver (``.gpkg`` GeoPackage, ``.geojson``
            GeoJSON). Its directory must exist.
        crs: CRS of every geometry appended, recorded in the file.
        layer: layer name (GeoPackage table; GeoJSON "name").
        overwrite: replace an existing file (the whole file, every layer of it).

    Raises (on entering):
        InvalidInputError: unsupported suffix.
        VectorFileExistsError: ``path`` exists and ``overwrite`` is False.
    """

    def __init__(self, path: str | os.PathLike, crs: CRS, layer: str = "segments",
                 overwrite: bool = False):
        self.path = Path(path)
        self.driver = _driver_for(self.path)
        self.crs, self.layer, self.overwrite = crs, layer, overwrite
        self.count = 0  # features appended so far
        self._created = False

    def __enter__(self) -> StagedLayer:
        self._lock = _path_lock(self.path)
        self._lock.acquire()
        try:
            if self.path.exists() and not self.overwrite:
                raise _exists(self.path)
            self._dir = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.", suffix=".tmp",
                                              dir=self.path.parent))
        except BaseException:
            self._lock.release()
            raise
        self._tmp = self._dir / self.path.name
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            shutil.rmtree(self._dir, ignore_errors=True)
        finally:
            self._lock.release()

    def append(self, geoms: Sequence[shapely.Geometry],
               properties: Sequence[Mapping[str, Any]] | Mapping[str, Any] | None) -> None:
        """Add features (geometries in ``crs`` with their attributes, as for
        :func:`write_vector`). Only a GeoPackage takes more than one non-empty part."""
        geoms = list(geoms)
        if not geoms:
            return
        if self._created and self.driver != "GPKG":
            raise InvalidInputError(f"{self.path.name}: only a GeoPackage is written in parts")
        _write_layer(self._tmp, self.driver, self.layer, geoms, properties, self.crs,
                     append=self._created)
        self._created = True
        self.count += len(geoms)

    def commit(self) -> Path:
        """Check the CRS recorded and move the file onto ``path`` (an empty layer when nothing
        was appended)."""
        if not self._created:
            _write_layer(self._tmp, self.driver, self.layer, [], None, self.crs, append=False)
            self._created = True
        _check_written_crs(self._tmp, self.layer, self.crs)
        _commit_file(self._tmp, self.path, self.overwrite)
        return self.path


def write_vector(path: str | os.PathLike, geoms: Sequence[shapely.Geometry],
                 properties: Sequence[Mapping[str, Any]] | Mapping[str, Any] | None, crs: CRS,
                 layer: str = "segments", overwrite: bool = False) -> Path:
    """Write geometries and their attributes as a new ``.gpkg`` or ``.geojson`` file.

    Args:
        path: target file; the suffix picks the driver (``.gpkg``: GeoPackage,
            ``.geojson``: GeoJSON). Its directory must exist.
        geoms: shapely geometries (polygons) in ``crs``, x/y order.
        properties: one dict per geometry (or one shared dict), e.g. ``score`` (float),
            ``engine``, ``model``, ``task``, ``prompt``, ``created`` (ISO 8601 text; datetimes
            are converted). Lists and dicts are stored as JSON text.
        crs: CRS of ``geoms``, recorded in the file.
        layer: layer name (GeoPackage table; GeoJSON "name").
        overwrite: replace an existing file (the whole file, every layer of it).

    Returns:
        ``path`` as a Path.

    Raises:
        InvalidInputError: unsupported suffix, or properties not matching geoms.
        VectorFileExistsError: ``path`` exists and ``overwrite`` is False (an
            InvalidInputError and a FileExistsError).
        CRSError: the format cannot record ``crs`` (GeoJSON without an authority code).
        OSError, pyogrio errors: the write itself failed; ``path`` is then untouched.
    """
    geoms = list(geoms)
    with StagedLayer(path, crs, layer, overwrite) as staged:
        if geoms:
            staged.append(geoms, properties)
        else:  # still check the properties given for no geometries
            _fields(properties, 0)
        written = staged.commit()
    logger.info("wrote %d feature(s) to %s (layer %s)", len(geoms), written, layer)
    return written
