"""RRSIS-D (RMSIN, CVPR 2024) in its REFER layout.

Layout (docs/datasets.md)::

    <root>/                          # REFER data_root (the official eval: rs_ref_seg/RRSIS-D)
      rrsisd/refs(unc).p             # pickle: list of ref dicts
      rrsisd/instances.json          # COCO-like: images, annotations (segmentation), categories
      images/rrsisd/JPEGImages/<file_name>

One sample per ref: ``sentences[0]['raw']``, the image of the ref's ``image_id`` (the
official loader indexes images by ``ref_id``, right only while the two are equal), the mask of
its ``ann_id``. ``split="test"`` selects refs whose split contains "test" (REFER); any other
split matches exactly.

WARNING: ``refs(unc).p`` is a pickle, and unpickling can run code. It is read only from the
root the user names, with :class:`RestrictedUnpickler`, which refuses every class and function
reference; the result must then be made of dict, list, str, int, float, bool and None only.

Masks are decoded when read (:func:`.coco_mask.segmentation_to_mask`): 3481 test masks of
800 x 800 would hold 2.2 GB. A mask has its RLE ``size`` (polygons: the image metadata's), which
for a few JPEGs is not the image's (800 x 787 images with 800 x 800 RLEs). As in the official
eval, the mask is returned at its own size and the evaluator letterboxes image and mask
independently.
"""

from __future__ import annotations

import json
import pickle
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from ..model.prompting import PromptTemplate
from ..restricted_pickle import RestrictedUnpickler
from .base import DatasetError, DatasetListing, Sample, SampleProblem, SampleReadError
from .coco_mask import SegmentationError, segmentation_to_mask
from .images import missing_problems, read_rgb

NAME = "rrsis-d"
REFS_FILE = "refs(unc).p"

# What a decoded refs pickle may contain.
_PLAIN_TYPES = (dict, list, str, int, float, bool, type(None))


def load_refs_pickle(path: Path) -> list[dict[str, Any]]:
    """The list of ref dicts in ``path``, read with :class:`RestrictedUnpickler`.

    Raises:
        DatasetError: unreadable, refused (a class or function reference), or anything but
            plain dict/list/str/int/float/bool/None inside a top-level list.
    """
    try:
        with open(path, "rb") as f:
            # REFER pickles come from Python 2 or 3; utf-8 decodes Python 2 str as text.
            refs = RestrictedUnpickler(
                f, holds="the refs pickle may only hold dicts, lists, strings and numbers",
                encoding="utf-8").load()
    except (OSError, pickle.UnpicklingError, EOFError, ValueError, UnicodeDecodeError) as exc:
        raise DatasetError(f"cannot load {path}: {exc}") from exc
    if not isinstance(refs, list) or not _is_plain(refs):
        raise DatasetError(f"{path} must be a list of plain dicts "
                           f"(dict/list/str/int/float/bool/None only)")
    return refs


def _is_plain(value: Any) -> bool:
    """True when ``value`` is built of :data:`_PLAIN_TYPES` only (iteratively: no recursion
    limit on deep data)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if type(item) not in _PLAIN_TYPES:
            return False
        if isinstance(item, dict):
            if not all(isinstance(k, (str, int)) for k in item):
                return False
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return True


def _data_root(root: Path) -> Path:
    """The REFER data_root: ``root``, or its parent when ``root`` is the ``rrsisd`` folder."""
    if not (root / "rrsisd").is_dir() and (root / REFS_FILE).is_file():
        return root.parent
    return root


def list_rrsis_d(root: Path, split: str = "test") -> DatasetListing:
    """List RRSIS-D refs of ``split``; sample ids are the ``ref_id`` as a string.

    Raises:
        DatasetError: no refs pickle or instances.json, or either unreadable.
    """
    root = _data_root(Path(root))
    refs_path = root / "rrsisd" / REFS_FILE
    instances_path = root / "rrsisd" / "instances.json"
    image_dir = root / "images" / "rrsisd" / "JPEGImages"
    for required in (refs_path, instances_path):
        if not required.is_file():
            raise DatasetError(f"RRSIS-D: missing {required} (expected the REFER layout "
                               f"rrsisd/{REFS_FILE}, rrsisd/instances.json, "
                               f"images/rrsisd/JPEGImages/)")
    refs = load_refs_pickle(refs_path)
    try:
        instances = json.loads(instances_path.read_text(encoding="utf-8-sig"))
        images = {img["id"]: img for img in instances["images"]}
        annotations = {ann["id"]: ann for ann in instances["annotations"]}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DatasetError(f"cannot read {instances_path}: {exc}") from exc

    listing = DatasetListing(name=NAME, root=root, split=split, samples=[])
    seen: set[str] = set()
    for i, ref in enumerate(refs):
        if not isinstance(ref, dict) or not _in_split(ref.get("split"), split):
            continue
        where = str(ref.get("ref_id", f"refs[{i}]"))
        try:
            sentence = ref["sentences"][0]["raw"]
            image_meta = images[ref["image_id"]]
            segmentation = annotations[ref["ann_id"]]["segmentation"]
            image_path = image_dir / image_meta["file_name"]
            if not isinstance(sentence, str) or not sentence.strip():
                raise ValueError("sentences[0]['raw'] is not a non-empty string")
        except (KeyError, IndexError, TypeError, ValueError) as exc:
            listing.problems.append(SampleProblem(where, f"ref {where} in {refs_path} is "
                                                         f"incomplete: {exc!r}"))
            continue
        if where in seen:
            listing.problems.append(SampleProblem(where, f"ref_id {where} appears twice"))
            continue
        missing = missing_problems(where, (image_path,))
        if missing:
            listing.problems.extend(missing)
            continue
        seen.add(where)
        listing.samples.append(Sample(
            sample_id=where, task="referring", template=PromptTemplate.RRSISD,
            instruction=sentence, answer=None, image_path=image_path,
            image_reader=partial(read_rgb, image_path),
            mask_reader=partial(_read_mask, segmentation, image_meta.get("height"),
                                image_meta.get("width"), image_path, where)))
    return listing


def _in_split(ref_split: Any, split: str) -> bool:
    """REFER's rule: ``test`` matches every split containing "test"; others exactly."""
    if not isinstance(ref_split, str):
        return False
    return split in ref_split if split == "test" else ref_split == split


def _read_mask(segmentation: Any, height: Any, width: Any, image_path: Path,
               ref_id: str) -> np.ndarray:
    """Decode one ref's mask (``H x W`` bool, its RLE's size; polygons on the metadata size,
    else on the decoded image's)."""
    if not (isinstance(height, int) and isinstance(width, int)):
        height = width = None
        if isinstance(segmentation, list) and any(isinstance(p, list) for p in segmentation):
            # Polygons need a grid and the metadata has none: the image's own (RLEs don't).
            height, width = read_rgb(image_path).shape[:2]
    try:
        return segmentation_to_mask(segmentation, height, width)
    except SegmentationError as exc:
        raise SampleReadError(f"cannot decode the segmentation of ref {ref_id} "
                              f"(image {image_path}): {exc}") from exc
