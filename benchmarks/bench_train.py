"""Training throughput: samples/s, peak memory and model FLOPs utilisation of one trainer step.

Rows (each runs in its own process, so that its peak memory is its own):

- the CPU: the tiny model (``unigeoseg-tiny-sparseconv``, 128 px, fp32), 4 samples per step,
  2,048 loss points, full fine-tune and LoRA;
- CUDA, when available: the full-size model (``unigeoseg-official-sparseconv``, 512 px,
  random weights built in memory, float32 master weights under bf16 autocast, Phi's layers
  checkpointed, 12,544 loss points as the recipe), 2, 4 and 8 samples per GPU, full fine-tune
  and LoRA.

One step is what ``train.train_step`` does on one process without accumulation: the training
forward with the LM logits, the recipe's loss, backward, clipping, AdamW. Half the samples of
a step are referring prompts, half reasoning prompts with a short answer (the LM loss).

Numbers: samples/s over ``--steps`` timed steps after ``--warmup`` steps; peak memory (peak
RSS of the row's process on the CPU, ``torch.cuda.max_memory_allocated`` on CUDA); FLOPs of
one step counted by ``torch.utils.flop_counter.FlopCounterMode`` (forward and backward, with
gradient checkpointing off so that recomputation is not counted as model FLOPs; operators it
has no formula for, such as ``grid_sample`` in the deformable attention, count 0), and
MFU = FLOPs per step x steps/s / the GPU's peak dense bf16 rate (:data:`PEAK_BF16`; no figure
for CPUs). It prints numbers and ratios; it never passes or fails.

    .venv/bin/python benchmarks/bench_train.py                 # CPU rows, and CUDA if present
    .venv/bin/python benchmarks/bench_train.py --device cuda   # the CUDA rows only
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass

#: Peak dense bf16 tensor-core FLOP/s by GPU name (substring of torch.cuda.get_device_name),
#: from the vendors' data sheets (SXM parts, without sparsity).
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "GH200": 989e12, "B200": 2250e12,
             "A100": 312e12, "L40S": 362e12, "A10G": 70e12}


@dataclass(frozen=True)
class Row:
    name: str
    device: str
    architecture: str
    batch: int
    lora: bool
    num_points: int
    gradient_checkpointing: bool

    @property
    def args(self) -> list[str]:
        return ["--row", json.dumps(self.__dict__)]


def rows(device: str) -> list[Row]:
    cpu = [Row(f"cpu tiny {kind}", "cpu", "unigeoseg-tiny-sparseconv", 4, kind == "lora", 2048,
               False) for kind in ("full", "lora")]
    cuda = [Row(f"cuda full-size {kind} batch {b}", "cuda", "unigeoseg-official-sparseconv", b,
                kind == "lora", 12544, True) for kind in ("full", "lora") for b in (2, 4, 8)]
    return {"cpu": cpu, "cuda": cuda, "all": cpu + cuda}[device]


def _prompts(batch: int, tokenizer):
    from unigeoseg_backend.model.prompting import build_prompt

    half = batch // 2
    return ([build_prompt("referring", "the water body in the north", tokenizer)] * (batch - half)
            + [build_prompt("reasoning", "where could a boat be launched?", tokenizer,
                            answer="the lake in the middle, left of the road")] * half)


def measure(row: Row, steps: int, warmup: int) -> dict:
    """One row in this process: the numbers of the module docstring."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from unigeoseg_backend.model.registry import get_config, tiny_tokenizer
    from unigeoseg_backend.model.unigeoseg import UniGeoSeg
    from unigeoseg_trainer.config import LoraSettings, OptimConfig
    from unigeoseg_trainer.lora import add_lora
    from unigeoseg_trainer.losses import PointSampling, TrainingLoss
    from unigeoseg_trainer.models import freeze
    from unigeoseg_trainer.train import set_train_mode

    device = torch.device(row.device)
    torch.manual_seed(0)
    with torch.device(device):
        model = UniGeoSeg(get_config(row.architecture))
    freeze(model, ["swin"])
    if row.lora:
        add_lora(model, LoraSettings(enabled=True))
    set_train_mode(model)
    o = OptimConfig()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=o.lr,
                                  betas=o.betas, eps=o.eps, weight_decay=o.weight_decay)
    loss = TrainingLoss(PointSampling(num_points=row.num_points))
    tokenizer = tiny_tokenizer()        # token ids only; the vocabulary size does not matter
    size = model.config.image_size
    images = torch.randn(row.batch, 3, size, size, device=device)
    targets = torch.rand(row.batch, size, size, device=device) > 0.5
    prompts = _prompts(row.batch, tokenizer)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else nullcontext())

    def step() -> None:
        with autocast:
            out = model(images, prompts, compute_lm_logits=True)
        result = loss(out.mask_logits, targets, float(row.batch), lm_logits=out.lm_logits,
                      lm_labels=out.lm_labels)
        result.total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    model.set_gradient_checkpointing(language=False)
    counter = FlopCounterMode(display=False)
    with counter:
        step()
    flops = counter.get_total_flops()
    model.set_gradient_checkpointing(language=row.gradient_checkpointing)
    for _ in range(warmup):
        step()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    seconds = (time.perf_counter() - started) / steps
    if device.type == "cuda":
        peak_bytes = torch.cuda.max_memory_allocated()
        name = torch.cuda.get_device_name()
        peak_flops = next((v for k, v in PEAK_BF16.items() if k in name), None)
    else:
        peak_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024   # Linux: KiB
        name, peak_flops = f"CPU, {torch.get_num_threads()} threads", None
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"row": row.name, "device": name, "batch": row.batch, "lora": row.lora,
            "trainable_parameters": trainable, "step_s": seconds,
            "samples_per_s": row.batch / seconds, "peak_memory_gib": peak_bytes / 2**30,
            "tflop_per_step": flops / 1e12, "achieved_tflop_s": flops / seconds / 1e12,
            "mfu": flops / seconds / peak_flops if peak_flops else None}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda", "all"), default="all")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--row", help=argparse.SUPPRESS)     # one row, in a child process
    args = parser.parse_args()
    if args.row:
        print(json.dumps(measure(Row(**json.loads(args.row)), args.steps, args.warmup)))
        return 0

    import torch

    wanted = rows(args.device)
    if not torch.cuda.is_available():
        skipped = [r for r in wanted if r.device == "cuda"]
        wanted = [r for r in wanted if r.device == "cpu"]
        if skipped:
            print(f"no CUDA device: {len(skipped)} CUDA rows skipped")
    results = []
    for row in wanted:
        child = subprocess.run([sys.executable, __file__, *row.args, "--steps", str(args.steps),
                                "--warmup", str(args.warmup)], capture_output=True, text=True)
        if child.returncode != 0:
            print(f"{row.name}: failed ({child.stderr.strip().splitlines()[-1:]})")
            continue
        results.append(json.loads(child.stdout.strip().splitlines()[-1]))
    header = (f"{'row':<34} {'samples/s':>9} {'step s':>8} {'peak GiB':>8} "
              f"{'TFLOP/step':>10} {'TFLOP/s':>8} {'MFU':>6}  trainable  device")
    print(header)
    for r in results:
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"
        print(f"{r['row']:<34} {r['samples_per_s']:>9.2f} {r['step_s']:>8.3f} "
              f"{r['peak_memory_gib']:>8.2f} {r['tflop_per_step']:>10.4f} "
              f"{r['achieved_tflop_s']:>8.3f} {mfu:>6}  {r['trainable_parameters']:>9,}  "
              f"{r['device']}")
    by_name = {r["row"]: r for r in results}
    for r in results:
        if r["lora"]:
            full = by_name.get(r["row"].replace("lora", "full"))
            if full:
                print(f"{r['row']}: {r['samples_per_s'] / full['samples_per_s']:.2f}x the "
                      f"samples/s, {r['peak_memory_gib'] / full['peak_memory_gib']:.2f}x the "
                      f"peak memory of the full fine-tune")
    return 0


if __name__ == "__main__":
    sys.exit(main())
