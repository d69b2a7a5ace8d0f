"""Two processes (torchrun, Gloo on the loopback interface) train to the same parameters as
one process with the same global batch, on a referring + reasoning mixture: the reasoning
answers differ in length, so the processes hold different numbers of labelled tokens and
the LM loss must be normalised by the count over every process, like the masks. Both
runs train without dropout (TATE's reasoning branch has some; see
trainer_without_dropout.py for why a split batch cannot draw the same masks).

The two runs see the same samples in the same places, with the same flips and the same
sampled loss points per sample; what differs is only how the global batch is split into
forwards (4 samples in one, or 2 + 2 with the gradients averaged by DDP), so sums are
taken in another order. Tolerances: every step's loss and gradient norm to a relative
1e-5; after ``STEPS`` AdamW steps of ``lr = 1e-3`` (parameters move by up to 4e-3) every
parameter to ``ATOL = 1e-4`` plus ``RTOL = 1e-4`` of its size. AdamW's ``eps`` is 1e-6 here:
some gradients are zero in exact arithmetic (the query and key weights of the one-query
self-attention, a softmax over one key), and with a smaller ``eps`` Adam divides their
rounding noise by its own size and moves those weights by about ``lr`` in both runs, in
unrelated directions.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys

import pytest
import torch
from training_runs import (
    NO_DROPOUT,
    TINY,
    assert_bit_identical,
    run_trainer,
    synthetic_chips,
    tensors,
    tiny_sections,
    trainer_env,
    write_config,
    write_local_dataset,
)

from unigeoseg_backend.model.registry import get_config
from unigeoseg_backend.model.unigeoseg import UniGeoSeg
from unigeoseg_trainer import checkpointing
from unigeoseg_trainer.metrics_log import read_metrics
from unigeoseg_trainer.sharding import wrapping_plan
from unigeoseg_trainer.train import CHECKPOINTS, EXPORT

STEPS = 4
ATOL, RTOL = 1e-4, 1e-4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


#: Reasoning answers of very different token counts.
ANSWERS = ["water.", "the lake in the middle of the image, left of the road and north of the "
           "fields", "a pond", "the river that crosses the scene from the north-west corner "
           "to the south-east corner", "ok", "the reservoir"]


def _config(folder, datasets, per_device: int, fsdp: bool = False):
    sections = tiny_sections(folder / "out", run={"max_steps": STEPS, "checkpoint_every": 2},
                             distributed={"fsdp": fsdp},
                             batch={"per_device": per_device, "global_batch": 4},
                             optim={"lr": 1e-3, "warmup_ratio": 0.0, "grad_clip": 0.0, "eps": 1e-6},
                             augment={"hflip": 0.5},
                             tasks={"start": {"referring": 0.5, "reasoning": 0.5}})
    folder.mkdir()
    return write_config(folder / "run.toml", sections,
                        [{"name": "local", "root": root, "split": "train"} for root in datasets])


def _torchrun(config) -> subprocess.CompletedProcess:
    """Two trainer processes (without dropout) under torchrun on 127.0.0.1."""
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1",
         "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
         "--master_port", str(_free_port()), *NO_DROPOUT, str(config)],
        env=trainer_env(), capture_output=True, text=True, timeout=240)


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    chips = write_local_dataset(root / "chips", *synthetic_chips(count=6))
    reasoning = write_local_dataset(root / "reasoning", *synthetic_chips(count=6, seed=1),
                                    instruction="where can a boat go?", task="reasoning",
                                    answers=ANSWERS)
    return [chips, reasoning]


@pytest.fixture(scope="module")
def two_process_ddp(tmp_path_factory, datasets):
    """The output folder of a 2-process DDP run of 2 samples per process."""
    folder = tmp_path_factory.mktemp("ddp") / "double"
    two = _torchrun(_config(folder, datasets, per_device=2))
    assert two.returncode == 0, two.stderr[-3000:]
    return folder / "out"


def _assert_same_training(records, exports):
    """Per-step losses and gradient norms to 1e-5 relative; exported parameters to
    ATOL / RTOL."""
    assert len(records[0]) == len(records[1]) == STEPS
    for key in ("loss", "grad_norm", "loss_lm"):
        torch.testing.assert_close(torch.tensor([r[key] for r in records[1]]),
                                   torch.tensor([r[key] for r in records[0]]),
                                   rtol=1e-5, atol=0, msg=key)
    a, b = exports
    assert sorted(a) == sorted(b)
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=ATOL, rtol=RTOL, msg=name)


@pytest.mark.timeout(280)
def test_two_gloo_processes_train_like_one_with_the_same_global_batch(tmp_path, datasets,
                                                                      two_process_ddp):
    single = _config(tmp_path / "single", datasets, per_device=4)
    one = run_trainer(single, entry=NO_DROPOUT)
    assert one.returncode == 0, one.stderr[-3000:]

    outs = [tmp_path / "single" / "out", two_process_ddp]
    records = [read_metrics(out) for out in outs]
    tasks = [r["task"] for r in records[0]]
    assert "reasoning" in tasks and "referring" in tasks, tasks
    assert all(r["loss_lm"] > 0 for r in records[0] if r["task"] == "reasoning")
    _assert_same_training(records, [tensors(out / EXPORT) for out in outs])
    # and they did train: the trainable parameters left their initial values
    torch.manual_seed(7)                              # the config's seed
    initial = UniGeoSeg(get_config(TINY)).state_dict()
    final = checkpointing.checkpoint_name(STEPS)
    trained = tensors(outs[0] / CHECKPOINTS / final / "model.safetensors")
    moved = max((trained[n] - initial[n]).abs().max().item() for n in initial
                if initial[n].is_floating_point())
    assert moved > 20 * ATOL


@pytest.mark.timeout(280)
def test_two_fsdp_processes_train_like_two_ddp_processes(tmp_path, datasets, two_process_ddp):
    fsdp = _torchrun(_config(tmp_path / "fsdp", datasets, per_device=2, fsdp=True))
    assert fsdp.returncode == 0, fsdp.stderr[-3000:]
    outs = [two_process_ddp, tmp_path / "fsdp" / "out"]
    _assert_same_training([read_metrics(out) for out in outs],
                          [tensors(out / EXPORT) for out in outs])
    # the checkpoint gathered from the shards holds the full model and optimizer state
    final = checkpointing.checkpoint_name(STEPS)
    for name in ("model.safetensors", "optimizer.safetensors"):
        saved = [tensors(out / CHECKPOINTS / final / name) for out in outs]
        assert sorted(saved[0]) == sorted(saved[1])
        for key in saved[0]:
            assert saved[0][key].shape == saved[1][key].shape, key
            torch.testing.assert_close(saved[1][key], saved[0][key], atol=ATOL, rtol=RTOL,
                                       msg=key)
    # and an FSDP run resumed from its step-2 checkpoint ends where the whole one ended
    resumed = tmp_path / "fsdp-resumed"
    config = _config(resumed, datasets, per_device=2, fsdp=True)
    step_2 = checkpointing.checkpoint_name(2)
    shutil.copytree(outs[1] / CHECKPOINTS / step_2, resumed / "out" / CHECKPOINTS / step_2)
    again = _torchrun(config)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resumed from {resumed / 'out' / CHECKPOINTS / step_2}" in again.stderr
    for name in ("model.safetensors", "optimizer.safetensors"):
        assert_bit_identical(tensors(resumed / "out" / CHECKPOINTS / final / name),
                             tensors(outs[1] / CHECKPOINTS / final / name))


def test_fsdp_shards_each_phi_layer_then_the_model():
    model = UniGeoSeg(get_config(TINY))
    layers = model.config.language["num_hidden_layers"]
    assert wrapping_plan(model) == [f"model.layers.{i}" for i in range(layers)] + [""]
