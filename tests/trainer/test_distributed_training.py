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

import socket
import subprocess
import sys

import pytest
import torch
from training_runs import (
    NO_DROPOUT,
    TINY,
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


def _config(folder, datasets, per_device: int):
    sections = tiny_sections(folder / "out", run={"max_steps": STEPS, "checkpoint_every": 2},
                             batch={"per_device": per_device, "global_batch": 4},
                             optim={"lr": 1e-3, "warmup_ratio": 0.0, "grad_clip": 0.0, "eps": 1e-6},
                             augment={"hflip": 0.5},
                             tasks={"start": {"referring": 0.5, "reasoning": 0.5}})
    folder.mkdir()
    return write_config(folder / "run.toml", sections,
                        [{"name": "local", "root": root, "split": "train"} for root in datasets])


@pytest.mark.timeout(280)
def test_two_gloo_processes_train_like_one_with_the_same_global_batch(tmp_path):
    chips = write_local_dataset(tmp_path / "chips", *synthetic_chips(count=6))
    reasoning = write_local_dataset(tmp_path / "reasoning", *synthetic_chips(count=6, seed=1),
                                    instruction="where can a boat go?", task="reasoning",
                                    answers=ANSWERS)
    single = _config(tmp_path / "single", [chips, reasoning], per_device=4)
    double = _config(tmp_path / "double", [chips, reasoning], per_device=2)

    one = run_trainer(single, entry=NO_DROPOUT)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1",
         "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
         "--master_port", str(_free_port()), *NO_DROPOUT, str(double)],
        env=trainer_env(), capture_output=True, text=True, timeout=240)
    assert two.returncode == 0, two.stderr[-3000:]

    records = [read_metrics(folder / "out") for folder in (tmp_path / "single",
                                                          tmp_path / "double")]
    assert len(records[0]) == len(records[1]) == STEPS
    tasks = [r["task"] for r in records[0]]
    assert "reasoning" in tasks and "referring" in tasks, tasks
    assert all(r["loss_lm"] > 0 for r in records[0] if r["task"] == "reasoning")
    for key in ("loss", "grad_norm", "loss_lm"):
        torch.testing.assert_close(torch.tensor([r[key] for r in records[1]]),
                                   torch.tensor([r[key] for r in records[0]]),
                                   rtol=1e-5, atol=0)
    a = tensors(tmp_path / "single" / "out" / EXPORT)
    b = tensors(tmp_path / "double" / "out" / EXPORT)
    assert sorted(a) == sorted(b)
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=ATOL, rtol=RTOL, msg=name)
    # and they did train: the trainable parameters left their initial values
    torch.manual_seed(7)                              # the config's seed
    initial = UniGeoSeg(get_config(TINY)).state_dict()
    final = checkpointing.checkpoint_name(STEPS)
    trained = tensors(tmp_path / "single" / "out" / CHECKPOINTS / final / "model.safetensors")
    moved = max((trained[n] - initial[n]).abs().max().item() for n in initial
                if initial[n].is_floating_point())
    assert moved > 20 * ATOL
