"""CRS between QGIS and the wire: the one conversion each way.

The backend reads a CRS as an authority code PROJ knows (``EPSG:32633``) or as WKT. QGIS also
has codes only this QGIS profile knows (``USER:100001`` for a CRS the analyst defined, or no
code at all for a raster's own definition): those travel as WKT2.
"""

from __future__ import annotations

from qgis.core import QgsCoordinateReferenceSystem

#: Authorities whose codes the backend's PROJ resolves.
WIRE_AUTHORITIES = ("EPSG", "ESRI", "IGNF", "OGC", "IAU_2015")


class CrsError(ValueError):
    """A CRS that cannot be sent to the backend or read back from it."""


def crs_to_wire(crs: QgsCoordinateReferenceSystem) -> str:
    """The CRS as the backend accepts it: an authority code PROJ knows, else WKT2.

    Raises:
        CrsError: the CRS has no definition at all.
    """
    authid = crs.authid()
    if authid and authid.split(":", 1)[0].upper() in WIRE_AUTHORITIES:
        return authid
    wkt = crs.toWkt(QgsCoordinateReferenceSystem.WktVariant.WKT_PREFERRED)
    if not wkt:
        raise CrsError(f"the CRS {crs.description() or authid!r} has no definition the "
                       f"backend can read")
    return wkt


def crs_from_wire(name: str) -> QgsCoordinateReferenceSystem:
    """The QGIS CRS of a wire CRS (authority code or WKT).

    Raises:
        CrsError: QGIS cannot read it.
    """
    crs = QgsCoordinateReferenceSystem(name)
    if not crs.isValid():
        crs = QgsCoordinateReferenceSystem.fromWkt(name)
    if not crs.isValid():
        raise CrsError(f"unknown CRS: {name[:80]}")
    return crs
