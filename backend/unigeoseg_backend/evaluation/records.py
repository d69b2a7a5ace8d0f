"""Per-sample records on disk: the CSV an evaluation appends to, and the manifest that guards it.

An evaluation appends one CSV row per sample as soon as its batch is done (flushed, so an
interrupted run leaves every finished sample on disk), and a later run with the same
dataset, split, model and options reads them back instead of recomputing them. Every row is
one physical line (error messages are put on one line), so a run killed in the middle of a
write leaves at most one torn last line, which :func:`read_rows` ignores and
:class:`RowWriter` cuts off before appending.

The manifest (``run.json``) records what the rows were computed with; rows are only reused
under the same manifest.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import InvalidInputError
from .metrics import sample_iou

logger = logging.getLogger(__name__)

COLUMNS = ("sample_id", "task", "iou", "intersection", "union", "native_iou",
           "native_intersection", "native_union", "seconds", "error")
MANIFEST = "run.json"
ROWS = "per_sample.csv"
SHARD_PATTERN = "per_sample.rank*.csv"


def shard_name(rank: int) -> str:
    """The file rank ``rank`` of a distributed run appends to."""
    return f"per_sample.rank{rank}.csv"


@dataclass
class SampleRow:
    """The outcome of one sample.

    Attributes:
        index: position of the sample in this run's selection (not stored: it is recovered
            from ``sample_id`` when rows are read back, so it follows the current selection).
        sample_id, task: as the dataset reader names them.
        intersection, union: foreground pixel counts on the letterboxed grid; None if failed.
        seconds: time spent on this sample (its reading plus its share of its batch).
        error: why the sample failed ("" when it did not).
        native_intersection, native_union: the same counts at the mask's own resolution
            (``--native-resolution``), else None.
    """

    index: int
    sample_id: str
    task: str
    intersection: int | None
    union: int | None
    seconds: float
    error: str = ""
    native_intersection: int | None = None
    native_union: int | None = None

    @property
    def failed(self) -> bool:
        return self.intersection is None or self.union is None

    @property
    def counts(self) -> tuple[int, int] | None:
        """``(I, U)`` on the letterboxed grid, or None for a failed sample."""
        return None if self.failed else (self.intersection, self.union)

    @property
    def native_counts(self) -> tuple[int, int] | None:
        if self.failed or self.native_intersection is None or self.native_union is None:
            return None
        return (self.native_intersection, self.native_union)

    @property
    def iou(self) -> float | None:
        counts = self.counts
        return None if counts is None else sample_iou(*counts)

    def csv_fields(self) -> list[str]:
        native = self.native_counts
        return [self.sample_id, self.task,
                "" if self.failed else repr(self.iou),
                _text(self.intersection), _text(self.union),
                "" if native is None else repr(sample_iou(*native)),
                _text(self.native_intersection), _text(self.native_union),
                f"{self.seconds:.6f}", one_line(self.error)]


def _text(value: int | None) -> str:
    return "" if value is None else str(value)


def _int_or_none(text: str) -> int | None:
    return int(text) if text != "" else None


def one_line(message: str) -> str:
    """``message`` with line breaks replaced, so that one row stays one line."""
    return " ".join(message.split()) if ("\n" in message or "\r" in message) else message


def failure_text(exc: BaseException) -> str:
    """How a failed sample's error is recorded: the exception type and its message."""
    message = getattr(exc, "message", None) or str(exc)
    return one_line(f"{type(exc).__name__}: {message}")


def _format(rows: Iterable[SampleRow]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    for row in rows:
        writer.writerow(row.csv_fields())
    return buffer.getvalue()


def _header() -> str:
    return ",".join(COLUMNS) + "\n"


class RowWriter:
    """Appends rows to one CSV file, whole lines only, flushed after every call to write."""

    def __init__(self, path: Path):
        self.path = Path(path)
        _cut_torn_tail(self.path)
        new = not self.path.exists() or self.path.stat().st_size == 0
        self._file = open(self.path, "a", encoding="utf-8", newline="")  # noqa: SIM115
        if new:
            self._file.write(_header())
            self._file.flush()

    def write(self, rows: list[SampleRow]) -> None:
        # One write call for the whole batch: an interruption tears at most the last line.
        self._file.write(_format(rows))
        self._file.flush()

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> RowWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _cut_torn_tail(path: Path) -> None:
    """Drop the bytes after the last newline (a row that an interruption cut short)."""
    if not path.exists():
        return
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end != len(data):
        logger.warning("%s: ignoring a torn last line (%d bytes)", path, len(data) - end)
        with open(path, "r+b") as file:
            file.truncate(end)


def _records(path: Path) -> Iterator[tuple[int, dict[str, str]]]:
    """``(line number, column -> text)`` of every whole, well-formed row of one CSV.

    A torn last line (no newline at the end) is ignored, as are rows with the wrong number of
    fields (with a warning).
    """
    path = Path(path)
    if not path.exists():
        return
    text = path.read_text(encoding="utf-8", errors="replace")
    if not text.endswith("\n"):
        text = text[:text.rfind("\n") + 1]
    lines = text.splitlines()
    if not lines:
        return
    if lines[0].strip() != ",".join(COLUMNS):
        raise InvalidInputError(f"{path} is not a per-sample file of this version of "
                                f"unigeoseg eval (header {lines[0][:80]!r}); pass --restart "
                                f"to start over")
    for number, fields in enumerate(csv.reader(lines[1:]), start=2):
        if len(fields) != len(COLUMNS):
            logger.warning("%s:%d: %d fields, expected %d; ignored", path, number, len(fields),
                           len(COLUMNS))
            continue
        yield number, dict(zip(COLUMNS, fields, strict=True))


def read_rows(path: Path, index_of: dict[str, int]) -> list[SampleRow]:
    """The rows of one CSV that name a sample of the current selection (``index_of``).

    Unparseable rows are ignored with a warning. Rows appear in file order; a later row for
    the same sample is newer.
    """
    rows = []
    for number, record in _records(path):
        index = index_of.get(record["sample_id"])
        if index is None:
            continue  # not in this run's selection (see read_outside)
        try:
            rows.append(SampleRow(
                index=index, sample_id=record["sample_id"], task=record["task"],
                intersection=_int_or_none(record["intersection"]),
                union=_int_or_none(record["union"]), seconds=float(record["seconds"] or 0),
                error=record["error"],
                native_intersection=_int_or_none(record["native_intersection"]),
                native_union=_int_or_none(record["native_union"])))
        except ValueError as exc:
            logger.warning("%s:%d: unreadable row (%s); ignored", path, number, exc)
    return rows


def _row_files(folder: Path) -> list[Path]:
    return [folder / ROWS, *sorted(folder.glob(SHARD_PATTERN))]


def _newer(previous_failed: bool | None, failed: bool) -> bool:
    """Whether a later row replaces an earlier one of the same sample: yes, unless a failure
    would replace a success (a shard of an interrupted rerun)."""
    return previous_failed is None or previous_failed or not failed


def read_previous(folder: Path, index_of: dict[str, int]) -> dict[int, SampleRow]:
    """Rows of earlier runs in ``folder`` (merged file, then any rank shards), newest wins."""
    latest: dict[int, SampleRow] = {}
    for path in _row_files(folder):
        for row in read_rows(path, index_of):
            previous = latest.get(row.index)
            if _newer(None if previous is None else previous.failed, row.failed):
                latest[row.index] = row
    return latest


def read_outside(folder: Path, index_of: dict[str, int]) -> list[list[str]]:
    """The CSV fields of earlier rows whose sample is not in this run's selection.

    A smaller ``--limit`` must not throw away results computed before: these rows are written
    back, after the selection's, and count in no metric.
    """
    latest: dict[str, dict[str, str]] = {}
    for path in _row_files(folder):
        for _, record in _records(path):
            sample_id = record["sample_id"]
            if sample_id in index_of:
                continue
            previous = latest.get(sample_id)
            if _newer(None if previous is None else previous["intersection"] == "",
                      record["intersection"] == ""):
                latest[sample_id] = record
    return [[record[c] for c in COLUMNS] for record in latest.values()]


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, then rename it over ``path``."""
    path = Path(path)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8", newline="") as file:
            file.write(text)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def write_rows_atomic(path: Path, rows: Iterable[SampleRow],
                      outside: Iterable[list[str]] = ()) -> None:
    """The merged per-sample file: ``rows`` in the given order, then the ``outside`` fields."""
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(outside)
    write_atomic(path, _header() + _format(rows) + buffer.getvalue())


def check_manifest(folder: Path, manifest: dict[str, Any], restart: bool) -> None:
    """Make ``folder`` hold results of ``manifest`` only.

    A folder with no manifest (new) gets this one. With a different manifest, earlier rows
    were computed under other settings: refuse. ``restart`` removes earlier rows whatever
    their manifest.

    Raises:
        InvalidInputError: the folder belongs to another evaluation and ``restart`` is False.
    """
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / MANIFEST
    previous = None
    if path.exists():
        try:
            previous = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            previous = {"unreadable": str(path)}
    if restart:
        clear_rows(folder)
    elif previous != manifest and (previous is not None or (folder / ROWS).exists()):
        differing = sorted(k for k in set(manifest) | set(previous or {})
                           if (previous or {}).get(k) != manifest.get(k))
        raise InvalidInputError(
            f"{folder} holds results of another evaluation (differs in: "
            f"{', '.join(differing)}); pass --restart to discard them, or choose another "
            f"--out", {"differs": differing})
    write_atomic(path, json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def clear_rows(folder: Path) -> None:
    """Remove the per-sample files of an earlier evaluation."""
    for path in [folder / ROWS, *folder.glob(SHARD_PATTERN)]:
        path.unlink(missing_ok=True)
