"""GeoSeg-Bench (UniGeoSeg's benchmark, HF ``nishuo1999/GeoSeg-Bench``).

Layout (docs/datasets.md)::

    <benchmark>/
      ref/ | referring/            {split}.json  or  {split}/{split}.json
      interactive/ | intera/       ...
      reason/ | reasoning/         ...

``{split}.json`` is a list of ``{"img", "mask", "json"}`` entries with relative paths; each is
resolved against the index file's own directory first, then the task folder (the released
eval.sh points at ``<task>/test`` and the HF copy keeps ``<task>/test.json``: both work). The
per-sample JSON holds ``question`` (list, index 0 used) and ``reason`` (list, may be empty;
index 0 fills ``<answer>``).

The task comes from the task folder's exact name (or ``task=``), never from a substring of
the path: the official ``'/intera/' in path`` test sends the released ``interactive/``
samples down the reasoning branch.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import Any

from ..model.prompting import PromptTemplate
from .base import (
    DatasetError,
    DatasetListing,
    Sample,
    SampleProblem,
    SampleReadError,
    read_question_record,
    task_from_name,
)
from .images import missing_problems, read_mask, read_rgb

NAME = "geoseg-bench"


def list_geoseg_bench(root: Path, split: str = "test", task: str | None = None,
                      mask_rule: str = "official") -> DatasetListing:
    """List GeoSeg-Bench samples.

    Args:
        root: the benchmark root (task folders inside), one task folder, or a task folder's
            ``{split}`` sub-folder (eval.sh style, ``.../ref/test``).
        split: the index file is ``{split}.json``.
        task: only this task's folder (benchmark root); for a folder whose name is no task
            name it says which task the folder holds (required then).
        mask_rule: ``official`` (raw 255 or 1 is foreground) or ``robust`` (raw > 127).

    Sample ids are ``<task>/<entry index>:<image stem>`` (e.g. ``interactive/2:int_0002``).

    Raises:
        DatasetError: no root, no index file, an unreadable index, or no way to tell the task.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"GeoSeg-Bench root {root} is not a directory")
    rule = "official255" if mask_rule == "official" else "over127"
    listing = DatasetListing(name=NAME, root=root, split=split, samples=[])

    folders = _task_folders(root, split, task)
    for folder, folder_task, index in folders:
        try:
            index = index or _find_index(folder, split)
            entries = _read_index(index)
        except DatasetError as exc:
            if len(folders) == 1:
                raise
            # One task folder without this split must not hide the others' samples.
            listing.problems.append(SampleProblem(str(folder), str(exc)))
            continue
        for i, entry in enumerate(entries):
            sample = _entry_sample(entry, i, folder_task, index.parent, folder, rule,
                                   listing.problems)
            if sample is not None:
                listing.samples.append(sample)
    return listing


def _task_folders(root: Path, split: str,
                  task: str | None) -> list[tuple[Path, str, Path | None]]:
    """``(task folder, task, index file if already found)`` to read, sorted by folder name."""
    index = _find_index(root, split, required=False)
    if index is not None:
        # One task folder, or (eval.sh style) the split sub-folder inside a task folder.
        folder, named = root, task_from_name(root.name)
        if named is None and root.name == split and task_from_name(root.parent.name):
            folder, named = root.parent, task_from_name(root.parent.name)
        if named is None and task is None:
            raise DatasetError(
                f"cannot tell the task of {root}: its folder name is none of ref, "
                f"referring, interactive, intera, reason, reasoning; pass the task")
        if named is not None and task is not None and named != task:
            raise DatasetError(f"{folder} is a {named} folder, not {task}")
        return [(folder, task or named, index)]  # type: ignore[list-item]

    found: dict[str, Path] = {}
    for child in sorted(p for p in root.iterdir() if p.is_dir()):
        child_task = task_from_name(child.name)
        if child_task is None or (task is not None and child_task != task):
            continue
        if child_task in found:
            raise DatasetError(f"both {found[child_task].name}/ and {child.name}/ in {root} "
                               f"hold {child_task} samples; pass one of them as root")
        found[child_task] = child
    if not found:
        wanted = f" for task {task}" if task is not None else ""
        raise DatasetError(
            f"no GeoSeg-Bench task folder{wanted} in {root} and no {split}.json in it: "
            f"expected ref/, interactive/, reason/ (or referring/, intera/, reasoning/)")
    return [(path, t, None) for path, t in sorted((p, t) for t, p in found.items())]


def _find_index(folder: Path, split: str, required: bool = True) -> Path | None:
    """``<folder>/{split}.json`` or ``<folder>/{split}/{split}.json``."""
    for candidate in (folder / f"{split}.json", folder / split / f"{split}.json"):
        if candidate.is_file():
            return candidate
    if required:
        raise DatasetError(f"no {split}.json in {folder} or {folder / split}")
    return None


def _read_index(index: Path) -> list[Any]:
    try:
        entries = json.loads(index.read_text(encoding="utf-8-sig"))
    except (OSError, ValueError) as exc:
        raise DatasetError(f"cannot read the index {index}: {exc}") from exc
    if not isinstance(entries, list):
        raise DatasetError(f"the index {index} is not a JSON list")
    return entries


def _resolve(relative: str, index_dir: Path, task_dir: Path) -> Path:
    """The first existing of index_dir/relative, task_dir/relative; else the former."""
    first = index_dir / relative
    if first.exists():
        return first
    second = task_dir / relative
    return second if second.exists() else first


def _entry_sample(entry: Any, i: int, task: str, index_dir: Path, task_dir: Path, rule: str,
                  problems: list[SampleProblem]) -> Sample | None:
    """The Sample of index entry ``i``, or None with a problem appended."""
    where = f"{task}/{i}"
    if not isinstance(entry, dict) or not all(
            isinstance(entry.get(k), str) and entry.get(k) for k in ("img", "mask", "json")):
        problems.append(SampleProblem(where, f"index entry {i} in {index_dir} lacks "
                                             f"'img', 'mask' or 'json' paths: {entry!r}"))
        return None
    image, mask, text = (_resolve(entry[k], index_dir, task_dir) for k in ("img", "mask", "json"))
    sample_id = f"{where}:{Path(entry['img']).stem}"
    missing = missing_problems(sample_id, (image, mask, text))
    if missing:
        problems.extend(missing)
        return None
    try:
        question, answer = read_question_record(text, "question", "reason")
    except SampleReadError as exc:
        problems.append(SampleProblem(sample_id, str(exc)))
        return None
    return Sample(
        sample_id=sample_id, task=task, template=PromptTemplate.GEOSEG_BENCH,
        # Verbatim: the model parses interactive coordinates with the official regexes.
        instruction=question, answer=answer, image_path=image,
        image_reader=partial(read_rgb, image), mask_reader=partial(read_mask, mask, rule))
