"""Turn a tile's pixels (any band count, 8- to 64-bit) into the 8-bit RGB the models see.

Arrays are ``H x W`` or ``H x W x C`` (rows, columns, bands; band-last as QGIS renders and
the protocol frames send them). The output is ``H x W x 3`` uint8 plus an ``H x W`` validity
mask; invalid pixels are 0 in every channel.
"""

from __future__ import annotations

import logging
import math

import numpy as np

from unigeoseg_protocol.params import RasterOptions

from ..errors import BadFrameError, InvalidInputError, NoValidPixelsError

logger = logging.getLogger(__name__)

SUPPORTED_DTYPES = tuple(np.dtype(t) for t in (
    np.bool_, np.uint8, np.int8, np.uint16, np.int16, np.uint32, np.int32,
    np.float32, np.float64))
STRETCHES = ("auto", "minmax", "none")
#: Percentiles of the valid pixels mapped to 0 and 255 by the percentile stretch.
PERCENTILES = (2.0, 98.0)
#: At most this many valid pixels per band go into a percentile (a regular subsample beyond);
#: the 2nd/98th percentiles of a million samples are stable to well under one output level.
MAX_PERCENTILE_SAMPLES = 1_000_000


def _check_frame(pixels: np.ndarray) -> np.ndarray:
    """``pixels`` as an ``H x W x C`` view, or BadFrameError."""
    if not isinstance(pixels, np.ndarray):
        raise BadFrameError(f"pixels must be a numpy array, got {type(pixels).__name__}")
    if pixels.ndim not in (2, 3):
        raise BadFrameError(f"pixels must be H x W or H x W x C, got shape {pixels.shape}")
    if pixels.size == 0:
        raise BadFrameError(f"pixels are empty (shape {pixels.shape})")
    if pixels.dtype not in SUPPORTED_DTYPES:
        names = ", ".join(d.name for d in SUPPORTED_DTYPES)
        raise BadFrameError(f"pixel dtype {pixels.dtype} is not supported (use one of {names})")
    return pixels[:, :, np.newaxis] if pixels.ndim == 2 else pixels


def _choose_bands(n_bands: int, bands: tuple[int, ...] | None) -> tuple[int, int, int]:
    """Source band index for each of R, G, B."""
    if bands is None:
        return (0, 0, 0) if n_bands < 3 else (0, 1, 2)
    bands = tuple(bands)
    if len(bands) not in (1, 3):
        raise InvalidInputError(f"raster.bands must list 1 or 3 band indices, got {bands!r}")
    for b in bands:
        if isinstance(b, bool) or not isinstance(b, (int, np.integer)) or not 0 <= b < n_bands:
            raise InvalidInputError(
                f"raster.bands index {b!r} does not exist: the tile has {n_bands} band(s), "
                f"indices 0 to {n_bands - 1}")
    return (bands[0],) * 3 if len(bands) == 1 else bands  # type: ignore[return-value]


def _nodata_for(dtype: np.dtype, nodata: float | None) -> float | int | None:
    """``nodata`` as a value a pixel of ``dtype`` can equal, or None when none can (NaN, or an
    integer dtype with a fractional or out-of-range nodata: comparing would be pointless and
    numpy 2 refuses out-of-range Python ints)."""
    if nodata is None or math.isnan(nodata):
        return None  # NaN is caught by the finiteness test of float bands
    if dtype.kind == "f":
        # Compared as a weak Python float, i.e. in the band's precision, as GDAL does: a
        # float32 band's -3.4028235e38 matches nodata -3.4028234663852886e38.
        return float(nodata)
    if dtype.kind == "b":
        return bool(nodata) if nodata in (0.0, 1.0) else None
    if not float(nodata).is_integer():
        return None
    info = np.iinfo(dtype)
    value = int(nodata)
    return value if info.min <= value <= info.max else None


def _valid_mask(frame: np.ndarray, used: list[int], nodata: float | int | None,
                alpha: np.ndarray | None) -> np.ndarray | None:
    """``H x W`` bool, True where every used band is finite and not nodata and alpha > 0;
    None when every pixel is valid by construction (saves work on the common 8-bit path)."""
    valid: np.ndarray | None = None

    def _and(cond: np.ndarray) -> None:
        nonlocal valid
        if valid is None:
            valid = cond
        else:
            np.logical_and(valid, cond, out=valid)

    for b in used:
        band = frame[:, :, b]
        if frame.dtype.kind == "f":
            _and(np.isfinite(band))
        if nodata is not None:
            _and(band != nodata)
    if alpha is not None:
        _and(alpha != 0)
    return valid


def _sample(band: np.ndarray, valid: np.ndarray | None) -> np.ndarray:
    """The valid values of a 2-D band, subsampled with a regular stride to at most
    :data:`MAX_PERCENTILE_SAMPLES` values (a copy only of what is kept)."""
    flat = band.reshape(-1)  # a view for band-last C-ordered frames
    step = max(1, math.ceil(flat.size / MAX_PERCENTILE_SAMPLES))
    if valid is None:
        return flat[::step]
    flat_valid = valid.reshape(-1)
    values = flat[::step][flat_valid[::step]]
    if values.size == 0:
        # The stride missed the (few) valid pixels; they are few, so take them all.
        values = flat[flat_valid]
    if values.size > MAX_PERCENTILE_SAMPLES:
        values = values[:: math.ceil(values.size / MAX_PERCENTILE_SAMPLES)]
    return values


def percentile_ranges(pixels: np.ndarray, raster: RasterOptions
                      ) -> tuple[tuple[float, float], ...] | None:
    """The ``(low, high)`` per output channel that :func:`to_rgb8` would stretch ``pixels``
    with under ``raster``'s stretch (``raster.value_range`` for a whole raster, computed on
    a decimated read of it), or None where that stretch keeps the values (8-bit under
    ``auto`` or ``none``, any dtype under ``none``).

    Raises:
        NoValidPixelsError: no pixel is valid.
    """
    frame = _check_frame(pixels)
    if raster.stretch == "none" or (frame.dtype in (np.uint8, np.bool_)
                                    and raster.stretch == "auto"):
        return None
    rgb_src = _choose_bands(frame.shape[2], raster.bands)
    used = sorted(set(rgb_src))
    valid = _valid_mask(frame, used, _nodata_for(frame.dtype, raster.nodata), None)
    if valid is not None and not valid.any():
        raise NoValidPixelsError("every pixel of the raster's sample is nodata",
                                 details={"nodata": raster.nodata})
    stretch = "percentile" if raster.stretch == "auto" else raster.stretch
    ranges = []
    for b in rgb_src:
        lo, hi = _band_range(frame[:, :, b], valid, stretch)
        ranges.append((lo, hi) if hi > lo else (lo, lo + 1.0))
    return tuple(ranges)


def _band_range(band: np.ndarray, valid: np.ndarray | None, stretch: str) -> tuple[float, float]:
    """``(lo, hi)`` of a band's valid values to map onto 0..255.

    Percentile stretch falls back to min/max when the 2nd and 98th percentiles coincide (a
    mostly flat band with a few features, e.g. sparse bright targets on 0); a band that is
    constant even then gets ``lo == hi`` and becomes 0 (see :func:`_stretch_band`).
    """
    if stretch == "percentile":
        lo, hi = np.percentile(_sample(band, valid), PERCENTILES)
        if hi > lo:
            return float(lo), float(hi)
    return _valid_min_max(band, valid)


def _valid_min_max(band: np.ndarray, valid: np.ndarray | None) -> tuple[float, float]:
    """Exact min and max of a band's valid values (every pixel, no subsample: extremes are
    what a sample misses), without copying the valid values out."""
    if valid is None:
        return float(band.min()), float(band.max())
    if band.dtype.kind == "f":
        low, high = np.inf, -np.inf
    else:
        info = np.iinfo(band.dtype)
        low, high = info.max, info.min
    return (float(np.min(band, where=valid, initial=low)),
            float(np.max(band, where=valid, initial=high)))


def _stretch_band(band: np.ndarray, lo: float, hi: float, valid: np.ndarray | None,
                  out: np.ndarray) -> None:
    """Write ``round((band - lo) * 255 / (hi - lo))`` clipped to 0..255 into the uint8 ``out``.

    A constant band (``hi <= lo``) writes 0: every value sits at the low end of its range, and
    there is no contrast to stretch.
    """
    if not hi > lo:
        out[...] = 0
        return
    # float32 keeps 24 bits, ample for <= 16-bit data; wider data needs float64 to keep
    # (band - lo) exact before the scale.
    work_dtype = np.float32 if band.dtype.itemsize <= 2 or band.dtype == np.float32 \
        else np.float64
    work = band.astype(work_dtype)
    if valid is not None:
        # Invalid values (NaN, inf, -3.4e38 nodata) must not reach the arithmetic: they would
        # overflow, and NaN makes the uint8 cast undefined. They are zeroed by the caller.
        work[~valid] = work_dtype(lo)
    with np.errstate(over="ignore"):  # a huge valid outlier becomes inf, then clips to 255
        work -= work_dtype(lo)
        work *= work_dtype(255.0 / (hi - lo))
    np.clip(work, 0, 255, out=work)
    np.rint(work, out=work)
    out[...] = work


def _clip_band(band: np.ndarray, valid: np.ndarray | None, out: np.ndarray) -> None:
    """Write ``band`` clipped to 0..255 (floats rounded) into the uint8 ``out``."""
    if band.dtype == np.uint8:
        out[...] = band
        return
    if band.dtype.kind == "f":
        work = np.clip(band, 0, 255)
        if valid is not None:
            work[~valid] = 0
        np.rint(work, out=work)
        out[...] = work
        return
    # The upper limit must be representable in the band's dtype (int8 stops at 127).
    out[...] = np.clip(band, 0, min(255, np.iinfo(band.dtype).max))


def to_rgb8(pixels: np.ndarray, raster: RasterOptions) -> tuple[np.ndarray, np.ndarray]:
    """Normalise a tile's pixels to 8-bit RGB.

    Args:
        pixels: ``H x W`` or ``H x W x C`` (``C >= 1``), dtype bool, uint8, int8, uint16,
            int16, uint32, int32, float32 or float64. Bool is read as 0 / 255.
        raster: band choice, nodata and stretch:

            * ``bands``: R, G, B source indices (one index: grey replicated to three).
              Without it: one or two bands give grey from band 0, three or more give bands
              0, 1, 2. A 4-band uint8 tile without explicit bands is RGBA (a QGIS render)
              and alpha 0 marks a pixel invalid.
            * ``nodata``: a pixel whose value in any used band equals it is invalid. NaN and
              +-inf are always invalid.
            * ``value_range``: when given, channel ``k``'s ``(low, high)`` maps to 0..255 for
              any dtype, and ``stretch`` is not used (one stretch for a whole raster).
            * ``stretch``: ``auto`` keeps uint8 (and bool) as is and percentile-stretches
              anything else; ``minmax`` maps each band's valid min..max to 0..255;
              ``none`` clips values to 0..255 (floats rounded). The percentile stretch maps
              each band's 2nd..98th percentile of valid pixels (estimated on at most
              :data:`MAX_PERCENTILE_SAMPLES` of them) linearly to 0..255, and falls back to
              min..max when those coincide. A band with a single value becomes 0.

    Returns:
        ``(rgb, valid)``: C-contiguous ``H x W x 3`` uint8 (0 at invalid pixels) and
        ``H x W`` bool.

    Raises:
        BadFrameError: not 2-D or 3-D, empty, or an unsupported dtype.
        InvalidInputError: a band index out of range, or an unknown stretch.
        NoValidPixelsError: every pixel is invalid.
    """
    frame = _check_frame(pixels)
    if raster.stretch not in STRETCHES:
        raise InvalidInputError(f"raster.stretch must be one of {STRETCHES}, "
                                f"got {raster.stretch!r}")
    height, width, n_bands = frame.shape
    rgb_src = _choose_bands(n_bands, raster.bands)
    used = sorted(set(rgb_src))

    alpha = None
    if raster.bands is None and n_bands == 4 and frame.dtype == np.uint8:
        alpha = frame[:, :, 3]
    valid = _valid_mask(frame, used, _nodata_for(frame.dtype, raster.nodata), alpha)
    if valid is not None and not valid.any():
        raise NoValidPixelsError(
            f"all {height} x {width} pixels are nodata"
            + (f" (nodata = {raster.nodata})" if raster.nodata is not None else "")
            + (", NaN/inf" if frame.dtype.kind == "f" else "")
            + (" or transparent" if alpha is not None else ""),
            details={"nodata": raster.nodata})

    if frame.dtype == np.bool_:
        # 0 / 255 under every stretch, then handled like uint8. Bool and uint8 share a byte
        # layout, so the view costs nothing; the multiply is the one copy.
        frame = frame.view(np.uint8) * np.uint8(255)

    rgb = np.empty((height, width, 3), dtype=np.uint8)
    if raster.value_range is not None:
        ranges = raster.value_range
        if len(ranges) not in (1, 3):
            raise InvalidInputError(f"raster.range needs 1 or 3 (low, high) pairs, got "
                                    f"{len(ranges)}")
        for k, b in enumerate(rgb_src):
            lo, hi = ranges[k if len(ranges) == 3 else 0]
            _stretch_band(frame[:, :, b], float(lo), float(hi), valid, rgb[:, :, k])
    elif frame.dtype == np.uint8 and raster.stretch in ("auto", "none"):
        start = rgb_src[0]
        if rgb_src == (start, start + 1, start + 2):
            np.copyto(rgb, frame[:, :, start:start + 3])  # the single copy of the 8-bit path
        else:
            for k, b in enumerate(rgb_src):
                rgb[:, :, k] = frame[:, :, b]
    else:
        stretch = "percentile" if raster.stretch == "auto" else raster.stretch
        done: dict[int, int] = {}  # source band -> output channel already holding it
        for k, b in enumerate(rgb_src):
            if b in done:
                rgb[:, :, k] = rgb[:, :, done[b]]
                continue
            band = frame[:, :, b]
            if stretch == "none":
                _clip_band(band, valid, rgb[:, :, k])
            else:
                lo, hi = _band_range(band, valid, stretch)
                logger.debug("band %d: %s stretch %g..%g", b, stretch, lo, hi)
                _stretch_band(band, lo, hi, valid, rgb[:, :, k])
            done[b] = k

    if valid is None:
        valid = np.ones((height, width), dtype=bool)
    else:
        rgb[~valid] = 0
    return rgb, valid
