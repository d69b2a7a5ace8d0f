"""Running the model over benchmark samples as the official evaluation does, in batches.

Per sample: the image is letterboxed to the model's S x S input (``letterbox_image``), the
ground-truth mask is letterboxed on its own grid (``metrics.letterbox_mask``), the prompt is
built with the sample's task, template and answer. Per batch of B samples: one
``encode_images`` over B x 3 x S x S, one ``segment`` with one prompt per tile, the
B x 1 x S/4 x S/4 logits upsampled bilinearly to S x S and thresholded at 0, exactly the
official ``eval_seg`` output, then compared with the letterboxed target.

A sample whose reading or preparation fails becomes a failed :class:`SampleRow` and the
batch goes on without it. Reading runs ahead in a small thread pool so the accelerator does
not wait for image decoding.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..datasets.base import Sample
from ..model.preprocess import PIXEL_MEAN, PIXEL_STD, Letterbox, letterbox_image, logits_to_tile
from ..model.prompting import TokenizedPrompt, build_prompt
from .metrics import intersection_union, largest_component_box, letterbox_mask
from .records import SampleRow, failure_text

logger = logging.getLogger(__name__)


@dataclass
class Prepared:
    """One sample ready for the model.

    Attributes:
        index: position in the selection.
        sample: the sample.
        image: 3 x S x S normalised letterboxed image (CPU float32).
        box: where the image sits in the S x S input.
        target: S x S bool letterboxed ground truth.
        native_target: the ground truth on its own H' x W' grid (``--native-resolution``).
        seconds: time spent reading and preparing.
    """

    index: int
    sample: Sample
    image: torch.Tensor
    box: Letterbox
    target: np.ndarray
    native_target: np.ndarray | None
    seconds: float


@dataclass
class Prediction:
    """The model's answer for one prepared sample: S x S bool, plus the raw logits."""

    prepared: Prepared
    mask: np.ndarray
    logits: torch.Tensor  # S/4 x S/4, on the model's device


def failed_row(index: int, sample: Sample, error: BaseException, seconds: float) -> SampleRow:
    return SampleRow(index=index, sample_id=sample.sample_id, task=sample.task,
                     intersection=None, union=None, seconds=seconds, error=failure_text(error))


def display_image(prepared: Prepared) -> np.ndarray:
    """The letterboxed input as S x S x 3 uint8 RGB (padding black), for overlays."""
    mean = torch.tensor(PIXEL_MEAN).view(3, 1, 1)
    std = torch.tensor(PIXEL_STD).view(3, 1, 1)
    rgb = (prepared.image * std + mean).round().clamp(0, 255).to(torch.uint8)
    return rgb.permute(1, 2, 0).numpy()


class Evaluator:
    """Batches samples through a loaded UniGeoSeg model and scores them.

    Args:
        loaded: a ``model.checkpoint.LoadedModel`` already on its device and dtype.
        native_resolution: also score the prediction at the mask's own resolution.
        workers: threads that read and letterbox samples ahead (0: read inline).
        box_predictions: score the box of each prediction's largest 8-connected component
            instead of the mask (the official ``--rsvg``, for box ground truths such as
            RSVG-DIOR); at native resolution too.
    """

    def __init__(self, loaded: Any, native_resolution: bool = False, workers: int = 2,
                 box_predictions: bool = False):
        self.box_predictions = box_predictions
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.size = int(self.model.config.image_size)
        self.native_resolution = native_resolution
        self.workers = workers

    # ------------------------------------------------------------------ reading

    def prepare(self, index: int, sample: Sample) -> Prepared:
        """Read and letterbox one sample (raises what the reader or the letterbox raises)."""
        start = time.perf_counter()
        rgb = sample.read_image()
        if not rgb.flags.writeable:  # torch.from_numpy warns about read-only arrays
            rgb = rgb.copy()
        image, box = letterbox_image(rgb, self.size)
        mask = np.asarray(sample.read_mask())
        if mask.ndim != 2:
            raise ValueError(f"{sample.sample_id}: mask has shape {mask.shape}, expected H x W")
        mask = mask.astype(bool, copy=False)
        return Prepared(index=index, sample=sample, image=image, box=box,
                        target=letterbox_mask(mask, self.size),
                        native_target=mask if self.native_resolution else None,
                        seconds=time.perf_counter() - start)

    def _try_prepare(self, index: int, sample: Sample) -> Prepared | SampleRow:
        start = time.perf_counter()
        try:
            return self.prepare(index, sample)
        except Exception as exc:  # a bad file must not stop the run
            logger.warning("sample %s failed: %s", sample.sample_id, failure_text(exc))
            return failed_row(index, sample, exc, time.perf_counter() - start)

    def _prepared(self, items: Iterable[tuple[int, Sample]],
                  lookahead: int) -> Iterator[Prepared | SampleRow]:
        """``_try_prepare`` of every item, in order, up to ``lookahead`` items read ahead."""
        if self.workers <= 0:
            for index, sample in items:
                yield self._try_prepare(index, sample)
            return
        pool = ThreadPoolExecutor(self.workers, thread_name_prefix="eval-read")
        pending: deque[Future] = deque()
        source = iter(items)
        try:
            for index, sample in source:
                pending.append(pool.submit(self._try_prepare, index, sample))
                if len(pending) >= lookahead:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            pool.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------ the model

    @torch.inference_mode()
    def predict(self, batch: list[Prepared], prompts: list[TokenizedPrompt]) -> list[Prediction]:
        """One forward pass over a batch: S x S masks (official upsampling, logits > 0)."""
        images = torch.stack([p.image for p in batch])
        vision = self.model.encode_images(images)
        logits = self.model.segment(vision, prompts)  # B x 1 x S/4 x S/4
        full = F.interpolate(logits.float(), size=(self.size, self.size), mode="bilinear",
                             align_corners=False)
        masks = (full[:, 0] > 0).cpu().numpy()
        if self.box_predictions:
            masks = [largest_component_box(m) for m in masks]
        return [Prediction(prepared=p, mask=masks[i], logits=logits[i, 0])
                for i, p in enumerate(batch)]

    def _prompt(self, sample: Sample) -> TokenizedPrompt:
        # Built here, on the calling thread: fast tokenizers are not safe to share between
        # threads.
        return build_prompt(sample.task, sample.instruction, self.tokenizer,
                            template=sample.template, answer=sample.answer)

    def _score(self, prediction: Prediction, seconds: float) -> SampleRow:
        prepared = prediction.prepared
        intersection, union = intersection_union(prediction.mask, prepared.target)
        native = (None, None)
        if prepared.native_target is not None:
            # Back to the image grid as the engine does (crop the padding, resize the logits),
            # onto the mask's own grid when the dataset stores masks at another size.
            height, width = prepared.native_target.shape
            box = dataclasses.replace(prepared.box, height=height, width=width)
            native_mask = (logits_to_tile(prediction.logits, box) > 0).cpu().numpy()
            if self.box_predictions:
                native_mask = largest_component_box(native_mask)
            native = intersection_union(native_mask, prepared.native_target)
        sample = prepared.sample
        return SampleRow(index=prepared.index, sample_id=sample.sample_id,
                         task=sample.task, intersection=intersection, union=union,
                         seconds=seconds, native_intersection=native[0],
                         native_union=native[1])

    def _run_batch(self, batch: list[Prepared]) -> list[SampleRow]:
        rows: list[SampleRow] = []
        ready: list[tuple[Prepared, TokenizedPrompt]] = []
        for prepared in batch:
            try:
                ready.append((prepared, self._prompt(prepared.sample)))
            except Exception as exc:
                rows.append(failed_row(prepared.index, prepared.sample, exc, prepared.seconds))
        if not ready:
            return rows
        start = time.perf_counter()
        try:
            predictions = self.predict([p for p, _ in ready], [q for _, q in ready])
        except Exception as exc:
            if len(ready) == 1:
                prepared = ready[0][0]
                return rows + [failed_row(prepared.index, prepared.sample, exc,
                                          prepared.seconds)]
            # One sample can break a batch (e.g. a prompt too long for memory): retry one by
            # one so that only that sample is recorded as failed.
            logger.warning("batch failed (%s); retrying its samples one by one",
                           failure_text(exc))
            for prepared, _ in ready:
                rows.extend(self._run_batch([prepared]))
            return rows
        share = (time.perf_counter() - start) / len(ready)
        rows.extend(self._score(p, p.prepared.seconds + share) for p in predictions)
        return rows

    def run(self, items: list[tuple[int, Sample]], batch_size: int,
            on_rows: Callable[[list[SampleRow]], None],
            on_progress: Callable[[int], None] = lambda n: None) -> None:
        """Evaluate ``(index, sample)`` items in order, in batches of ``batch_size``.

        ``on_rows`` receives the rows of every batch (failed samples included) as soon as it
        is done; ``on_progress`` the number of samples just finished.
        """
        if batch_size < 1:
            raise ValueError(f"batch size must be at least 1, got {batch_size}")
        batch: list[Prepared] = []

        def flush() -> None:
            rows = self._run_batch(batch)
            batch.clear()
            on_rows(rows)
            on_progress(len(rows))

        for item in self._prepared(items, lookahead=2 * batch_size + self.workers):
            if isinstance(item, SampleRow):  # failed while reading
                on_rows([item])
                on_progress(1)
                continue
            batch.append(item)
            if len(batch) == batch_size:
                flush()
        if batch:
            flush()

    def predict_samples(self, items: list[tuple[int, Sample]],
                        batch_size: int) -> list[Prediction]:
        """Predictions for a few samples (for overlays); samples that fail are left out."""
        out: list[Prediction] = []
        prepared = [p for p in self._prepared(items, lookahead=len(items) + 1)
                    if isinstance(p, Prepared)]
        for start in range(0, len(prepared), batch_size):
            chunk = prepared[start:start + batch_size]
            try:
                out.extend(self.predict(chunk, [self._prompt(p.sample) for p in chunk]))
            except Exception as exc:
                logger.warning("could not redo %d sample(s) for overlays: %s", len(chunk),
                               failure_text(exc))
        return out
