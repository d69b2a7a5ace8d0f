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

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import InvalidInputError, UniGeoSegError
from ..model.prompting import PromptTemplate, Task


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
    """

    sample_id: str
    task: Task
    template: PromptTemplate
    instruction: str
    answer: str | None
    image_path: Path
    image_reader: Callable[[], np.ndarray] = field(repr=False, compare=False)
    mask_reader: Callable[[], np.ndarray] = field(repr=False, compare=False)

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
