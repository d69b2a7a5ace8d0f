"""Benchmark and local dataset readers, shared by the evaluator and the trainer.

``open_dataset(name, root, split, task)`` lists one dataset's samples; each
:class:`Sample` reads its image and ground-truth mask on demand. Layouts, binarisation rules
and where we depart from the official loaders: docs/datasets.md.
"""

from __future__ import annotations

from pathlib import Path

from .base import (
    DatasetError,
    DatasetListing,
    Sample,
    SampleProblem,
    SampleReadError,
    parse_task,
    task_from_name,
)
from .earthreason import list_earthreason
from .geoseg_bench import list_geoseg_bench
from .images import MASK_RULES, check_mask_rule
from .local import list_local
from .refsegrs import list_refsegrs
from .rrsis_d import list_rrsis_d

#: Names ``open_dataset`` (and ``unigeoseg eval --dataset``) accepts.
DATASETS = ("geoseg-bench", "rrsis-d", "refsegrs", "earthreason", "local")

#: The one task of the single-task public benchmarks.
_FIXED_TASK = {"rrsis-d": "referring", "refsegrs": "referring",
               "earthreason": "reasoning"}

__all__ = [
    "DATASETS", "MASK_RULES", "DatasetError", "DatasetListing", "Sample", "SampleProblem",
    "SampleReadError", "open_dataset", "parse_task", "task_from_name",
]


def open_dataset(name: str, root: str | Path, split: str = "test",
                 task: str | None = None, *,
                 mask_rule: str = "official") -> DatasetListing:
    """List the samples of one dataset split.

    Args:
        name: one of :data:`DATASETS`.
        root: the dataset's root folder (docs/datasets.md says what each expects;
            GeoSeg-Bench also takes one task folder).
        split: ``test``, ``val``, ``train``, ... (the official eval allows only val/test for
            the public sets; the trainer needs train).
        task: a task name (``referring``/``ref``, ``interactive``/``intera``,
            ``reasoning``/``reason``). GeoSeg-Bench and local: only that task's samples
            (GeoSeg-Bench: required for a task folder with an unknown name). RRSIS-D and
            RefSegRS hold referring samples, EarthReason reasoning ones: another task is an
            error.
        mask_rule: ``official`` (default: GeoSeg-Bench and RefSegRS foreground = raw 255,
            also raw 1, as the official code counts them) or ``robust`` (raw > 127). The
            other datasets have one unambiguous rule (EarthReason != 0, local > 0, RRSIS-D
            decoded segments) and ignore it.

    Raises:
        DatasetError: unknown name, task or mask rule; the root or its index files missing or
            unreadable. Missing files of single samples are not errors: they are listed in
            ``DatasetListing.problems``.
    """
    key = name.strip().lower()
    if key not in DATASETS:
        raise DatasetError(f"unknown dataset {name!r}: use one of {', '.join(DATASETS)}")
    wanted = parse_task(task)
    check_mask_rule(mask_rule)
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DatasetError(f"{name} root {root} is not a directory")
    fixed = _FIXED_TASK.get(key)
    if fixed is not None and wanted is not None and wanted != fixed:
        raise DatasetError(f"{key} holds {fixed} samples only, not {wanted}")

    if key == "geoseg-bench":
        return list_geoseg_bench(root, split, wanted, mask_rule)
    if key == "rrsis-d":
        return list_rrsis_d(root, split)
    if key == "refsegrs":
        return list_refsegrs(root, split, mask_rule)
    if key == "earthreason":
        return list_earthreason(root, split)
    return list_local(root, split, wanted)
