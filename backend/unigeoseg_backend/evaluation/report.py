"""What an evaluation leaves in its output folder: metrics.json, metrics.md, problems.csv.

Every file is written whole to a temporary name and renamed into place, so a reader never
sees half a report (``records.write_atomic``).
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..datasets.base import SampleProblem
from .metrics import THRESHOLDS, Summary, summarize_by_task
from .records import SampleRow, write_atomic

METRICS_JSON = "metrics.json"
METRICS_MD = "metrics.md"
PROBLEMS_CSV = "problems.csv"
#: The order tasks are reported in.
TASK_ORDER = ("referring", "reasoning", "interactive")


def summaries(rows: Sequence[SampleRow], native: bool = False) -> dict[str, Summary]:
    """Per task and overall, from rows in selection order (the letterboxed grid, or native)."""
    counts = [row.native_counts if native else row.counts for row in rows]
    return summarize_by_task([row.task for row in rows], counts, TASK_ORDER)


def metrics_document(rows: Sequence[SampleRow], run: dict[str, Any], problems: int,
                     native: bool) -> dict[str, Any]:
    """The content of metrics.json."""
    document: dict[str, Any] = {
        "run": run,
        "problems": problems,
        "metrics": {name: s.as_dict() for name, s in summaries(rows).items()},
    }
    if native:
        document["native_metrics"] = {name: s.as_dict()
                                      for name, s in summaries(rows, native=True).items()}
    return document


def _percent(value: float | None) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{100 * value:.2f}"


def markdown_table(by_task: dict[str, Summary]) -> str:
    """gIoU, cIoU and Pr@t in percent, one row per task, overall last and in bold."""
    header = ["task", "samples", "failed", "gIoU", "cIoU", *(f"Pr@{t}" for t in THRESHOLDS)]
    lines = ["| " + " | ".join(header) + " |",
             "|---|" + "---:|" * (len(header) - 1)]
    for name, s in by_task.items():
        label = f"**{name}**" if name == "overall" else name
        cells = [label, str(s.count), str(s.failed), _percent(s.giou), _percent(s.ciou),
                 *(_percent(s.precision[t]) for t in THRESHOLDS)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def markdown_report(document: dict[str, Any], rows: Sequence[SampleRow]) -> str:
    """The content of metrics.md."""
    run = document["run"]
    task = f", task {run['task']}" if run.get("task") else ""
    parts = [
        f"# UniGeoSeg evaluation: {run['dataset']} ({run['split']}{task})\n",
        f"Model `{run['model']}` ({run['model_path']}), {run['device']} {run['dtype']}, "
        f"{run['world_size']} process(es), batch size {run['batch_size']}. "
        f"{run['computed_this_run']} sample(s) computed in this run, {run['reused']} reused "
        f"from an earlier run; {document['problems']} listing problem(s).\n",
        "Metrics on the letterboxed model input, as the official evaluation computes them "
        "(percent):\n",
        markdown_table(summaries(rows)),
    ]
    if "native_metrics" in document:
        parts += ["At the original resolution (percent):\n",
                  markdown_table(summaries(rows, native=True))]
    return "\n".join(parts)


def write_reports(folder: Path, rows: Sequence[SampleRow], run: dict[str, Any],
                  problems: Sequence[SampleProblem], native: bool) -> dict[str, Any]:
    """Write metrics.json, metrics.md and problems.csv; return the metrics document."""
    document = metrics_document(rows, run, len(problems), native)
    write_atomic(folder / METRICS_JSON, json.dumps(document, indent=2) + "\n")
    write_atomic(folder / METRICS_MD, markdown_report(document, rows))
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["where", "message"])
    writer.writerows([problem.where, problem.message] for problem in problems)
    write_atomic(folder / PROBLEMS_CSV, buffer.getvalue())
    return document
