"""The project's own layout for local data (docs/datasets.md, "Local layout").

::

    <root>/
      {split}.jsonl        # one JSON object per line (blank lines allowed)
      <any folders>        # the images and masks the records name

Each record::

    {"id": "chip-0001",                 # str or int; unique in the file; the sample id
     "image": "images/chip-0001.tif",   # relative to <root> (or absolute)
     "mask": "masks/chip-0001.tif",
     "instruction": "the flooded fields north of the river",
     "task": "referring",               # referring|reasoning|interactive (ref|reason|intera)
     "answer": "...",                   # optional: fills <answer> (reasoning)
     "template": "geoseg_bench"}        # optional: geoseg_bench (default), earthreason,
                                        #   refsegrs, rrsisd

Any other key of a record is kept, unread, in ``Sample.extra`` (the default model's chips
carry their click, box and chip georeference there).

Images: PNG/JPEG, or GeoTIFF chips with 1, 3 or more bands, 8-bit kept, 16-bit/float
stretched per band (2nd-98th percentile of valid pixels), nodata/NaN -> 0 (see
:mod:`.images`). Masks: PNG or GeoTIFF, foreground = value > 0, nodata = background.

A record that is not valid JSON, misses a key, names an unknown task or template, has an
empty instruction, repeats an id, or names a missing file is reported with its line number
and skipped.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import Any

from ..model.prompting import PromptTemplate
from .base import DatasetListing, Sample, SampleProblem, read_index_lines, task_from_name
from .images import missing_problems, read_mask, read_rgb

NAME = "local"
REQUIRED_KEYS = ("id", "image", "mask", "instruction", "task")
#: The keys this reader reads; any other key of a record goes to ``Sample.extra``.
LOCAL_KEYS = (*REQUIRED_KEYS, "answer", "template")


def list_local(root: Path, split: str = "test", task: str | None = None) -> DatasetListing:
    """List the records of ``<root>/{split}.jsonl`` (only ``task``'s when given).

    Raises:
        DatasetError: no such file, or it is not UTF-8 text.
    """
    root = Path(root)
    records = root / f"{split}.jsonl"
    lines = read_index_lines(records, "the local layout: one JSON record per line, see "
                                      "docs/datasets.md")

    listing = DatasetListing(name=NAME, root=root, split=split, samples=[])
    seen: dict[str, int] = {}
    for line_no, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{records.name}:{line_no}"
        try:
            sample, mask = _record_sample(json.loads(line), root)
        except (ValueError, TypeError) as exc:  # json.JSONDecodeError is a ValueError
            listing.problems.append(SampleProblem(where, f"{records}:{line_no}: {exc}"))
            continue
        if task is not None and sample.task != task:
            continue
        if sample.sample_id in seen:
            listing.problems.append(SampleProblem(
                where, f"{records}:{line_no}: id {sample.sample_id!r} already used on line "
                       f"{seen[sample.sample_id]}"))
            continue
        missing = missing_problems(sample.sample_id, (sample.image_path, mask))
        if missing:
            listing.problems.extend(SampleProblem(p.where, f"{records}:{line_no}: {p.message}")
                                    for p in missing)
            continue
        seen[sample.sample_id] = line_no
        listing.samples.append(sample)
    return listing


def _record_sample(record: Any, root: Path) -> tuple[Sample, Path]:
    """The Sample of one decoded record and its mask file; ValueError says what is wrong."""
    if not isinstance(record, dict):
        raise ValueError("a record must be a JSON object")
    absent = [k for k in REQUIRED_KEYS if k not in record]
    if absent:
        raise ValueError(f"record lacks {', '.join(absent)}")
    sample_id = record["id"]
    if isinstance(sample_id, bool) or not isinstance(sample_id, (str, int)) \
            or not str(sample_id).strip():
        raise ValueError(f"id must be a non-empty string or an integer, got {sample_id!r}")
    for key in ("image", "mask", "instruction", "task"):
        if not isinstance(record[key], str) or not record[key].strip():
            raise ValueError(f"{key} must be a non-empty string, got {record[key]!r}")
    task = task_from_name(record["task"])
    if task is None:
        raise ValueError(f"unknown task {record['task']!r} "
                         f"(use referring, reasoning or interactive)")
    answer = record.get("answer")
    if answer is not None and not isinstance(answer, str):
        raise ValueError(f"answer must be a string or null, got {answer!r}")
    try:
        template = PromptTemplate(record.get("template", PromptTemplate.GEOSEG_BENCH.value))
    except ValueError:
        names = ", ".join(t.value for t in PromptTemplate)
        raise ValueError(f"unknown template {record.get('template')!r} (use one of {names})") \
            from None
    image, mask = root / record["image"], root / record["mask"]
    sample = Sample(
        sample_id=str(sample_id), task=task, template=template,
        instruction=record["instruction"], answer=answer or None, image_path=image,
        image_reader=partial(read_rgb, image), mask_reader=partial(read_mask, mask, "positive"),
        extra={key: value for key, value in record.items() if key not in LOCAL_KEYS})
    return sample, mask
