"""The training loop on the tiny model: a run end to end, resume, freezing, config errors
before any work, a NaN loss stopping the run with the last good checkpoint kept."""

from __future__ import annotations

import json
import math

import pytest
import torch
from dataset_trees import build_local
from training_runs import (
    assert_bit_identical,
    synthetic_chips,
    tensors,
    tiny_sections,
    write_config,
    write_local_dataset,
)

from unigeoseg_backend.cli.main import main as cli_main
from unigeoseg_backend.model.checkpoint import load_released
from unigeoseg_backend.model.unigeoseg import UNUSED_PARAMETERS
from unigeoseg_trainer import checkpointing
from unigeoseg_trainer.config import ConfigError, load_config
from unigeoseg_trainer.data import ReadFailures
from unigeoseg_trainer.losses import LossResult
from unigeoseg_trainer.metrics_log import read_metrics
from unigeoseg_trainer.train import (
    CHECKPOINTS,
    NonFiniteLossError,
    prepare,
    run_loop,
    train,
    train_step,
)


@pytest.fixture(scope="module")
def chips(tmp_path_factory):
    return write_local_dataset(tmp_path_factory.mktemp("chips"), *synthetic_chips())


def _config(tmp_path, chips, **changes):
    dataset = {"name": "local", "root": chips, "split": "train"}
    return write_config(tmp_path / "run.toml", tiny_sections(tmp_path / "out", **changes),
                        [dataset])


def test_a_tiny_run_logs_checkpoints_and_exports_a_loadable_model(tmp_path, chips):
    config = load_config(_config(tmp_path, chips))
    exported = train(config)
    out = tmp_path / "out"
    records = read_metrics(out)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    for record in records:
        assert math.isfinite(record["loss"]) and record["lr"] > 0
        assert record["task"] == "referring" and record["share/referring"] == 1.0
        assert record["samples"] == 2 and record["samples_per_s"] >= 0
    assert records[-1]["loss"] < records[0]["loss"]
    # keep_checkpoints = 2 of the checkpoints at steps 2, 4, 6
    assert [p.name for p in checkpointing.list_checkpoints(out / CHECKPOINTS)] == [
        "step_00000004", "step_00000006"]
    loaded = load_released(exported)
    assert loaded.name == "unigeoseg-tiny-sparseconv"
    final = checkpointing.latest_checkpoint(out / CHECKPOINTS)
    saved = tensors(final / "model.safetensors")
    state = loaded.model.state_dict()
    assert_bit_identical({k: saved[k] for k in state}, {k: v for k, v in state.items()})


def test_unigeoseg_train_resumes_from_the_latest_checkpoint(tmp_path, chips, capsys):
    path = _config(tmp_path, chips, run={"max_steps": 4})
    assert cli_main(["train", str(path)]) == 0
    first = read_metrics(tmp_path / "out")
    path = _config(tmp_path, chips, run={"max_steps": 4})
    assert cli_main(["train", str(path)]) == 0        # nothing left to do
    assert read_metrics(tmp_path / "out") == first
    assert "trained model in" in capsys.readouterr().out


def test_swin_and_the_unread_heads_are_frozen_and_swin_stays_in_eval_mode(tmp_path, chips):
    run = prepare(load_config(_config(tmp_path, chips, model={"freeze": ["swin"]})))
    trainable = {name for group in run.optimizer.param_groups for name in
                 [n for n, p in run.model.named_parameters()
                  if any(p is q for q in group["params"])]}
    names = dict(run.model.named_parameters())
    assert not any(n.startswith("model.vision_tower.") for n in trainable)
    assert not any(n.startswith(UNUSED_PARAMETERS) for n in trainable)
    assert trainable == {n for n, p in names.items() if p.requires_grad}
    assert {g["name"] for g in run.optimizer.param_groups} >= {"language", "mask_decoder"}
    assert not run.model.model.vision_tower.training and run.model.predictor.training
    train_step(run, ReadFailures())
    assert all(names[n].grad is None for n in names if n not in trainable)


@pytest.mark.parametrize("changes, key", [
    ({"optimm": {"lr": 1.0}}, "optimm"),
    ({"optim": {"lrr": 1.0}}, "optim.lrr"),
    ({"batch": {"global_batch": 3}}, "batch.global_batch"),
    ({"model": {"architecture": "unigeoseg-huge"}}, "model.architecture"),
    ({"model": {"freeze": ["eyes"]}}, "model.freeze"),
    ({"lora": {"rank": 0}}, "lora.rank"),
])
def test_config_errors_name_the_key_before_any_work(tmp_path, chips, capsys, changes, key):
    path = _config(tmp_path, chips, **changes)
    assert cli_main(["train", str(path)]) == 1
    assert f"configuration error: {key}:" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_missing_dataset_or_an_impossible_batch_is_refused_before_any_work(tmp_path, chips,
                                                                            capsys):
    missing = write_config(tmp_path / "missing.toml", tiny_sections(tmp_path / "out"),
                           [{"name": "local", "root": tmp_path / "nowhere"}])
    assert cli_main(["train", str(missing)]) == 1
    assert "datasets[0].root:" in capsys.readouterr().err
    config = load_config(_config(tmp_path, chips, batch={"global_batch": 2}))
    with pytest.raises(ConfigError) as info:
        config.check_world(2)            # 2 per device x 2 processes is not 2
    assert info.value.key == "batch.global_batch"
    assert not (tmp_path / "out").exists()


def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, chips):
    run = prepare(load_config(_config(tmp_path, chips, run={"checkpoint_every": 1})))
    real_loss = run.loss
    calls = []

    def poisoned(*args, **kwargs) -> LossResult:
        result = real_loss(*args, **kwargs)
        calls.append(1)
        if len(calls) == 3:                  # the third step's loss
            total = result.total * float("nan")
            return LossResult(total, {**result.terms, "loss": total.detach()})
        return result

    run.loss = poisoned
    with pytest.raises(NonFiniteLossError, match="step 2: the loss .* not finite") as info:
        run_loop(run)
    good = run.output_dir / CHECKPOINTS / "step_00000002"
    assert str(good) in str(info.value)
    assert checkpointing.latest_checkpoint(run.output_dir / CHECKPOINTS) == good
    saved = tensors(good / "model.safetensors")
    # the bad step was not applied: the parameters are still those of the checkpoint
    for name, value in run.model.state_dict().items():
        assert torch.equal(value, saved[name]), name
    assert [r["step"] for r in read_metrics(run.output_dir)] == [1, 2]


def test_a_three_task_mixture_trains_and_the_export_scores_through_unigeoseg_eval(tmp_path):
    tree = build_local(tmp_path / "data")     # referring, interactive, reasoning; one corrupt
    dataset = {"name": "local", "root": tree.root, "split": "test"}
    sections = tiny_sections(tmp_path / "out", run={"max_steps": 8, "checkpoint_every": 8},
                             tasks={"start": {"interactive": 0.4, "referring": 0.3,
                                              "reasoning": 0.3}})
    exported = train(load_config(write_config(tmp_path / "run.toml", sections, [dataset])))
    records = read_metrics(tmp_path / "out")
    assert {r["task"] for r in records} == {"interactive", "referring", "reasoning"}
    # the LM head is in every step; these templates train the response (reason_seg)
    assert all(r["loss_lm"] > 0 and math.isfinite(r["loss"]) for r in records)
    # the corrupt chip is skipped, counted, and its batch is one sample short
    assert records[-1]["skipped_samples"] >= 1
    assert any(r["samples"] == 1 for r in records if r["task"] == "referring")

    out = tmp_path / "eval"
    assert cli_main(["eval", "--dataset", "local", "--root", str(tree.root), "--model",
                     str(exported), "--device", "cpu", "--worst", "0", "--no-progress",
                     "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())["metrics"]
    assert {"referring", "interactive", "reasoning", "overall"} <= set(metrics)
    assert metrics["overall"]["failed"] == 1          # the corrupt chip
