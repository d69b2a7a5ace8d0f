"""RefSegRS (RRSIS, TGRS 2024).

Layout (docs/datasets.md)::

    <root>/
      images/<id>.tif
      masks/<id>.tif
      output_phrase_{split}.txt      # lines "<id> <phrase>"

Lines are parsed as the official loader does, ``re.match(r'(\\d+)\\s+(.*)', line.strip())``
(so CRLF and trailing spaces are harmless), blank lines skipped; a non-blank line that does not
match is reported (the official loader drops it silently). Masks: ``official`` raw 255 (or 1)
is foreground, ``robust`` raw > 127.

Sample ids are the line's ``<id>``; an id that repeats gets ``#<n>`` (its n-th occurrence), so
ids stay unique and stable while the file is unchanged.
"""

from __future__ import annotations

import re
from functools import partial
from pathlib import Path

from ..model.prompting import PromptTemplate
from .base import DatasetListing, Sample, SampleProblem, read_index_lines
from .images import missing_problems, read_mask, read_rgb

NAME = "refsegrs"
_LINE = re.compile(r"(\d+)\s+(.*)")


def list_refsegrs(root: Path, split: str = "test",
                  mask_rule: str = "official") -> DatasetListing:
    """List the RefSegRS samples of ``output_phrase_{split}.txt``.

    Raises:
        DatasetError: no phrase file, or it cannot be read as UTF-8 text.
    """
    root = Path(root)
    phrases = root / f"output_phrase_{split}.txt"
    lines = read_index_lines(phrases, f"RefSegRS: expected images/, masks/ and "
                                      f"output_phrase_{{split}}.txt in {root}")

    rule = "official255" if mask_rule == "official" else "over127"
    listing = DatasetListing(name=NAME, root=root, split=split, samples=[])
    occurrences: dict[str, int] = {}
    for line_no, line in enumerate(lines, start=1):
        text = line.strip()
        if not text:
            continue
        match = _LINE.match(text)
        if match is None:
            listing.problems.append(SampleProblem(
                f"{phrases.name}:{line_no}",
                f"{phrases}:{line_no} is not '<id> <phrase>': {text[:80]!r}"))
            continue
        image_id, phrase = match.group(1), match.group(2)
        occurrences[image_id] = occurrences.get(image_id, 0) + 1
        sample_id = image_id if occurrences[image_id] == 1 \
            else f"{image_id}#{occurrences[image_id]}"
        image, mask = root / "images" / f"{image_id}.tif", root / "masks" / f"{image_id}.tif"
        missing = missing_problems(sample_id, (image, mask))
        if missing:
            listing.problems.extend(missing)
            continue
        listing.samples.append(Sample(
            sample_id=sample_id, task="referring", template=PromptTemplate.REFSEGRS,
            instruction=phrase, answer=None, image_path=image,
            image_reader=partial(read_rgb, image), mask_reader=partial(read_mask, mask, rule)))
    return listing
