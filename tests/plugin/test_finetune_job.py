"""What the "Fine-tune model" dialog shows of a job, without QGIS: replies move the job
through its stages, the live numbers and ETA, the loss curve scaled into a widget, the
before/after result, the base models offered, and the checks on the fields."""

from __future__ import annotations

import pytest
from qgis_plugin.core.finetune_job import (
    MAX_CURVE_POINTS,
    JobProgress,
    LossCurve,
    Stage,
    base_models,
    duration_text,
    estimated_eta_s,
    field_problems,
)
from qgis_plugin.unigeoseg_protocol.operations import EngineInfo, TrainEvent, TrainJobReply


def _reply(state: str, step: int = 0, events=(), **fields) -> TrainJobReply:
    return TrainJobReply(job="j1", name="ponds", base="default", state=state, step=step,
                         max_steps=10, events=tuple(events), **fields)


def test_replies_move_a_job_from_starting_to_succeeded_with_its_numbers_and_result():
    progress = JobProgress()
    progress.move_to(Stage.PREPARING)
    progress.move_to(Stage.STARTING)
    progress.apply(_reply("queued"))
    assert progress.stage is Stage.TRAINING
    progress.apply(_reply("running", 4, [TrainEvent(0, 0.0, val_iou=0.21),
                                         TrainEvent(2, 1.0, loss=0.9),
                                         TrainEvent(4, 2.0, loss=0.7)],
                          loss=0.7, elapsed_s=2.0, before_iou=0.21))
    assert progress.numbers_text() == {"step": "4/10", "loss": "0.7000", "iou": "0.210",
                                       "eta": "3 s"}  # 6 steps left at 0.5 s a step
    assert progress.curve.points == [(2, 0.9), (4, 0.7)]
    progress.apply(_reply("succeeded", 10, [TrainEvent(10, 5.0, loss=0.5)], loss=0.5,
                          before_iou=0.21, after_iou=0.58, engine="default:ponds"))
    assert progress.stage is Stage.SUCCEEDED and progress.eta_s is None
    assert progress.numbers_text()["iou"] == "0.580"
    assert progress.result_text() == ("Done: held-out IoU 0.210 before, 0.580 after "
                                      "fine-tuning (+0.370). New model: default:ponds")


def test_the_backends_eta_is_shown_when_it_gives_one():
    progress = JobProgress(stage=Stage.TRAINING)
    progress.apply(_reply("running", 1, eta_s=125.0, elapsed_s=1.0))
    assert progress.numbers_text()["eta"] == "2 min 5 s"


def test_a_cancelled_or_failed_job_says_so_and_a_final_stage_moves_nowhere():
    cancelled = JobProgress(stage=Stage.TRAINING)
    cancelled.apply(_reply("cancelled", 3, message="cancelled by the analyst"))
    assert cancelled.result_text() == "Cancelled: no model was made"
    with pytest.raises(ValueError, match="cannot go from CANCELLED to TRAINING"):
        cancelled.move_to(Stage.TRAINING)
    failed = JobProgress(stage=Stage.TRAINING)
    failed.apply(_reply("failed", 3, message="the trainer ran out of memory"))
    assert failed.result_text() == "Not fine-tuned: the trainer ran out of memory"
    refused = JobProgress()
    refused.move_to(Stage.REFUSED, "the polygon layer has no features")
    assert refused.result_text() == "Not fine-tuned: the polygon layer has no features"


def test_a_job_cannot_go_back_from_training_to_preparing():
    progress = JobProgress(stage=Stage.TRAINING)
    with pytest.raises(ValueError):
        progress.move_to(Stage.PREPARING)


def test_the_loss_curve_drops_repeats_and_non_finite_losses_and_stays_bounded():
    curve = LossCurve()
    curve.add(1, 1.0)
    curve.add(1, 0.5)            # the same step again (a re-sent event)
    curve.add(2, float("nan"))
    assert curve.points == [(1, 1.0)]
    for step in range(2, 3 * MAX_CURVE_POINTS):
        curve.add(step, 1.0 / step)
    assert len(curve.points) <= MAX_CURVE_POINTS
    assert curve.points[0] == (1, 1.0) and curve.points[-1][0] > 2 * MAX_CURVE_POINTS


def test_the_loss_curve_is_scaled_into_the_widget_highest_loss_at_the_top():
    curve = LossCurve([(0, 2.0), (5, 1.0), (10, 0.0)])
    assert curve.scaled(104, 54, margin=2) == [(2.0, 2.0), (52.0, 27.0), (102.0, 52.0)]
    assert LossCurve().scaled(100, 50) == []
    flat = LossCurve([(3, 0.5)]).scaled(100, 50, margin=0)
    assert flat == [(0.0, 25.0)]


def test_eta_from_the_mean_pace_needs_a_step_budget_and_a_first_step():
    assert estimated_eta_s(10.0, 5, 20) == 30.0
    assert estimated_eta_s(10.0, 0, 20) is None
    assert estimated_eta_s(10.0, 5, None) is None
    assert [duration_text(s) for s in (0.4, 59, 61, 7300)] == ["0 s", "59 s", "1 min 1 s",
                                                               "2 h 1 min"]


def test_base_models_are_the_available_default_and_fine_tuned_engines_default_first():
    engines = {"sam": EngineInfo(True), "default:roofs": EngineInfo(True),
               "default:broken": EngineInfo(False, reason="bad card"),
               "default:alpha": EngineInfo(True), "default": EngineInfo(True),
               "unigeoseg": EngineInfo(True)}
    assert base_models(engines) == ["default", "default:alpha", "default:roofs"]
    assert base_models({}) == []


def test_field_problems_name_each_missing_or_bad_field():
    assert field_problems("ponds", "default", 10, True, True) == []
    problems = field_problems("../x", "", 0, False, False)
    assert len(problems) == 5
    assert any("raster" in p for p in problems) and any("polygon layer" in p for p in problems)
    assert any("base model" in p for p in problems) and any("steps" in p for p in problems)
    assert any("name the new model" in p for p in problems)
