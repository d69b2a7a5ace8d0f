"""What every benchmark reader returns: samples, and the problems found while listing them.

A reader turns one on-disk layout (GeoSeg-Bench, RRSIS-D, RefSegRS, EarthReason, the
project's local layout) into a :class:`DatasetListing`: the :class:`Sample` objects in a stable
order, and a :class:`SampleProblem` for every entry it had to skip (a missing file, an
unreadable record). Listing opens no image; a sample's image and mask are read when the
evaluator or the trainer asks for them, and a file that turns out to be corrupt then raises
:class:`SampleReadError`, which the caller records against that sample and goes on.

The foreground mask a sample returns is already binarised the way the official evaluation
binarises that dataset (documented per reader), at the image's own resolution; the
evaluator letterboxes it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from unigeoseg_protocol.vocabulary import TASKS

from ..errors import InvalidInputError, UniGeoSegError
from ..model.prompting import PromptTemplate


class DatasetError(InvalidInputError):
    """The dataset cannot be listed at all (no root, no index file, unknown layout)."""


class SampleReadError(UniGeoSegError, OSError):
    """One sample's image or mask cannot be read or does not match (message names the file)."""


@dataclass(frozen=True)
class SampleProblem:
    """An entry a reader skipped while listing, and why (the message names the file)."""

    where: str      #: the entry: a sample id if it had one, else the offending path
    message: str


@dataclass(frozen=True)
class Sample:
    """One instruction on one image, with its ground-truth mask.

    Attributes:
        sample_id: unique and stable within (dataset, split): the resume key.
        task: the task the model runs (selects the TATE branch and the LKM weight).
        template: the official wording for this dataset (``prompting.PromptTemplate``).
        instruction: the user's text (for interactive: with the normalised coordinates).
        answer: the reason text that fills ``<answer>`` (GeoSeg-Bench ``reason[0]``,
            EarthReason ``answer[0]``), None where the dataset has none.
        image_path: the image file (for messages and overlays).
        image_reader: returns the image as H x W x 3 uint8 RGB; raises SampleReadError.
        mask_reader: returns the foreground as an H x W bool array on the image's grid;
            raises SampleReadError.
        extra: what else the dataset's record says, for trainers that use it (the
            ``local`` layout's ``prompt``, ``target`` and ``chip`` of the default model's
            training chips); empty for the benchmark readers.
    """

    sample_id: str
    task: str
    template: PromptTemplate
    instruction: str
    answer: str | None
    image_path: Path
    image_reader: Callable[[], np.ndarray] = field(repr=False, compare=False)
    mask_reader: Callable[[], np.ndarray] = field(repr=False, compare=False)
    extra: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def read_image(self) -> np.ndarray:
        """H x W x 3 uint8 RGB."""
        return self.image_reader()

    def read_mask(self) -> np.ndarray:
        """H x W bool foreground, binarised with the dataset's official rule."""
        return self.mask_reader()


@dataclass
class DatasetListing:
    """The samples of one (dataset, split[, task]) and the entries skipped while listing."""

    name: str
    root: Path
    split: str
    samples: list[Sample]
    problems: list[SampleProblem] = field(default_factory=list)


#: Names that mean a task: the task names themselves, the official ``prompt_type`` strings,
#: and the task folder names of GeoSeg-Bench (``ref``, ``interactive``, ``reason``).
TASK_NAMES: dict[str, str] = {
    **{task: task for task in TASKS},
    "ref": "referring", "intera": "interactive", "reason": "reasoning",
}


def task_from_name(name: str) -> str | None:
    """The task an exact (case-insensitive) name in :data:`TASK_NAMES` means, else None.

    Never a substring test: the official eval's ``'/intera/' in path`` misses the released
    ``interactive/`` folder and routes its samples to the reasoning branch.
    """
    return TASK_NAMES.get(name.strip().lower())


def parse_task(task: str | None) -> str | None:
    """``task`` (a name of :data:`TASK_NAMES`) as a task name of ``TASKS``; None stays None,
    an unknown name raises DatasetError."""
    if task is None:
        return None
    parsed = task_from_name(task) if isinstance(task, str) else None
    if parsed is None:
        raise DatasetError(f"unknown task {task!r}: use one of {', '.join(TASK_NAMES)}")
    return parsed


def read_question_record(path: Path, question_key: str,
                         answer_key: str) -> tuple[str, str | None]:
    """``(question, answer)`` of a per-sample JSON file holding lists of strings.

    GeoSeg-Bench (``question``/``reason``) and EarthReason (``questions``/``answer``) keep one
    JSON object per sample; the official eval uses index 0 of each list. An empty or absent
    answer list gives None.

    Raises:
        SampleReadError: unreadable JSON, no non-empty ``question_key[0]`` string, or an
            answer that is not a list (the message names the file).
    """
    try:
        record = json.loads(Path(path).read_text(encoding="utf-8-sig"))
        question = record[question_key][0]
        answers = record.get(answer_key) or []
        if not isinstance(question, str) or not question.strip():
            raise ValueError(f"{question_key}[0] is not a non-empty string")
        if not isinstance(answers, list):
            raise ValueError(f"{answer_key} is not a list")
    except (OSError, ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
        raise SampleReadError(f"unreadable sample JSON {path}: {exc}") from exc
    answer = answers[0] if answers and isinstance(answers[0], str) and answers[0] else None
    return question, answer


def read_index_lines(path: Path, layout_hint: str) -> list[str]:
    """The lines of a line-per-sample index file (RefSegRS phrases, local JSONL).

    Newlines as Python's text mode reads them (``\\n``, ``\\r\\n``, ``\\r``), as the official
    loaders' ``for line in f`` does; no other Unicode line breaks split a line.

    Raises:
        DatasetError: the file is missing (the message adds ``layout_hint``) or not UTF-8
            (a leading BOM is dropped).
    """
    if not path.is_file():
        raise DatasetError(f"missing {path} ({layout_hint})")
    try:
        return path.read_text(encoding="utf-8-sig").split("\n")
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"cannot read {path}: {exc}") from exc
