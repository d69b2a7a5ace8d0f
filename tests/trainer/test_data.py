"""The mixture from configured datasets, unreadable samples skipped, model batches built."""

from __future__ import annotations

import logging
from functools import partial

import pytest
import torch
from dataset_trees import build_local

from unigeoseg_backend.model.registry import tiny_tokenizer
from unigeoseg_trainer.config import AugmentConfig, ConfigError, DatasetConfig
from unigeoseg_trainer.data import BatchReader, ReadFailures, load_batch, open_mixture
from unigeoseg_trainer.sampler import BatchPlan, TaskBatchSampler
from unigeoseg_trainer.schedule import TaskSchedule


@pytest.fixture(scope="module")
def local_tree(tmp_path_factory):
    return build_local(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def _local(tree, **changes) -> DatasetConfig:
    return DatasetConfig(**{"name": "local", "root": str(tree.root), "split": "test",
                            **changes})


def test_datasets_split_into_per_task_pools(local_tree):
    mixture = open_mixture([_local(local_tree, weight=2.0)])
    assert [(p.key, p.size, p.weight) for p in mixture.pools] == [
        ("datasets[0]:local/interactive", 1, 2.0),
        ("datasets[0]:local/reasoning", 1, 2.0),
        ("datasets[0]:local/referring", 2, 2.0),
    ]
    assert mixture.sample("datasets[0]:local/reasoning", 0).sample_id == "7"


def test_a_dataset_without_samples_is_an_error_before_training(local_tree, tmp_path):
    (tmp_path / "test.jsonl").write_text("\n")
    with pytest.raises(ConfigError) as info:
        open_mixture([_local(local_tree), DatasetConfig(name="local", root=str(tmp_path),
                                                        split="test")])
    assert info.value.key == "datasets[1]"
    with pytest.raises(ConfigError) as info:
        open_mixture([_local(local_tree, split="train")])      # no train.jsonl
    assert info.value.key == "datasets[0]"


def test_listing_problems_are_logged(local_tree, caplog):
    with caplog.at_level(logging.WARNING):
        open_mixture([_local(local_tree)])
    assert "6 entries skipped while listing" in caplog.text


def _plan(mixture, task: str, keys_indices) -> BatchPlan:
    return BatchPlan(index=3, step=3, task=task, shares={task: 1.0},
                     items=tuple(keys_indices))


def test_batch_is_letterboxed_and_tokenised(local_tree, tokenizer):
    mixture = open_mixture([_local(local_tree)])
    key = "datasets[0]:local/interactive"
    batch = load_batch(_plan(mixture, "interactive", [(key, 0), (key, 0)]), mixture,
                       tokenizer, AugmentConfig(), seed=0, first_place=0,
                       failures=ReadFailures(), size=64)
    assert batch.images.shape == (2, 3, 64, 64) and batch.images.dtype == torch.float32
    assert batch.targets.shape == (2, 64, 64) and batch.targets.dtype == torch.bool
    assert batch.targets.any()
    assert [p.task for p in batch.prompts] == ["interactive", "interactive"]
    assert batch.prompts[0].intera_coords is not None
    assert batch.sample_ids == [f"{key}#chip-16bit"] * 2


def test_an_unreadable_sample_is_counted_skipped_and_named(local_tree, tokenizer, caplog):
    mixture = open_mixture([_local(local_tree)])
    key = "datasets[0]:local/referring"
    ids = [s.sample_id for s in mixture.samples[key]]
    corrupt, good = ids.index("corrupt-chip"), ids.index("rgba-png")
    failures = ReadFailures()
    with caplog.at_level(logging.WARNING):
        batch = load_batch(_plan(mixture, "referring", [(key, corrupt), (key, good)]),
                           mixture, tokenizer, AugmentConfig(), seed=0, first_place=0,
                           failures=failures, size=64)
    assert len(batch) == 1 and batch.sample_ids == [f"{key}#rgba-png"]
    assert failures.counts[key] == 1 and failures.total == 1
    assert "corrupt.tif" in caplog.text
    only_corrupt = load_batch(_plan(mixture, "referring", [(key, corrupt)]), mixture,
                              tokenizer, AugmentConfig(), seed=0, first_place=0,
                              failures=failures, size=64)
    assert only_corrupt is None and failures.total == 2


def test_augmentation_is_reproducible_and_consistent(local_tree, tokenizer):
    mixture = open_mixture([_local(local_tree)])
    key = "datasets[0]:local/referring"
    good = [s.sample_id for s in mixture.samples[key]].index("rgba-png")
    plan = _plan(mixture, "referring", [(key, good)] * 8)
    flips = AugmentConfig(hflip=0.5)

    def load(augment, first_place=0):
        return load_batch(plan, mixture, tokenizer, augment, seed=1, first_place=first_place,
                          failures=ReadFailures(), size=64)

    plain = load(AugmentConfig())
    a, b = load(flips), load(flips)
    assert a.flips == b.flips and torch.equal(a.images, b.images)
    assert ("horizontal",) in a.flips and () in a.flips
    for i, applied in enumerate(a.flips):
        flipped = applied == ("horizontal",)
        # the instruction says "the top left"; after a horizontal flip it says "top right"
        assert ("top right" in tokenizer.decode(a.prompts[i].refer_ids)) == flipped
        expected_target = plain.targets[0].flip(-1) if flipped else plain.targets[0]
        expected_image = plain.images[0].flip(-1) if flipped else plain.images[0]
        assert torch.equal(a.targets[i], expected_target)
        assert torch.equal(a.images[i], expected_image)      # square image: same letterbox
    assert load(flips, first_place=8).flips != a.flips      # another place, other draws


def test_background_threads_read_the_same_batches_in_the_same_order(local_tree, tokenizer):
    mixture = open_mixture([_local(local_tree)])
    schedule = TaskSchedule({"interactive": 0.4, "referring": 0.4, "reasoning": 0.2}, 0.7)
    read = partial(load_batch, mixture=mixture, tokenizer=tokenizer,
                   augment=AugmentConfig(hflip=0.5, vflip=0.5), seed=3, first_place=0,
                   size=64)
    results = []
    for workers in (0, 2):
        sampler = TaskBatchSampler(mixture.pools, schedule, per_device=2, max_steps=12,
                                   accumulation=1, world_size=1, rank=0, seed=3)
        reader, failures, batches = BatchReader(sampler, read, workers), ReadFailures(), []
        for _ in range(12):
            batches.append(reader.get(sampler.next_batch(), failures))
        reader.close()
        results.append((batches, failures.counts, sampler.state_dict()))
    (serial, serial_failures, serial_position), (threaded, threaded_failures, position) = results
    assert serial_failures == threaded_failures and position == serial_position
    assert sum(serial_failures.values()) > 0              # the corrupt chip was drawn
    for a, b in zip(serial, threaded, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            assert a.sample_ids == b.sample_ids and a.flips == b.flips
            assert torch.equal(a.images, b.images) and torch.equal(a.targets, b.targets)
