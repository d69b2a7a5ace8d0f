"""A CPU fp32 run killed with SIGKILL at a random step and resumed ends bit-identical to an
uninterrupted run: model, optimizer state, sampler position and per-step losses; a full
fine-tune reading its batches on two background threads, and a LoRA one (adapters, their
optimizer state and LoRA's dropout draws)."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys

import pytest
from training_runs import (
    assert_bit_identical,
    run_trainer,
    synthetic_chips,
    tensors,
    tiny_sections,
    trainer_env,
    write_config,
    write_local_dataset,
)

from unigeoseg_trainer import checkpointing
from unigeoseg_trainer.metrics_log import read_metrics
from unigeoseg_trainer.train import CHECKPOINTS, EXPORT

MAX_STEPS = 10


#: The runs killed and resumed: section changes on top of _config's.
VARIANTS = {
    "full-fine-tune, 2 loading threads": {"batch": {"num_workers": 2}},
    "lora": {"lora": {"enabled": True}},
}


def _config(folder, chips, changes):
    # accumulation 2 and hflip: the resumed run must also repeat the micro-batch order
    # and the per-sample flips
    sections = tiny_sections(folder / "out", run={"max_steps": MAX_STEPS, "checkpoint_every": 1,
                                                  "keep_checkpoints": 3, "log_every": 1},
                             batch={"accumulation": 2, "global_batch": 4,
                                    **changes.get("batch", {})},
                             augment={"hflip": 0.5},
                             **{k: v for k, v in changes.items() if k != "batch"})
    return write_config(folder / "run.toml", sections,
                        [{"name": "local", "root": chips, "split": "train"}])


def _last_per_step(out) -> dict[int, float]:
    """The loss of every step; a step redone after the kill counts with its last record."""
    return {record["step"]: record["loss"] for record in read_metrics(out)}


@pytest.mark.timeout(280)
@pytest.mark.parametrize("variant", VARIANTS)
def test_a_run_killed_at_a_random_step_resumes_bit_identically(tmp_path, variant):
    if variant == "lora":
        pytest.importorskip("peft")
    chips = write_local_dataset(tmp_path / "chips", *synthetic_chips())
    (tmp_path / "whole").mkdir()
    whole = _config(tmp_path / "whole", chips, VARIANTS[variant])
    completed = run_trainer(whole)
    assert completed.returncode == 0, completed.stderr[-3000:]

    (tmp_path / "killed").mkdir()
    killed = _config(tmp_path / "killed", chips, VARIANTS[variant])
    kill_at = random.SystemRandom().randint(2, MAX_STEPS - 3)
    process = subprocess.Popen([sys.executable, "-m", "unigeoseg_trainer", str(killed)],
                               env=trainer_env(), stderr=subprocess.PIPE, text=True)
    seen = []
    try:
        for line in process.stderr:
            seen.append(line)
            if f"step {kill_at}/{MAX_STEPS}" in line:
                process.send_signal(signal.SIGKILL)
                break
    finally:
        process.wait(timeout=60)
        process.stderr.close()
    assert process.returncode == -signal.SIGKILL, (
        f"the run was to be killed at step {kill_at}:\n{''.join(seen)[-3000:]}")
    out = tmp_path / "killed" / "out"
    assert not (out / EXPORT).exists()
    latest = checkpointing.latest_checkpoint(out / CHECKPOINTS)
    assert latest is not None

    resumed = run_trainer(killed)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr, f"killed at step {kill_at}"

    message = f"killed at step {kill_at}, resumed from {latest.name}"
    whole_out = tmp_path / "whole" / "out"
    assert _last_per_step(out) == _last_per_step(whole_out), message
    assert_bit_identical(tensors(out / EXPORT), tensors(whole_out / EXPORT))
    final = checkpointing.checkpoint_name(MAX_STEPS)
    for name in ("model.safetensors", "optimizer.safetensors"):
        assert_bit_identical(tensors(out / CHECKPOINTS / final / name),
                             tensors(whole_out / CHECKPOINTS / final / name))
    states = [json.loads((o / CHECKPOINTS / final / "state.json").read_text())
              for o in (out, whole_out)]
    assert states[0]["sampler"] == states[1]["sampler"], message
