"""The data side of training: the configured mixture, examples read safely, model batches.

The datasets are listed with the backend's readers (``unigeoseg_backend.datasets``, the ones
the evaluator uses), once, before the first step. Each configured dataset becomes one
:class:`~.sampler.Pool` per task it holds, keyed ``datasets[<i>]:<name>/<task>``. A dataset
that lists no sample is a :class:`~.config.ConfigError` naming its entry; entries its reader
skipped while listing are counted and logged.

While training, a sample whose image or mask turns out to be unreadable is counted and
skipped, with its file named in the log (:class:`ReadFailures`): the batch is one sample
shorter, the run goes on. With ``batch.num_workers`` > 0 the batches are read ahead on
background threads (:class:`BatchReader`), in the same order and with the same content.
Augmentation draws come from a generator seeded with the run's
seed, the micro-batch index and the sample's place in the global batch, so a resumed run
flips the same samples the same way.
"""

from __future__ import annotations

import copy
import logging
from collections import Counter, deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from unigeoseg_backend.datasets import Sample, SampleReadError, open_dataset
from unigeoseg_backend.errors import InvalidInputError
from unigeoseg_backend.evaluation.metrics import letterbox_mask
from unigeoseg_backend.model.preprocess import INPUT_SIZE, letterbox_image
from unigeoseg_backend.model.prompting import TokenizedPrompt, build_prompt

from .augment import Example, random_flips
from .config import AugmentConfig, ConfigError, DatasetConfig
from .sampler import BatchPlan, Pool, TaskBatchSampler

logger = logging.getLogger(__name__)

#: Listing problems written to the log per dataset (the count is always logged).
LOGGED_PROBLEMS = 5


@dataclass
class Mixture:
    """The training samples, by pool."""

    pools: list[Pool]
    samples: dict[str, list[Sample]]

    def sample(self, key: str, index: int) -> Sample:
        return self.samples[key][index]


def open_mixture(datasets: Sequence[DatasetConfig]) -> Mixture:
    """List every configured dataset and split it into per-task pools.

    Raises:
        ConfigError: a dataset cannot be listed or lists no sample (naming ``datasets[i]``).
    """
    pools: list[Pool] = []
    samples: dict[str, list[Sample]] = {}
    for i, entry in enumerate(datasets):
        where = f"datasets[{i}]"
        try:
            listing = open_dataset(entry.name, entry.root, entry.split, entry.task,
                                   mask_rule=entry.mask_rule)
        except InvalidInputError as exc:
            raise ConfigError(where, str(exc)) from exc
        if listing.problems:
            logger.warning("%s (%s %s): %d entries skipped while listing", where, entry.name,
                           entry.split, len(listing.problems))
            for problem in listing.problems[:LOGGED_PROBLEMS]:
                logger.warning("  %s: %s", problem.where, problem.message)
        if not listing.samples:
            raise ConfigError(where, f"{entry.name} {entry.split} in {entry.root} yields no "
                              f"samples{' of task ' + entry.task if entry.task else ''}")
        by_task: dict[str, list[Sample]] = {}
        for sample in listing.samples:
            by_task.setdefault(sample.task, []).append(sample)
        for task, task_samples in sorted(by_task.items()):
            key = f"{where}:{entry.name}/{task}"
            pools.append(Pool(key=key, task=task, size=len(task_samples), weight=entry.weight))
            samples[key] = task_samples
            logger.info("%s: %d %s samples (weight %g)", key, len(task_samples), task,
                        entry.weight)
    return Mixture(pools=pools, samples=samples)


@dataclass
class ReadFailures:
    """Samples skipped because their files could not be read, by pool."""

    counts: Counter[str] = field(default_factory=Counter)

    def record(self, pool_key: str, sample: Sample, error: Exception) -> None:
        self.counts[pool_key] += 1
        logger.warning("skipped %s (%s, image %s): %s", sample.sample_id, pool_key,
                       sample.image_path, error)

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def read_example(sample: Sample) -> Example:
    """The sample's decoded image, mask and texts.

    Raises:
        SampleReadError: the image or mask cannot be read (the message names the file).
    """
    image = sample.read_image()
    if not image.flags.writeable:   # torch.from_numpy warns about read-only arrays
        image = image.copy()
    return Example(image=image, mask=sample.read_mask(),
                   instruction=sample.instruction, answer=sample.answer)


@dataclass
class Batch:
    """One micro-batch as the model takes it (every sample of one task).

    Attributes:
        task: the batch's task.
        images: B x 3 x S x S letterboxed, normalised images.
        targets: B x S x S bool ground truth in the same letterbox.
        prompts: one tokenised prompt per image.
        sample_ids: ``<pool key>#<sample id>`` of each image (for logs).
        places: each sample's place in the global batch (it seeds the sample's random draws).
        flips: the flips applied to each sample.
    """

    task: str
    images: torch.Tensor
    targets: torch.Tensor
    prompts: list[TokenizedPrompt]
    sample_ids: list[str]
    places: list[int]
    flips: list[tuple[str, ...]]

    def __len__(self) -> int:
        return len(self.prompts)


def load_batch(plan: BatchPlan, mixture: Mixture, tokenizer: Any, augment: AugmentConfig, *,
               seed: int, first_place: int, failures: ReadFailures,
               size: int = INPUT_SIZE) -> Batch | None:
    """Read, augment, letterbox and tokenise the samples of ``plan``.

    Args:
        plan: this process's micro-batch (``TaskBatchSampler.next_batch``).
        mixture: where its samples live.
        tokenizer: the model's tokenizer (with ``[SEG]`` / ``[PAD]`` added).
        augment: flip probabilities.
        seed: the run's seed.
        first_place: this process's first place in the global batch
            (``rank * per_device``): with the micro-batch index it seeds each sample's
            augmentation.
        failures: where unreadable samples are counted.

    Returns:
        The batch, or None if every sample of it was unreadable.
    """
    images, targets, prompts, ids, places, flips = [], [], [], [], [], []
    for place, (key, index) in enumerate(plan.items, start=first_place):
        sample = mixture.sample(key, index)
        try:
            example = read_example(sample)
            rng = np.random.Generator(np.random.PCG64([seed, plan.index, place]))
            example, applied = random_flips(example, augment.hflip, augment.vflip, rng)
            image, _ = letterbox_image(example.image, size)
            prompt = build_prompt(sample.task, example.instruction, tokenizer,
                                  template=sample.template, answer=example.answer)
        except (SampleReadError, InvalidInputError) as exc:
            failures.record(key, sample, exc)
            continue
        images.append(image)
        targets.append(torch.from_numpy(letterbox_mask(example.mask, size)))
        prompts.append(prompt)
        ids.append(f"{key}#{sample.sample_id}")
        places.append(place)
        flips.append(applied)
    if not prompts:
        return None
    return Batch(task=plan.task, images=torch.stack(images), targets=torch.stack(targets),
                 prompts=prompts, sample_ids=ids, places=places, flips=flips)


class BatchReader:
    """Micro-batches read ahead on ``workers`` background threads, handed out in order.

    At the first batch taken a copy of the training loop's sampler starts to run ahead of it
    and hands its plans to a thread pool; the loop's own sampler (whose position the
    checkpoints save, and which a resume restores before the first batch) moves only when a
    batch is taken. At most
    ``2 x workers`` batches wait, read or being read, so memory stays bounded. Each batch is
    read by ``read`` exactly as it would be on the training thread (its draws are seeded by
    the plan), and the unreadable samples it met are counted when it is taken: the batches,
    their order and the counts do not depend on ``workers``. ``workers = 0`` reads on the
    calling thread.
    """

    def __init__(self, sampler: TaskBatchSampler,
                 read: Callable[..., Batch | None], workers: int) -> None:
        """``read(plan, failures=...)``: :func:`load_batch` with everything else bound."""
        self._read = read
        self._depth = 2 * workers
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="batches") if workers else None
        self._sampler = sampler
        self._ahead: TaskBatchSampler | None = None       # the copy running ahead
        self._pending: deque[tuple[BatchPlan, Future]] = deque()

    def _read_counting(self, plan: BatchPlan) -> tuple[Batch | None, ReadFailures]:
        failures = ReadFailures()
        return self._read(plan, failures=failures), failures

    def get(self, plan: BatchPlan, failures: ReadFailures) -> Batch | None:
        """The batch of ``plan`` (the loop sampler's next), its unreadable samples counted
        in ``failures``."""
        if self._pool is None:
            return self._read(plan, failures=failures)
        if self._ahead is None:             # the first batch: the loop sampler is past it
            self._ahead = copy.deepcopy(self._sampler)
            self._pending.append((plan, self._pool.submit(self._read_counting, plan)))
        while (len(self._pending) < self._depth
               and self._ahead.next_index < self._ahead.total_batches):
            ahead = self._ahead.next_batch()
            self._pending.append((ahead, self._pool.submit(self._read_counting, ahead)))
        if not self._pending or self._pending[0][0].index != plan.index:
            raise RuntimeError(f"micro-batch {plan.index} was not read ahead: the reader "
                               f"and the sampler lost step")
        batch, counted = self._pending.popleft()[1].result()
        failures.counts.update(counted.counts)
        return batch

    def close(self) -> None:
        """Stop the threads (batches read ahead are dropped)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
