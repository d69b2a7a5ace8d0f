"""The official UniGeoSeg metrics: foreground IoU per sample, gIoU, cIoU and Pr@t.

Reproduces ``unigeoseg/eval_and_test/eval.py: compute_metric`` and ``RS_val_dataset.
preprocess_mask`` (MiliLab/UniGeoSeg @73abc28) without OpenCV:

* The ground-truth mask is letterboxed on its *own* grid like the image: the longest side to
  the model's input size with nearest-neighbour resampling (cv2.INTER_NEAREST), the other side
  truncated with ``int()``, centred zero padding (:func:`letterbox_mask`).
* Per sample the foreground intersection ``I`` and union ``U`` are counted on that square grid,
  padding included as background. ``IoU = I / (U + 1e-5)``, and 1.0 when ``U == 0`` (an empty
  target predicted empty scores 1).
* gIoU is the mean of the per-sample IoU, cIoU is ``sum(I) / (sum(U) + 1e-10)``, Pr@t is the
  fraction of samples with IoU strictly above t, t in 0.5 ... 0.9.

The official code counts with ``torch.histc`` on int32 CUDA tensors (whose output keeps the
input's dtype), so I and U are exact integers there too and the IoU is a float64 division; we
keep I and U as Python ints (no int32 running sum that could wrap) and derive every aggregate
from them in dataset order (:func:`summarize`), so a result does not depend on how the samples
were batched or sharded across processes.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from ..model.preprocess import Letterbox

#: The Pr@t thresholds of the official evaluation.
THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9)
#: Added to the union of one sample (official ``acc_iou``).
IOU_EPS = 1e-5
#: Added to the summed union (official ``iou_class``).
CIOU_EPS = 1e-10


def nearest_indices(src: int, dst: int) -> np.ndarray:
    """The source index OpenCV's INTER_NEAREST reads for each of ``dst`` output positions.

    ``cv::resizeNN`` computes ``ifx = 1 / (dst / src)`` in double precision and reads source
    ``min(floor(d * ifx), src - 1)`` for output ``d``: it is *not* pixel-centre aligned
    (cv2.INTER_NEAREST_EXACT is). Checked once against opencv-python-headless 4.14.0 and
    5.0.0 (``cv2.resize(m, (w, h), interpolation=cv2.INTER_NEAREST)``, x86-64): identical on
    random uint8 arrays for every size pair 1..64 -> 1..64 along each axis and on odd sizes
    (800 -> 512, 513 -> 512, 999 x 487 -> 249 x 512, 257 x 1531 -> 85 x 512, ...).
    """
    if src <= 0 or dst <= 0:
        raise ValueError(f"sizes must be positive, got {src} -> {dst}")
    inverse_scale = 1.0 / (dst / src)
    index = np.floor(np.arange(dst, dtype=np.float64) * inverse_scale).astype(np.int64)
    return np.minimum(index, src - 1)


def resize_nearest(mask: np.ndarray, height: int, width: int) -> np.ndarray:
    """An H x W array resampled to ``height x width`` exactly as cv2.INTER_NEAREST does."""
    rows = nearest_indices(mask.shape[0], height)
    cols = nearest_indices(mask.shape[1], width)
    return mask[rows[:, None], cols[None, :]]


def letterbox_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """An H x W bool mask in the ``size x size`` letterbox of its own grid (padding False).

    The same placement ``Letterbox.for_tile`` gives the image (new size truncated, centred
    padding), resampled with cv2.INTER_NEAREST semantics as the official ``preprocess_mask``.
    """
    if mask.ndim != 2:
        raise ValueError(f"expected a 2-D mask, got shape {mask.shape}")
    box = Letterbox.for_tile(mask.shape[0], mask.shape[1], size)
    canvas = np.zeros((size, size), dtype=bool)
    canvas[box.top:box.top + box.new_height, box.left:box.left + box.new_width] = \
        resize_nearest(mask.astype(bool, copy=False), box.new_height, box.new_width)
    return canvas


def largest_component_box(mask: np.ndarray) -> np.ndarray:
    """The official ``--rsvg`` transform (``eval.py: get_bounding_box_mask``): the filled
    bounding box of the mask's largest 8-connected component; an empty mask stays empty.

    Ties keep the component cv2.connectedComponentsWithStats labels first, the one whose first
    pixel comes first in row-major order. Components come from GDAL's polygonizer (8-connected),
    whose polygon area in pixel units is the component's pixel count.
    """
    import rasterio.features
    import shapely.geometry

    mask = np.asarray(mask, dtype=bool)
    best: list[shapely.geometry.base.BaseGeometry] = []
    best_area = 0.0
    for geometry, _ in rasterio.features.shapes(mask.astype(np.uint8), mask=mask,
                                                connectivity=8):
        polygon = shapely.geometry.shape(geometry)
        if polygon.area > best_area:
            best, best_area = [polygon], polygon.area
        elif polygon.area == best_area:
            best.append(polygon)
    box = np.zeros_like(mask)
    if not best:
        return box
    if len(best) > 1:  # rare: label order decides, as in cv2
        first = [int(np.argmax(rasterio.features.rasterize([p], out_shape=mask.shape).ravel()))
                 for p in best]
        best = [best[int(np.argmin(first))]]
    x0, y0, x1, y1 = (int(round(v)) for v in best[0].bounds)
    box[y0:y1, x0:x1] = True
    return box


def intersection_union(pred: np.ndarray, target: np.ndarray) -> tuple[int, int]:
    """Foreground ``(|pred and target|, |pred or target|)`` of two equal-shape bool masks."""
    if pred.shape != target.shape:
        raise ValueError(f"prediction {pred.shape} and target {target.shape} differ in shape")
    pred, target = pred.astype(bool, copy=False), target.astype(bool, copy=False)
    return (int(np.count_nonzero(pred & target)), int(np.count_nonzero(pred | target)))


def sample_iou(intersection: int, union: int) -> float:
    """The official per-sample foreground IoU: ``I / (U + 1e-5)``, 1.0 when ``U == 0``."""
    if union == 0:
        return 1.0
    return intersection / (union + IOU_EPS)


@dataclass(frozen=True)
class Summary:
    """The metrics of a set of samples.

    Attributes:
        count: samples that were evaluated (failed ones excluded).
        failed: samples that could not be evaluated (read or model error).
        giou, ciou: mean IoU and cumulative IoU; None when ``count`` is 0.
        precision: threshold -> fraction of samples with IoU > threshold (None when empty).
        intersection, union: the summed integer counts cIoU is made of.
    """

    count: int
    failed: int
    giou: float | None
    ciou: float | None
    precision: dict[float, float | None] = field(default_factory=dict)
    intersection: int = 0
    union: int = 0

    def as_dict(self) -> dict:
        """JSON-ready: ``Pr@0.5`` ... keys, plain numbers."""
        out = {"count": self.count, "failed": self.failed, "gIoU": self.giou,
               "cIoU": self.ciou}
        out.update({f"Pr@{t}": value for t, value in self.precision.items()})
        out.update({"intersection": self.intersection, "union": self.union})
        return out


def summarize(counts: Iterable[tuple[int, int] | None]) -> Summary:
    """The metrics of samples given in dataset order as ``(I, U)``, or None for a failure.

    gIoU is accumulated sample by sample in the given order, as the official AverageMeter
    does, so the same samples in the same order always give the same float.
    """
    ious: list[float] = []
    total_i = total_u = failed = 0
    for pair in counts:
        if pair is None:
            failed += 1
            continue
        intersection, union = pair
        ious.append(sample_iou(intersection, union))
        total_i += intersection
        total_u += union
    if not ious:
        return Summary(0, failed, None, None, {t: None for t in THRESHOLDS})
    giou = 0.0
    for iou in ious:  # sequential, not fsum: the official running sum
        giou += iou
    precision = {t: sum(1 for iou in ious if iou > t) / len(ious) for t in THRESHOLDS}
    return Summary(count=len(ious), failed=failed, giou=giou / len(ious),
                   ciou=total_i / (total_u + CIOU_EPS), precision=precision,
                   intersection=total_i, union=total_u)


def summarize_by_task(tasks: Sequence[str], counts: Sequence[tuple[int, int] | None],
                      order: Sequence[str] = ()) -> dict[str, Summary]:
    """Per task (first ``order``, then any other task as first seen) and ``"overall"``."""
    if len(tasks) != len(counts):
        raise ValueError(f"{len(tasks)} tasks for {len(counts)} samples")
    names = [t for t in order if t in tasks] + list(dict.fromkeys(
        t for t in tasks if t not in order))
    out = {name: summarize(c for t, c in zip(tasks, counts, strict=True) if t == name)
           for name in names}
    out["overall"] = summarize(counts)
    return out
