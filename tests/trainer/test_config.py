"""Training config: TOML read into frozen dataclasses, every error naming its key."""

from __future__ import annotations

import pytest

from unigeoseg_trainer.config import ConfigError, load_config, parse_config


def _raw(tmp_path, **sections):
    raw = {"datasets": [{"name": "local", "root": str(tmp_path)}]}
    raw.update(sections)
    return raw


def _error_key(raw, **kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(raw, **kwargs)
    return info.value.key


def test_defaults_are_the_recipe(tmp_path):
    config = parse_config(_raw(tmp_path))
    assert config.optim.lr == 1e-4 and config.optim.weight_decay == 0.0
    assert config.optim.warmup_ratio == 0.03
    assert config.batch.global_batch == 16
    assert (config.loss.num_points, config.loss.oversample_ratio,
            config.loss.importance_sample_ratio) == (12544, 3.0, 0.75)
    assert (config.loss.bce_weight, config.loss.dice_weight) == (5.0, 5.0)
    assert config.tasks.interactive_end_factor == 0.7
    assert config.model.freeze == ("swin",)


def test_toml_file_with_relative_paths(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "run.toml").write_text(
        '[run]\noutput_dir = "out"\nmax_steps = 10\n'
        '[optim]\nlr = 2e-4\nbetas = [0.9, 0.95]\n'
        '[[datasets]]\nname = "local"\nroot = "data"\nweight = 2\ntask = "ref"\n')
    config = load_config(tmp_path / "run.toml")
    assert config.run.max_steps == 10
    assert config.optim.betas == (0.9, 0.95)
    assert config.datasets[0].root == str(tmp_path / "data")
    assert config.run.output_dir == str(tmp_path / "out")
    assert config.datasets[0].weight == 2.0 and isinstance(config.datasets[0].weight, float)


@pytest.mark.parametrize("sections, key", [
    ({"optim": {"lrr": 1e-4}}, "optim.lrr"),
    ({"optimiser": {}}, "optimiser"),
    ({"optim": {"lr": "fast"}}, "optim.lr"),
    ({"optim": {"lr": -1.0}}, "optim.lr"),
    ({"optim": {"betas": [0.9]}}, "optim.betas"),
    ({"run": {"max_steps": 1.5}}, "run.max_steps"),
    ({"run": {"resume": 1}}, "run.resume"),
    ({"loss": {"importance_sample_ratio": 1.5}}, "loss.importance_sample_ratio"),
    ({"tasks": {"start": {"interactive": 0.5, "referring": 0.2}}}, "tasks.start"),
    ({"tasks": {"start": {"segmentation": 1.0}}}, "tasks.start.segmentation"),
    ({"augment": {"hflip": 2.0}}, "augment.hflip"),
    ({"model": {"precision": "fp16"}}, "model.precision"),
    ({"batch": {"per_device": 3, "global_batch": 16}}, "batch.global_batch"),
])
def test_errors_name_the_key(tmp_path, sections, key):
    assert _error_key(_raw(tmp_path, **sections)) == key


def test_dataset_errors_name_the_entry(tmp_path):
    good = {"name": "local", "root": str(tmp_path)}
    assert _error_key({"datasets": []}) == "datasets"
    assert _error_key({"datasets": [good, {**good, "name": "coco"}]}) == "datasets[1].name"
    assert _error_key({"datasets": [good, {**good, "root": str(tmp_path / "nope")}]}) \
        == "datasets[1].root"
    assert _error_key({"datasets": [{**good, "colour": "red"}]}) == "datasets[0].colour"
    assert _error_key({"datasets": [{**good, "task": "counting"}]}) == "datasets[0].task"
    assert _error_key({"datasets": [{**good, "weight": 0}]}) == "datasets[0].weight"
    # paths are only checked when asked
    parse_config({"datasets": [{**good, "root": str(tmp_path / "nope")}]}, check_paths=False)


def test_model_init_must_exist(tmp_path):
    assert _error_key(_raw(tmp_path, model={"init": str(tmp_path / "none")})) == "model.init"


def test_batch_must_divide_over_the_processes(tmp_path):
    config = parse_config(_raw(tmp_path, batch={"per_device": 2, "accumulation": 2,
                                                "global_batch": 16}))
    config.check_world(4)
    with pytest.raises(ConfigError) as info:
        config.check_world(3)
    assert info.value.key == "batch.global_batch"


def test_unreadable_toml_is_a_config_error(tmp_path):
    (tmp_path / "bad.toml").write_text("[run\n")
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "bad.toml")
    assert info.value.key == "file"
