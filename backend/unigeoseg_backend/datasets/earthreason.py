"""EarthReason (SegEarth-R1, 2025).

Layout (docs/datasets.md)::

    <root>/{split}/                  # also accepted: <root>/{split}/{split}/, or root = the split
      images/<stem>.jpg|.jpeg|.png
      labels/<stem>.png              # foreground = value != 0 (official); all zero = empty target
      QAs/<stem>.json|.txt           # JSON either way: {"questions": [...], "answer": [...]}

Files are paired by stem (the official loader zips three sorted listings, so one stray file
shifts every later pair). Dot-files (macOS ``._x.jpg``) are skipped; a stem missing from any
folder, or present twice in one, is reported. ``answer: []`` (empty target) gives answer None,
which the EarthReason template renders as "There is no target object in the image.".
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

from ..model.prompting import PromptTemplate
from .base import (
    DatasetError,
    DatasetListing,
    Sample,
    SampleProblem,
    SampleReadError,
    read_question_record,
)
from .images import read_mask, read_rgb

NAME = "earthreason"
_FOLDERS = {  # folder -> accepted suffixes (lower case), as the official extension filters
    "images": (".jpg", ".jpeg", ".png"),
    "labels": (".png",),
    "QAs": (".json", ".txt"),
}


def split_dir(root: Path, split: str) -> Path:
    """The folder holding ``images/``, ``labels/``, ``QAs/`` for ``split``."""
    candidates = (root / split, root / split / split, root)
    for candidate in candidates:
        if all((candidate / name).is_dir() for name in _FOLDERS):
            return candidate
    tried = ", ".join(str(c) for c in candidates)
    raise DatasetError(f"EarthReason: no images/, labels/ and QAs/ for split {split!r} "
                       f"(tried {tried})")


def list_earthreason(root: Path, split: str = "test") -> DatasetListing:
    """List EarthReason samples of ``split``; sample ids are the file stems.

    Raises:
        DatasetError: no split folder with images/, labels/ and QAs/.
    """
    root = Path(root)
    base = split_dir(root, split)
    listing = DatasetListing(name=NAME, root=root, split=split, samples=[])
    files = {name: _by_stem(base / name, suffixes, listing.problems)
             for name, suffixes in _FOLDERS.items()}

    for stem in sorted(set().union(*files.values())):
        absent = [name for name in _FOLDERS if stem not in files[name]]
        if absent:
            listing.problems.append(SampleProblem(
                stem, f"{stem} has no file in {', '.join(str(base / a) for a in absent)}"))
            continue
        image, label, qa = (files[name][stem] for name in _FOLDERS)
        try:
            question, answer = read_question_record(qa, "questions", "answer")
        except SampleReadError as exc:
            listing.problems.append(SampleProblem(stem, str(exc)))
            continue
        listing.samples.append(Sample(
            sample_id=stem, task="reasoning", template=PromptTemplate.EARTHREASON,
            instruction=question, answer=answer, image_path=image,
            image_reader=partial(read_rgb, image),
            mask_reader=partial(read_mask, label, "nonzero")))
    return listing


def _by_stem(folder: Path, suffixes: tuple[str, ...],
             problems: list[SampleProblem]) -> dict[str, Path]:
    """``stem -> file`` of the non-hidden files in ``folder`` with one of ``suffixes``."""
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or path.suffix.lower() not in suffixes \
                or not path.is_file():
            continue
        if path.stem in found:
            problems.append(SampleProblem(
                path.stem, f"{path.stem} has two files in {folder}: {found[path.stem].name} "
                           f"(used) and {path.name}"))
            continue
        found[path.stem] = path
    return found
