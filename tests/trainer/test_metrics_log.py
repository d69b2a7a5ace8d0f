"""Metrics as JSON lines, the progress line, throughput and ETA."""

from __future__ import annotations

import math

from unigeoseg_trainer.metrics_log import (
    MetricsLog,
    Throughput,
    format_duration,
    progress_line,
    read_metrics,
)


def test_metrics_are_appended_one_line_per_step(tmp_path):
    with MetricsLog(tmp_path, tensorboard=False) as log:
        log.write(0, {"loss": 1.5, "task": "referring", "share/referring": 0.4})
        log.write(1, {"loss": 1.25, "task": "reasoning"})
    with MetricsLog(tmp_path, tensorboard=False) as log:        # a resumed run appends
        log.write(2, {"loss": math.nan})
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [0, 1, 2]
    assert records[0]["task"] == "referring" and records[0]["share/referring"] == 0.4
    assert math.isnan(records[2]["loss"]) and "time" in records[0]


def test_only_the_main_process_writes(tmp_path):
    log = MetricsLog(tmp_path / "run", enabled=False)
    log.write(0, {"loss": 1.0})
    log.close()
    assert not (tmp_path / "run").exists()


def test_a_torn_last_line_is_dropped(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 0, "loss": 1}\n{"step": 1, "lo')
    assert read_metrics(tmp_path) == [{"step": 0, "loss": 1}]


def test_progress_line():
    line = progress_line(120, 1000, 1.23456, 9.87e-5,
                         {"interactive": 0.522, "referring": 0.364, "reasoning": 0.114},
                         12.34, 3723)
    assert line == ("step 120/1000  loss 1.2346  lr 9.87e-05  mix intera 0.52 ref 0.36 "
                    "reason 0.11  12.3 samples/s  ETA 1h02m03s")


def test_format_duration():
    assert [format_duration(s) for s in (6, 245, 3723, math.inf)] == \
        ["6s", "4m05s", "1h02m03s", "?"]


def test_throughput_and_eta_from_a_clock():
    now = [0.0]
    meter = Throughput(window=3, clock=lambda: now[0])
    assert meter.samples_per_s == 0.0 and meter.eta_s(10) == math.inf
    for _ in range(5):
        now[0] += 2.0
        meter.update(16)
    assert meter.samples_per_s == 8.0
    assert meter.eta_s(10) == 20.0
