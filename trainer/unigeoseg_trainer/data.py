"""The data side of training: the configured mixture, examples read safely, model batches.

The datasets are listed with the backend's readers (``unigeoseg_backend.datasets``, the ones
the evaluator uses), once, before the first step. Each configured dataset becomes one
:class:`~.sampler.Pool` per task it holds, keyed ``datasets[<i>]:<name>/<task>``. A dataset
that lists no sample is a :class:`~.config.ConfigError` naming its entry; entries its reader
skipped while listing are counted and logged.

While training, a sample whose image or mask turns out to be unreadable is counted and
skipped, with its file named in the log (:class:`ReadFailures`): the batch is one sample
shorter, the run goes on. Augmentation draws come from a generator seeded with the run's
seed, the micro-batch index and the sample's place in the global batch, so a resumed run
flips the same samples the same way.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
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
from .sampler import BatchPlan, Pool

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
