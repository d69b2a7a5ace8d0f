"""The training loop: UniGeoSeg on a task-scheduled mixture, one process or many.

One process (the CPU, or one GPU)::

    unigeoseg train run.toml
    python -m unigeoseg_trainer run.toml

DDP on the GPUs of one machine (NCCL; Gloo when ``run.device = "cpu"``)::

    torchrun --standalone --nproc_per_node 8 -m unigeoseg_trainer run.toml

Two machines of 8 GPUs (run on each, ``--node_rank`` 0 and 1)::

    torchrun --nnodes 2 --node_rank 0 --nproc_per_node 8 \\
        --master_addr 10.0.0.1 --master_port 29500 -m unigeoseg_trainer run.toml

With ``distributed.fsdp = true`` the processes shard the model instead of replicating it
(:mod:`.sharding`); with ``[lora] enabled = true`` Phi trains through adapters (:mod:`.lora`).

What one optimizer step does (``batch.accumulation`` micro-batches; gradients are
all-reduced, or reduce-scattered under FSDP, only on the last one):

1. the learning rate of the step (:class:`~.schedule.LearningRateSchedule`) is set;
2. per micro-batch: the sampler's plan, its samples read and letterboxed
   (:func:`~.data.load_batch`, ahead on ``batch.num_workers`` threads), the training
   forward under bf16 autocast on CUDA (fp32 on the CPU), the loss of :mod:`.losses`
   divided by the accumulation, backward;
3. a NaN or Inf loss or gradient norm on any process stops the run
   (:class:`NonFiniteLossError`) before the step is applied: the parameters stay those of
   the last good step and the checkpoints on disk are untouched;
4. gradients clipped to ``optim.grad_clip``, AdamW step.

Every ``run.checkpoint_every`` steps (and at the end) rank 0 writes an atomic checkpoint
(:mod:`.checkpointing`: model, optimizer, sampler position, every process's generators,
step); a run whose ``output_dir`` holds one continues from it. Every ``validation.every``
steps the model is scored with the evaluation of ``unigeoseg eval`` (gIoU / cIoU per task).
At the end the model is written in the released layout to ``<output_dir>/model``, which
``unigeoseg serve --model``, ``predict`` and ``eval`` load as they load the released one.

Determinism: the data order, the flips and the loss's sampled points depend only on the
seed, the micro-batch and the sample's place in the global batch, so a resumed run repeats
the uninterrupted one exactly (bit for bit on the CPU in fp32), and N processes train on the
same global batches as one process.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from unigeoseg_backend.distributed import (
    World,
    all_gather_variable,
    all_true,
    barrier,
    close_world,
    gather_counts,
    init_world,
    launched_world_size,
    sum_over_ranks,
)
from unigeoseg_backend.errors import WeightsError
from unigeoseg_backend.model.unigeoseg import UniGeoSeg

from . import checkpointing, default_family, sharding
from .config import ConfigError, TrainConfig, load_config
from .data import Batch, BatchReader, Mixture, ReadFailures, load_batch, open_mixture
from .lora import add_lora, merge_adapters
from .losses import (
    PointSampling,
    TrainingLoss,
    labelled_tokens,
    mean_count_per_process,
    mean_mask_count,
)
from .metrics_log import MetricsLog, Throughput, progress_line
from .models import build_model, freeze, plain_model
from .sampler import BatchPlan, TaskBatchSampler
from .schedule import LearningRateSchedule, TaskSchedule
from .validation import Validator

logger = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"     #: under run.output_dir
EXPORT = "model"                #: the released-layout model, under run.output_dir


class NonFiniteLossError(RuntimeError):
    """The loss or the gradient norm became NaN or Inf; the run stopped before applying it."""


# ------------------------------------------------------------------ processes and devices

def select_device(name: str) -> torch.device:
    """``run.device``: auto is CUDA when available."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def start_world(config: TrainConfig) -> World:
    """Join torchrun's process group (NCCL on CUDA, Gloo on the CPU, unless
    ``distributed.backend`` says otherwise); a single process is rank 0 of 1."""
    device = select_device(config.run.device)
    backend = config.distributed.backend
    if launched_world_size() > 1 and backend != "auto" and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend)
    return init_world(device)


# ------------------------------------------------------------------ per-sample randomness

def sample_generator(seed: int, micro_batch: int, place: int,
                     device: torch.device) -> torch.Generator:
    """The generator of the loss's sampled points for one sample of one micro-batch."""
    state = np.random.SeedSequence([seed, micro_batch, place, 1]).generate_state(1, np.uint64)
    return torch.Generator(device=device).manual_seed(int(state[0] >> np.uint64(1)))


def gather_rng_states(world: World) -> list[checkpointing.RngState]:
    """Every process's generator states, in rank order, on every process (as tensors)."""
    state = checkpointing.capture_rng_state()
    if not world.distributed:
        return [state]
    scalars = json.dumps(state.scalars).encode("utf-8")
    packed = {**state.tensors,
              "scalars.json": torch.frombuffer(bytearray(scalars), dtype=torch.uint8)}
    blob = torch.frombuffer(bytearray(save_safetensors(packed)), dtype=torch.uint8)
    counts = gather_counts(world, blob.numel())
    everything = all_gather_variable(world, blob).cpu()
    states, start = [], 0
    for count in counts:
        part = load_safetensors(everything[start:start + count].numpy().tobytes())
        start += count
        text = part.pop("scalars.json").numpy().tobytes().decode("utf-8")
        states.append(checkpointing.RngState(tensors=part, scalars=json.loads(text)))
    return states


# ------------------------------------------------------------------ the run

@dataclass
class Run:
    """Everything one process trains with."""

    config: TrainConfig
    world: World
    model: Any                      # UniGeoSeg (sharded in place under FSDP) or DefaultSegmenter
    wrapped: nn.Module              # what the step calls: DDP(model) or the model
    tokenizer: Any                  # UniGeoSeg's; None for the default model
    optimizer: torch.optim.Optimizer
    lr_schedule: LearningRateSchedule
    sampler: TaskBatchSampler
    mixture: Mixture
    loss: TrainingLoss
    validator: Validator
    batches: BatchReader            # reads the sampler's micro-batches (ahead)
    step: int = 0                   # optimizer steps done
    budget_share: float = 0.0       # share of run.max_seconds used (0 without a time budget)
    classes: list[Any] = field(default_factory=list)   # the default model's KnownClasses
    base_card: Any = None           # the default model's card it started from, if any
    phrases: Any = None             # the default model's PhraseEmbeddings

    @property
    def is_default_model(self) -> bool:
        return self.config.model.family == "default"

    @property
    def output_dir(self) -> Path:
        return Path(self.config.run.output_dir)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def sharded(self) -> bool:
        """FSDP2 shards the model (``distributed.fsdp`` with more than one process)."""
        return self.config.distributed.fsdp and self.world.distributed

    def plain_model(self) -> UniGeoSeg:
        """The model as it leaves the trainer (validation, export): a plain UniGeoSeg with
        the full parameters (gathered from the shards; every process must call it then)
        and the LoRA adapters merged, or the model itself when it is neither."""
        if self.is_default_model or not (self.sharded or self.config.lora.enabled):
            return self.model
        state = (sharding.full_model_state(self.model, on_rank0_cpu=False) if self.sharded
                 else self.model.state_dict())
        if self.config.lora.enabled:
            state = merge_adapters(state, self.config.lora)
        return plain_model(self.model.config, state, self.model)


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW with one parameter group per trainable component (fixed order: checkpoints
    check it by name)."""
    o = config.optim
    named = (default_family.default_parameter_groups(model) if config.model.family == "default"
             else model.trainable_parameter_groups())
    groups = [{"params": list(params.values()), "name": name}
              for name, params in named.items()]
    if not groups:
        raise ConfigError("model.freeze", "every parameter is frozen: nothing to train")
    return torch.optim.AdamW(groups, lr=o.lr, betas=o.betas, eps=o.eps,
                             weight_decay=o.weight_decay)


def set_train_mode(model: UniGeoSeg) -> None:
    """Train mode, except for frozen components (Swin's drop-path stays off when frozen)."""
    model.train()
    for module in (model.model.vision_tower, model.model.mm_projector, model.pixel_decoder,
                   model.predictor, model.heads):
        if not any(p.requires_grad for p in module.parameters()):
            module.eval()


def prepare(config: TrainConfig) -> Run:
    """Check the configuration, open the data, build (or resume) model and optimizer.

    Every configuration error is raised here, before the first step.
    """
    world = start_world(config)
    config.check_world(world.size)
    if not config.model.init and not config.model.architecture:
        raise ConfigError("model.init", "give model.init (a released-layout folder) or "
                                        "model.architecture (random initialisation)")
    mixture = open_mixture(config.datasets)
    validator = Validator(config.validation, config.run.output_dir, world)
    if config.model.family == "default":
        return prepare_default_model(config, world, mixture, validator)
    torch.manual_seed(config.run.seed)        # the same initial weights on every process
    model, tokenizer = build_model(config.model, world.device)
    freeze(model, config.model.freeze)
    if config.lora.enabled:
        add_lora(model, config.lora)
    # Phi's decoder layers recompute their activations in the backward (non-reentrant)
    model.set_gradient_checkpointing(language=config.model.gradient_checkpointing)
    set_train_mode(model)
    if config.distributed.fsdp and world.distributed:
        sharding.shard(model, world.device, config.model.precision)
    elif config.distributed.fsdp:
        logger.warning("distributed.fsdp with one process: nothing to shard")
    optimizer = build_optimizer(model, config)
    lr_schedule = LearningRateSchedule.from_ratio(config.optim.lr, config.optim.min_lr,
                                                  config.optim.warmup_ratio,
                                                  config.run.max_steps)
    sampler, loss = _sampler_and_loss(config, world, mixture)
    batches = BatchReader(sampler, partial(
        load_batch, mixture=mixture, tokenizer=tokenizer, augment=config.augment,
        seed=config.run.seed, first_place=world.rank * config.batch.per_device,
        size=model.config.image_size), config.batch.num_workers)
    torch.manual_seed(config.run.seed + world.rank)   # runtime draws differ per process
    run = Run(config=config, world=world, model=model, wrapped=model, tokenizer=tokenizer,
              optimizer=optimizer, lr_schedule=lr_schedule, sampler=sampler, mixture=mixture,
              loss=loss, validator=validator, batches=batches)
    if config.run.resume:
        resume(run)
    if world.distributed and not run.sharded:
        # Every trainable parameter is read by every forward (frozen ones excluded, the
        # LM head always computed): no unused-parameter search.
        run.wrapped = DistributedDataParallel(
            model, device_ids=[world.device.index] if world.device.type == "cuda" else None,
            find_unused_parameters=False)
    return run


def _sampler_and_loss(config: TrainConfig, world: World, mixture: Mixture
                      ) -> tuple[TaskBatchSampler, TrainingLoss]:
    sampler = TaskBatchSampler(
        mixture.pools, TaskSchedule(config.tasks.start, config.tasks.interactive_end_factor),
        per_device=config.batch.per_device, max_steps=config.run.max_steps,
        accumulation=config.batch.accumulation, world_size=world.size, rank=world.rank,
        seed=config.run.seed)
    c = config.loss
    loss = TrainingLoss(PointSampling(c.num_points, c.oversample_ratio,
                                      c.importance_sample_ratio),
                        c.bce_weight, c.dice_weight, c.lm_weight)
    return sampler, loss


def prepare_default_model(config: TrainConfig, world: World, mixture: Mixture,
                          validator: Validator) -> Run:
    """:func:`prepare` for ``model.family = "default"`` (:mod:`.default_family`): the chips
    checked against the evaluation regions, every instruction embedded once, the model."""
    from unigeoseg_backend.default_model.text_encoder import default_text_encoder

    default_family.check_chip_regions(config, mixture)
    torch.manual_seed(config.run.seed)        # the same initial weights on every process
    model, base = default_family.build_default(config, world.device)
    classes = default_family.text_classes(mixture, base)
    phrases = default_family.PhraseEmbeddings(default_text_encoder(), classes)
    phrases.prepare([s for samples in mixture.samples.values() for s in samples]
                    + [s for listing in validator.listings for s in listing.samples])
    optimizer = build_optimizer(model, config)
    lr_schedule = LearningRateSchedule.from_ratio(config.optim.lr, config.optim.min_lr,
                                                  config.optim.warmup_ratio,
                                                  config.run.max_steps)
    sampler, loss = _sampler_and_loss(config, world, mixture)
    batches = BatchReader(sampler, partial(
        default_family.load_default_batch, mixture=mixture, phrases=phrases,
        hflip=config.augment.hflip, vflip=config.augment.vflip,
        photometric=config.augment.photometric, seed=config.run.seed,
        first_place=world.rank * config.batch.per_device, text_dim=model.config.text_dim),
        config.batch.num_workers)
    torch.manual_seed(config.run.seed + world.rank)
    run = Run(config=config, world=world, model=model, wrapped=model, tokenizer=None,
              optimizer=optimizer, lr_schedule=lr_schedule, sampler=sampler, mixture=mixture,
              loss=loss, validator=validator, batches=batches, classes=classes,
              base_card=base, phrases=phrases)
    if config.run.resume:
        resume(run)
    if world.distributed:
        run.wrapped = DistributedDataParallel(
            model, device_ids=[world.device.index] if world.device.type == "cuda" else None,
            find_unused_parameters=False)
    return run


def resume(run: Run) -> None:
    """Continue from the newest intact checkpoint of the run folder, if there is one."""
    folder = checkpointing.latest_checkpoint(run.output_dir / CHECKPOINTS)
    if folder is None:
        return
    load = sharding.load_checkpoint if run.sharded else checkpointing.load_checkpoint
    state = load(folder, run.model, run.optimizer)
    if state.lr_schedule and state.lr_schedule != asdict(run.lr_schedule):
        logger.warning("the learning-rate schedule changed since %s: %s -> %s", folder,
                       state.lr_schedule, asdict(run.lr_schedule))
    run.sampler.load_state_dict(state.sampler)
    if len(state.rng) == run.world.size:
        checkpointing.restore_rng_state(state.rng[run.world.rank])
    else:
        logger.warning("%s was written by %d processes, this run has %d: generators reseeded",
                       folder, len(state.rng), run.world.size)
    run.step = state.step
    if run.world.is_main:
        logger.info("resumed from %s (step %d)", folder, state.step)


def save(run: Run) -> Path | None:
    """A checkpoint of the current step (written by rank 0; every rank waits for it)."""
    rng = gather_rng_states(run.world)
    tensors = (sharding.checkpoint_tensors(run.model, run.optimizer) if run.sharded
               else None)                   # gathered on rank 0 by every process
    folder = None
    if run.world.is_main:
        state = checkpointing.TrainingState(
            step=run.step, sampler=run.sampler.state_dict(),
            lr_schedule=asdict(run.lr_schedule), rng=rng,
            extra={"world_size": run.world.size})
        if tensors is None:
            tensors = checkpointing.CheckpointTensors.of(run.model, run.optimizer)
        folder = checkpointing.save_checkpoint_tensors(run.output_dir / CHECKPOINTS, tensors,
                                                       state,
                                                       keep=run.config.run.keep_checkpoints)
    barrier(run.world)
    return folder


# ------------------------------------------------------------------ one step

@dataclass
class StepResult:
    loss: float                     # mean over micro-batches and processes
    terms: dict[str, float]         # the same for each loss term
    grad_norm: float
    samples: int                    # over every process
    task: str
    shares: dict[str, float]


def _autocast(run: Run):
    cuda_bf16 = run.device.type == "cuda" and run.config.model.precision == "bf16"
    return torch.autocast("cuda", dtype=torch.bfloat16) if cuda_bf16 else nullcontext()


@contextmanager
def _gradient_sync(run: Run, sync: bool) -> Iterator[None]:
    """Gradients all-reduced (DDP) or reduce-scattered (FSDP) in this backward only when
    ``sync`` (the step's last micro-batch); before it they accumulate locally."""
    if sync or not run.world.distributed:
        yield
    elif run.sharded:
        run.model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            run.model.set_requires_gradient_sync(True)
    else:
        with run.wrapped.no_sync():
            yield


def micro_batches(run: Run, failures: ReadFailures
                  ) -> Iterator[tuple[BatchPlan, Batch, float]]:
    """The step's ``accumulation`` micro-batches of this process with their loss weights.

    A micro-batch whose every sample was unreadable is replaced by the previous one with
    weight 0, so that every process still runs the same forwards and backwards (DDP).
    """
    previous: Batch | None = None
    for _ in range(run.config.batch.accumulation):
        plan = run.sampler.next_batch()
        batch = run.batches.get(plan, failures)
        if batch is not None:
            previous = batch
            yield plan, batch, 1.0
        elif previous is not None:
            yield plan, previous, 0.0
        else:
            raise RuntimeError(f"every sample of micro-batch {plan.index} is unreadable "
                               f"(see the log)")


def train_step(run: Run, failures: ReadFailures) -> StepResult:
    """One optimizer step (module docstring); raises NonFiniteLossError before applying a
    bad one."""
    config, world = run.config, run.world
    # with a time budget the schedule moves on with the clock when that runs out first
    lr = run.lr_schedule.at(max(run.step, int(run.budget_share * config.run.max_steps)))
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    accumulation = config.batch.accumulation
    summed: dict[str, torch.Tensor] = {}
    samples = 0
    task, shares = "", {}
    for micro, (plan, batch, weight) in enumerate(micro_batches(run, failures)):
        if run.is_default_model:
            with _gradient_sync(run, micro == accumulation - 1):
                generators = [sample_generator(config.run.seed, plan.index, place, run.device)
                              for place in batch.places]
                result = default_family.default_loss(
                    run.wrapped, batch, run.loss,
                    mean_mask_count(world, len(batch) if weight else 0),
                    config.default_model.iou_weight, run.device, generators)
                (result.total * (weight / accumulation)).backward()
            for name, value in result.terms.items():
                summed[name] = summed.get(name, 0) + value * weight / accumulation
            samples += len(batch) if weight else 0
            task, shares = plan.task, plan.shares
            continue
        with _gradient_sync(run, micro == accumulation - 1):
            with _autocast(run):
                outputs = run.wrapped(batch.images.to(run.device), batch.prompts,
                                      compute_lm_logits=True)
            generators = [sample_generator(config.run.seed, plan.index, place, run.device)
                          for place in batch.places]
            num_masks = mean_mask_count(world, len(batch) if weight else 0)
            num_tokens = mean_count_per_process(
                world, labelled_tokens(outputs.lm_labels) if weight else 0)
            result = run.loss(outputs.mask_logits, batch.targets.to(run.device), num_masks,
                              lm_logits=outputs.lm_logits, lm_labels=outputs.lm_labels,
                              num_tokens=num_tokens, generator=generators)
            (result.total * (weight / accumulation)).backward()
        for name, value in result.terms.items():
            summed[name] = summed.get(name, 0) + value * weight / accumulation
        samples += len(batch) if weight else 0
        task, shares = plan.task, plan.shares
    if config.optim.grad_clip > 0:
        grad_norm = nn.utils.clip_grad_norm_(run.model.parameters(), config.optim.grad_clip)
    else:
        grad_norm = nn.utils.get_total_norm(
            [p.grad for p in run.model.parameters() if p.grad is not None])
    if isinstance(grad_norm, DTensor):      # sharded: the norm over every shard
        grad_norm = grad_norm.full_tensor()
    values = {name: sum_over_ranks(world, float(v)) / world.size for name, v in summed.items()}
    norm = float(grad_norm)
    if not all_true(world, all(math.isfinite(v) for v in values.values())
                    and math.isfinite(norm)):
        run.optimizer.zero_grad(set_to_none=True)
        raise NonFiniteLossError(
            f"step {run.step}: the loss or the gradient norm is not finite (loss "
            f"{values.get('loss')}, gradient norm {norm}, task {task}) on at least one "
            f"process; the run stops without applying this step. The last good checkpoint "
            f"is {checkpointing.latest_checkpoint(run.output_dir / CHECKPOINTS)}")
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.step += 1
    return StepResult(loss=values["loss"], terms=values, grad_norm=norm,
                      samples=int(sum_over_ranks(world, samples)), task=task, shares=shares)


# ------------------------------------------------------------------ the loop

@contextmanager
def _progress(run: Run) -> Iterator[Any]:
    """A tqdm bar on an interactive rank 0, else None (progress lines go to the log)."""
    if not (run.world.is_main and sys.stderr.isatty()):
        yield None
        return
    from tqdm import tqdm

    bar = tqdm(total=run.config.run.max_steps, initial=run.step, unit="step",
               dynamic_ncols=True)
    try:
        yield bar
    finally:
        bar.close()


def export(run: Run) -> Path:
    """The model in the released layout under ``<output_dir>/model`` (rank 0 writes)."""
    from unigeoseg_backend.model.checkpoint import save_released

    path = run.output_dir / EXPORT
    if run.is_default_model:
        if run.world.is_main:
            card = default_family.export_default(run.model, run.config, run.mixture,
                                                 run.classes, run.step, path, run.base_card)
            logger.info("default model %s written to %s", card.model_id, path)
        barrier(run.world)
        return path
    model = run.plain_model()               # every process: gathering the shards is collective
    if run.world.is_main:
        save_released(model, run.tokenizer, path)
        logger.info("model written to %s", path)
    barrier(run.world)
    return path


def train(config: TrainConfig) -> Path:
    """Run (or continue) the training of ``config``; returns the exported model folder."""
    run = prepare(config)
    try:
        return run_loop(run)
    finally:
        run.batches.close()
        close_world(run.world)


def run_loop(run: Run) -> Path:
    """Steps until ``run.max_steps`` (logging, checkpoints, validation), then the export."""
    config, world = run.config, run.world
    failures = ReadFailures()
    throughput = Throughput()
    with MetricsLog(run.output_dir, enabled=world.is_main,
                    tensorboard=config.metrics.tensorboard) as metrics, \
            _progress(run) as bar:
        if run.is_default_model and config.validation.at_start and run.step == 0:
            validate_default_model(run, metrics, "before")
        loop_started = time.monotonic()
        while run.step < config.run.max_steps:
            started = time.perf_counter()
            if config.run.max_seconds:
                run.budget_share = agreed_elapsed(world, time.monotonic() - loop_started) \
                    / config.run.max_seconds
            result = train_step(run, failures)
            throughput.update(result.samples)
            steps_left = config.run.max_steps - run.step
            record = {**result.terms, "lr": run.optimizer.param_groups[0]["lr"],
                      "grad_norm": result.grad_norm, "task": result.task,
                      **{f"share/{t}": s for t, s in result.shares.items()},
                      "samples": result.samples, "samples_per_s": throughput.samples_per_s,
                      "step_s": time.perf_counter() - started,
                      "skipped_samples": failures.total}
            metrics.write(run.step, record)
            if world.is_main and (run.step % config.run.log_every == 0
                                  or run.step == config.run.max_steps):
                line = progress_line(run.step, config.run.max_steps, result.loss,
                                     record["lr"], result.shares, throughput.samples_per_s,
                                     throughput.eta_s(steps_left))
                if bar is not None:
                    bar.update(run.step - bar.n)
                    bar.set_postfix_str(line, refresh=False)
                else:
                    logger.info("%s", line)
            if config.run.max_seconds and agreed_elapsed(
                    world, time.monotonic() - loop_started) >= config.run.max_seconds:
                logger.info("time budget of %g s reached at step %d", config.run.max_seconds,
                            run.step)
                config = replace(config, run=replace(config.run, max_steps=run.step))
                run.config = config
            if run.step % config.run.checkpoint_every == 0 or run.step == config.run.max_steps:
                save(run)
                throughput.restart()
            if run.is_default_model:
                if run.step == config.run.max_steps and (config.validation.at_start
                                                         or config.validation.every):
                    validate_default_model(run, metrics, "after")
                elif run.validator.due(run.step, config.run.max_steps):
                    validate_default_model(run, metrics, None)
            elif run.validator.due(run.step, config.run.max_steps):
                scores = run.validator.run(run.plain_model(), run.tokenizer, run.step)
                metrics.write(run.step, scores)
                set_train_mode(run.model)
                throughput.restart()
    run.batches.close()
    return export(run)


def agreed_elapsed(world: World, seconds: float) -> float:
    """The longest of every process's elapsed ``seconds`` (so all stop at the same step)."""
    if not world.distributed:
        return seconds
    value = torch.tensor([seconds], dtype=torch.float64, device=world.device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return float(value.item())


def validate_default_model(run: Run, metrics: MetricsLog, moment: str | None) -> None:
    """The default model's mean IoU on the validation datasets (rank 0 scores; the others
    wait), logged as ``val/iou``; ``moment`` "before" / "after" also records it in
    ``<output_dir>/validation/summary.json`` (a fine-tune's before / after score)."""
    if run.world.is_main:
        v = run.config.validation
        scores = default_family.validate_default(run.model, run.validator.listings,
                                                 run.phrases, v.batch_size, run.device,
                                                 v.limit)
        metrics.write(run.step, {"val/iou": scores["iou"], "val/count": scores["count"]})
        logger.info("validation at step %d: IoU %s over %d samples", run.step, scores["iou"],
                    scores["count"])
        if moment is not None:
            path = run.output_dir / "validation" / "summary.json"
            summary = json.loads(path.read_text()) if path.is_file() else {}
            summary[moment] = {**scores, "step": run.step}
            path.parent.mkdir(parents=True, exist_ok=True)
            staged = path.with_suffix(".json.part")
            staged.write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
            os.replace(staged, path)
    barrier(run.world)


def main(argv: list[str] | None = None) -> int:
    """``python -m unigeoseg_trainer CONFIG.toml`` (and ``unigeoseg train CONFIG.toml``)."""
    import argparse

    parser = argparse.ArgumentParser(prog="unigeoseg train",
                                     description="train or fine-tune UniGeoSeg")
    parser.add_argument("config", type=Path, help="the training TOML file")
    args = parser.parse_args(argv)
    return run_from_file(args.config)


def run_from_file(path: Path) -> int:
    """Train from a TOML file; exit code 0, or 1 with the reason on stderr."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        config = load_config(path)
        exported = train(config)
    except ConfigError as exc:
        print(f"unigeoseg train: configuration error: {exc}", file=sys.stderr)
        return 1
    except (NonFiniteLossError, WeightsError, checkpointing.CheckpointError) as exc:
        print(f"unigeoseg train: stopped: {exc}", file=sys.stderr)
        return 1
    print(f"trained model in {exported}")
    return 0
