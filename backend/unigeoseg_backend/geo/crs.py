"""Coordinate reference systems: parsing client CRS text and cached transformers.

Every transformer here uses the traditional GIS axis order (``always_xy=True``): ``x`` is
east / longitude and ``y`` is north / latitude whatever the CRS definition says, which is the
order of the protocol's coordinates (see ``unigeoseg_protocol.params``).
"""

from __future__ import annotations

import json
import logging
import re
from functools import lru_cache

from pyproj import CRS, Transformer
from pyproj.exceptions import CRSError as PyprojCRSError

from ..errors import CRSError

logger = logging.getLogger(__name__)

#: Longest CRS text accepted. Real WKT2 (even a compound CRS) stays well below this; the cap
#: keeps a hostile request from handing PROJ megabytes to parse.
MAX_CRS_CHARS = 100_000

# "EPSG:32633", "epsg:4326", "OGC:CRS84", "ESRI:102100", "IAU_2015:30100", "EPSG:4326+5773".
# No "/" or "\" is allowed, so a Windows path such as "C:\\x.prj" or "C:/x.prj" cannot match.
_AUTHORITY_RE = re.compile(r"^([A-Za-z][A-Za-z0-9_]*):([A-Za-z0-9_.]+(?:\+[A-Za-z0-9_.]+)?)$")
# "urn:ogc:def:crs:EPSG::4326" and "urn:ogc:def:crs:OGC:1.3:CRS84".
_URN_RE = re.compile(r"^urn:ogc:def:crs:[A-Za-z0-9_.:]+$", re.IGNORECASE)
# A WKT1 or WKT2 document starts with its keyword and an opening bracket: PROJCS[, GEOGCRS[...
_WKT_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]*\s*[\[(]")
# A PROJ string: "+proj=utm +zone=33 ..." or "proj=utm zone=33 ...".
_PROJ_RE = re.compile(r"^\+?proj=", re.IGNORECASE)
# "+init=epsg:4326" or "init=/some/file:id": PROJ would look the definition up in a file.
_INIT_RE = re.compile(r"(^|\s)\+?init=", re.IGNORECASE)

_ACCEPTED = ("WKT, an authority code such as 'EPSG:32633' or 'OGC:CRS84', "
             "an OGC URN, or a PROJ string ('+proj=...')")


def _refuse(text: str, why: str) -> CRSError:
    shown = text if len(text) <= 80 else text[:77] + "..."
    return CRSError(f"unknown CRS {shown!r}: {why}", details={"crs": shown})


def parse_crs(text: str) -> CRS:
    """Parse CRS text from a client into a :class:`pyproj.CRS`.

    Args:
        text: WKT (1 or 2), an authority code (``"EPSG:32633"``, ``"epsg:4326"``,
            ``"OGC:CRS84"``), an OGC URN, or a PROJ string (``"+proj=utm +zone=33"``).

    Returns:
        The CRS. Its axis order is whatever the definition says; use :func:`transformer` (which
        is always x/y) to move coordinates.

    Raises:
        CRSError: empty, over-long or unrecognised text, text that looks like a file path or
            URL, ``+init=`` (which makes PROJ read init files), or a definition PROJ cannot
            resolve (``"EPSG:999999"``).
    """
    if not isinstance(text, str):
        raise CRSError(f"a CRS must be given as text ({_ACCEPTED}), got {type(text).__name__}")
    text = text.strip()
    if not text:
        raise CRSError(f"the CRS is empty: give {_ACCEPTED}")
    if len(text) > MAX_CRS_CHARS:
        raise _refuse(text, f"longer than {MAX_CRS_CHARS} characters")
    return _parse_crs_cached(text)


@lru_cache(maxsize=256)
def _parse_crs_cached(text: str) -> CRS:
    # Each accepted form goes to the pyproj constructor made for it. pyproj's from_user_input
    # (and PROJ's proj_create) also resolve free names, URLs and, with +init, files on disk:
    # none of which a request should be able to make the backend do.
    if _INIT_RE.search(text) and not _WKT_RE.match(text):
        raise _refuse(text, "'+init=' PROJ strings make PROJ read files; give the EPSG code")
    try:
        if _WKT_RE.match(text):
            return CRS.from_wkt(text)
        if text.startswith("{"):
            return CRS.from_json_dict(json.loads(text))
        if _PROJ_RE.match(text):
            if "/" in text or "\\" in text:
                # e.g. +nadgrids=/some/file: grid names are looked up on PROJ's own path.
                raise _refuse(text, "file paths are not accepted in PROJ strings")
            return CRS.from_proj4(text)
        match = _AUTHORITY_RE.match(text)
        if match:
            # PROJ's database keys authorities in upper case ("epsg:4326" is common in the wild).
            return CRS.from_string(f"{match.group(1).upper()}:{match.group(2)}")
        if _URN_RE.match(text):
            return CRS.from_string(text)
    except CRSError:
        raise
    except PyprojCRSError as exc:
        raise _refuse(text, f"PROJ cannot resolve it ({exc})") from exc
    except ValueError as exc:  # json.JSONDecodeError and pyproj's own ValueErrors
        raise _refuse(text, str(exc)) from exc
    if "://" in text or "/" in text or "\\" in text:
        raise _refuse(text, f"file paths and URLs are not accepted; give {_ACCEPTED}")
    raise _refuse(text, f"expected {_ACCEPTED}")


def crs_to_text(crs: CRS) -> str:
    """The shortest exact text for ``crs``: ``"AUTH:CODE"`` when an authority code matches the
    definition with full confidence, else WKT2. :func:`parse_crs` reads either back."""
    authority = crs.to_authority(min_confidence=100)
    if authority is not None:
        return f"{authority[0]}:{authority[1]}"
    return crs.to_wkt()


def same_crs(a: CRS, b: CRS) -> bool:
    """Whether coordinates in ``a`` are already coordinates in ``b`` in the x/y (east/north,
    lon/lat) order used throughout; e.g. EPSG:4326 and OGC:CRS84 are the same here."""
    return a is b or a.equals(b, ignore_axis_order=True)


def transformer(src: CRS, dst: CRS) -> Transformer:
    """A cached :class:`pyproj.Transformer` from ``src`` to ``dst``, x/y order on both sides.

    ``transform(x, y)`` takes and returns x = east/lon, y = north/lat. pyproj transformers are
    thread-safe (pyproj >= 3.1), so one cached instance serves every request thread.
    """
    return _transformer_cached(src.to_wkt(), dst.to_wkt())


@lru_cache(maxsize=64)
def _transformer_cached(src_wkt: str, dst_wkt: str) -> Transformer:
    # Keyed on WKT rather than on CRS objects: CRS hashing is not part of pyproj's documented
    # contract, WKT is, and two equal definitions parsed from different text share an entry.
    logger.debug("creating a transformer (cache miss)")
    return Transformer.from_crs(CRS.from_wkt(src_wkt), CRS.from_wkt(dst_wkt), always_xy=True)
