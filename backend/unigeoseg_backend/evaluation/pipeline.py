"""One evaluation run end to end: resume, shard, evaluate, gather, report.

1. The output folder's manifest must match this run's settings (else refuse, or ``restart``).
2. Rows of earlier runs are read back; their samples are not recomputed (failed ones are
   retried). In a ``torchrun`` launch every rank reads what it can see and the ranks agree on
   the union.
3. The remaining samples are split round-robin over the ranks; each rank appends its rows to
   its own CSV after every batch (``per_sample.csv`` for a single process, else
   ``per_sample.rank{r}.csv``).
4. Rank 0 gathers every row as plain tensors, writes the merged ``per_sample.csv`` in
   selection order, ``metrics.json``, ``metrics.md``, ``problems.csv`` and the overlays of the
   worst samples (predicted again, on rank 0).

Metrics come from the integer counts in selection order only, so any world size, batch size
or interruption pattern gives the same numbers for the same per-sample counts.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from .. import __version__
from ..datasets.base import DatasetListing
from ..distributed import World, all_true, any_per_item, barrier, max_over_ranks, sum_over_ranks
from ..errors import InvalidInputError
from . import overlays
from .gather import gather_rows
from .records import (
    ROWS,
    SHARD_PATTERN,
    RowWriter,
    SampleRow,
    check_manifest,
    read_outside,
    read_previous,
    shard_name,
    write_rows_atomic,
)
from .report import write_reports
from .runner import Evaluator, display_image

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalSettings:
    """What to evaluate and how (the ``unigeoseg eval`` options).

    Attributes:
        dataset, root, split, task, mask_rule: the benchmark selection (task None: all).
        out: the output folder.
        batch_size: samples per forward pass.
        limit: evaluate only the first ``limit`` samples of the listing.
        worst: how many overlays of the lowest-IoU samples to draw.
        native_resolution: also score at the mask's own resolution.
        box_predictions: score the box of each prediction's largest component (``--rsvg``).
        restart: discard earlier rows in ``out`` instead of resuming.
        workers: reader threads per process.
        progress: show a progress bar (rank 0).
    """

    dataset: str
    root: Path
    split: str
    out: Path
    task: str | None = None
    mask_rule: str = "official"
    batch_size: int = 8
    limit: int | None = None
    worst: int = 8
    native_resolution: bool = False
    box_predictions: bool = False
    restart: bool = False
    workers: int = 2
    progress: bool = True


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def manifest(settings: EvalSettings, model_path: Path, dtype: torch.dtype) -> dict[str, Any]:
    """What the rows in the output folder depend on (``--limit`` and batching do not).

    Known before the model is loaded, so that a folder of another evaluation is refused at
    once.
    """
    return {"dataset": settings.dataset, "root": str(Path(settings.root).resolve()),
            "split": settings.split, "task": settings.task, "mask_rule": settings.mask_rule,
            "native_resolution": settings.native_resolution,
            "box_predictions": settings.box_predictions,
            "model_path": str(Path(model_path).resolve()), "dtype": _dtype_name(dtype)}


def _prepare_folder(world: World, settings: EvalSettings, run_manifest: dict[str, Any]) -> None:
    """Check (or reset) the output folder on every rank; all ranks fail if one does."""
    error: Exception | None = None
    try:
        check_manifest(Path(settings.out), run_manifest, settings.restart)
    except Exception as exc:  # re-raised below, after the other ranks know
        error = exc
    if not all_true(world, error is None):
        if error is not None:
            raise error
        raise InvalidInputError("another rank refused the output folder (see its message)")
    barrier(world)  # nobody appends before every rank has finished resetting


def _resume(world: World, out: Path,
            index_of: dict[str, int]) -> tuple[dict[int, SampleRow], list[int]]:
    """The earlier rows of the selection, and the indices this rank still has to compute.

    A sample is done when any rank saw a successful row for it; the rest are dealt out
    round-robin in selection order.
    """
    previous = read_previous(out, index_of)
    done = np.zeros(len(index_of), dtype=bool)
    done[[i for i, row in previous.items() if not row.failed]] = True
    done = any_per_item(world, done)
    remaining = [i for i in range(len(index_of)) if not done[i]]
    barrier(world)  # every rank has read the earlier rows before any is appended to
    return previous, remaining[world.rank::world.size]


def _selection_info(settings: EvalSettings, listing: DatasetListing,
                    selected: int) -> dict[str, Any]:
    return {"dataset": settings.dataset, "root": str(Path(settings.root).resolve()),
            "split": settings.split, "task": settings.task, "mask_rule": settings.mask_rule,
            "samples_listed": len(listing.samples), "selected": selected,
            "limit": settings.limit, "native_resolution": settings.native_resolution,
            "box_predictions": settings.box_predictions}


def evaluate(settings: EvalSettings, listing: DatasetListing, model_path: Path,
             load_model: Callable[[], Any], device: torch.device, dtype: torch.dtype,
             world: World | None = None) -> dict[str, Any] | None:
    """Run the evaluation; the metrics document on rank 0, None on the other ranks.

    Args:
        listing: the dataset (``--limit`` is applied here).
        model_path: the model directory (recorded in the manifest).
        load_model: returns the ``LoadedModel`` on ``device`` in ``dtype``; called once the
            output folder has been accepted.
        world: this process's rank (``distributed.init_world``); None: a single process.
    """
    world = world or World(device=device)
    started = time.perf_counter()
    started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    out = Path(settings.out)
    _prepare_folder(world, settings, manifest(settings, model_path, dtype))

    samples = listing.samples[:settings.limit] if settings.limit is not None \
        else listing.samples
    index_of = {sample.sample_id: i for i, sample in enumerate(samples)}
    if len(index_of) != len(samples):
        raise ValueError(f"{listing.name}: sample ids are not unique")
    previous, mine = _resume(world, out, index_of)

    load_start = time.perf_counter()
    loaded = load_model()
    load_seconds = time.perf_counter() - load_start
    evaluator = Evaluator(loaded, settings.native_resolution, settings.workers,
                          box_predictions=settings.box_predictions)
    fresh: list[SampleRow] = []
    loop_start = time.perf_counter()
    path = out / (shard_name(world.rank) if world.distributed else ROWS)
    bar = tqdm(total=len(mine), unit="sample", dynamic_ncols=True, mininterval=1.0,
               disable=not (settings.progress and world.is_main),
               desc=f"eval rank 0/{world.size}" if world.distributed else "eval")
    with RowWriter(path) as writer:
        def keep(rows: list[SampleRow]) -> None:
            writer.write(rows)
            fresh.extend(rows)

        try:
            evaluator.run([(i, samples[i]) for i in mine], settings.batch_size, keep, bar.update)
        finally:
            bar.close()
    loop_seconds = max_over_ranks(world, time.perf_counter() - loop_start)

    # The earlier successes this rank read (failures were retried), then its new rows. With
    # a shared file system every rank sends the same earlier rows; they are identical.
    names = [(s.sample_id, s.task) for s in samples]
    kept = [row for row in previous.values() if not row.failed]
    gathered = gather_rows(world, [*kept, *fresh], names)
    computed = int(sum_over_ranks(world, len(fresh)))
    document = None
    if world.is_main:
        by_index = {row.index: row for row in gathered}
        rows = [by_index[i] for i in sorted(by_index)]
        write_rows_atomic(out / ROWS, rows, read_outside(out, index_of))
        run = {
            "unigeoseg_version": __version__, "model": str(loaded.name),
            "model_path": str(loaded.path), **_selection_info(settings, listing, len(samples)),
            "device": str(device), "dtype": _dtype_name(dtype), "world_size": world.size,
            "batch_size": settings.batch_size, "computed_this_run": computed,
            "reused": len(rows) - computed, "started": started_at,
            "model_load_seconds": round(load_seconds, 3),
            "evaluation_seconds": round(loop_seconds, 3),
            "samples_per_second": round(computed / loop_seconds, 3) if computed else None,
            "seconds": round(time.perf_counter() - started, 3),
        }
        document = write_reports(out, rows, run, listing.problems, settings.native_resolution)
        _draw_worst(evaluator, out, samples, rows, settings)
    barrier(world)  # the merged file is in place: the shards are no longer needed
    if world.is_main:
        for shard in out.glob(SHARD_PATTERN):
            shard.unlink(missing_ok=True)
    elif world.distributed:
        (out / shard_name(world.rank)).unlink(missing_ok=True)
    return document


def _draw_worst(evaluator: Evaluator, out: Path, samples: list, rows: list[SampleRow],
                settings: EvalSettings) -> None:
    """Overlays of the ``settings.worst`` lowest-IoU samples (ties: first in the listing)."""
    folder = out / overlays.OVERLAY_DIR
    folder.mkdir(exist_ok=True)
    overlays.clear(folder)
    scored = sorted((row.iou, row.index) for row in rows if not row.failed)
    worst = [index for _, index in scored[:max(settings.worst, 0)]]
    if not worst:
        return
    by_index = {row.index: row for row in rows}
    predictions = evaluator.predict_samples([(i, samples[i]) for i in worst],
                                            settings.batch_size)
    order = {index: place for place, index in enumerate(worst)}
    for prediction in predictions:
        prepared = prediction.prepared
        row = by_index[prepared.index]
        caption = f"{row.sample_id}  {row.task}  IoU {row.iou:.3f}"
        picture = overlays.render(display_image(prepared), prepared.target, prediction.mask,
                                  caption)
        picture.save(folder / overlays.file_name(order[prepared.index], row.sample_id))

