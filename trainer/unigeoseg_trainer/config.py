"""The training configuration: one TOML file read into frozen dataclasses.

Every error names the key it is about (``optim.lr``, ``datasets[1].root``) and is raised
before any work starts: an unknown key, a value of the wrong type or out of range, a dataset
that does not exist, a batch that does not divide over the processes.

The defaults are the recipe as far as it is known (docs/training.md says where each value
comes from): AdamW at 1e-4 with cosine decay after a 3 % warm-up, no weight decay, a global
batch of 16, point-sampled BCE + Dice (12,544 points, oversampling 3, importance 0.75,
weights 5 / 5), and the progressive task schedule of :mod:`.schedule`.

Example::

    [run]
    output_dir = "runs/geoseg1m"
    max_steps = 215000

    [model]
    init = "models/unigeoseg"

    [batch]
    per_device = 2
    accumulation = 1
    global_batch = 16          # checked: per_device * accumulation * processes

    [[datasets]]
    name = "geoseg-bench"
    root = "/data/GeoSeg-1M"
    split = "train"
"""

from __future__ import annotations

import math
import types
import typing
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:   # Python 3.10: the same parser, as a package
    import tomli as tomllib

from unigeoseg_backend.datasets import DATASETS, MASK_RULES, parse_task
from unigeoseg_backend.model.registry import MODEL_CONFIGS
from unigeoseg_protocol.vocabulary import TASKS


class ConfigError(ValueError):
    """A configuration value is wrong; ``key`` is its dotted name (``optim.lr``)."""

    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}")
        self.key = key


@dataclass(frozen=True)
class RunConfig:
    output_dir: str = "runs/unigeoseg"
    seed: int = 1337
    max_steps: int = 1000           #: optimizer steps of the whole run
    #: a time budget as well (0: none): the run ends after the step that passes it, and the
    #: learning rate follows whichever budget is further along (so a time-bound run still
    #: decays; it then depends on the machine's speed, and a resume gets a fresh budget)
    max_seconds: float = 0.0
    log_every: int = 1              #: steps between progress lines (metrics go out every step)
    checkpoint_every: int = 1000    #: steps between checkpoints (and one at the end)
    keep_checkpoints: int = 3       #: newest checkpoints kept; older ones are deleted
    resume: bool = True             #: continue from output_dir's latest checkpoint if any
    device: str = "auto"            #: "auto" (CUDA if available), "cpu", "cuda"


#: What ``model.freeze`` may name: the groups of ``UniGeoSeg.trainable_parameter_groups``
#: (``swin`` is the vision tower's usual name).
FREEZABLE = ("swin", "vision_tower", "connector", "language", "pixel_decoder", "mask_decoder",
             "heads")


#: ``[model]`` keys naming pretrained parts (``models.build_model``).
COMPONENTS = ("swin", "mask2former", "language")
#: What ``model.family`` can train: UniGeoSeg, or the embedded default model
#: (``unigeoseg_backend.default_model``; see :mod:`.default_family`).
FAMILIES = ("unigeoseg", "default")
#: ``model.freeze`` names of the default model.
DEFAULT_FREEZABLE = ("image_encoder", "prompt_encoder", "mask_decoder")


@dataclass(frozen=True)
class ModelConfig:
    family: str = "unigeoseg"       #: "unigeoseg", or "default" (the embedded default model)
    init: str = ""                  #: released-layout model directory to start from
    architecture: str = ""          #: or a registry configuration, randomly initialised
    tokenizer: str = ""             #: its tokenizer folder (tiny architectures have their own)
    #: Pretrained parts loaded into ``architecture`` (the rest stays random):
    swin: str = ""                  #: a Mask2Former checkpoint file: Swin from backbone.*
    mask2former: str = ""           #: a Mask2Former checkpoint file: pixel and mask decoders
    language: str = ""              #: a transformers Phi folder (weights, config, tokenizer)
    freeze: tuple[str, ...] = ("swin",)      #: components kept fixed (Swin-B: frozen)
    gradient_checkpointing: bool = True
    precision: str = "bf16"         #: "bf16" autocast on CUDA, "fp32"; the CPU always runs fp32


@dataclass(frozen=True)
class DefaultModelConfig:
    """``[default_model]``: what a ``model.family = "default"`` run writes into the model card,
    and the regions it states it never trains on (the trainer refuses a chip from them)."""

    name: str = "default-v1"        #: the card's name (hello, provenance)
    version: str = "1.0.0"
    gsd_m: tuple[float, float] = (0.05, 35.0)   #: pixel sizes input is resampled into (m)
    iou_weight: float = 1.0         #: weight of the predicted-IoU regression term
    limits: tuple[str, ...] = ()    #: what the model cannot do, for the analyst
    #: Every scene's evaluation window, ``[col_off, row_off, width, height]`` on its grid, as
    #: ``unigeoseg_backend.default_model.regions`` defines them; checked against that table
    #: and against every training chip before the first step.
    never_train_on: dict[str, tuple[int, int, int, int]] = field(default_factory=dict)


@dataclass(frozen=True)
class BatchConfig:
    per_device: int = 2             #: samples per process per forward
    accumulation: int = 1           #: forwards per optimizer step
    global_batch: int | None = 16   #: if set: must equal per_device * accumulation * processes
    num_workers: int = 4            #: data-loading threads per process


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-4
    min_lr: float = 0.0             #: where the cosine ends
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_ratio: float = 0.03      #: share of max_steps spent warming up linearly
    grad_clip: float = 1.0          #: max global gradient norm; 0 turns clipping off


@dataclass(frozen=True)
class LossConfig:
    num_points: int = 12544         #: points sampled per mask and decoder output
    oversample_ratio: float = 3.0   #: candidates drawn per point before picking by uncertainty
    importance_sample_ratio: float = 0.75   #: share of points taken where |logit| is smallest
    bce_weight: float = 5.0
    dice_weight: float = 5.0
    lm_weight: float = 1.0          #: next-token cross-entropy on answer text


@dataclass(frozen=True)
class TaskScheduleConfig:
    """Progressive task scheduling; :mod:`.schedule` says how the shares move."""

    #: task shares at step 0 (they sum to 1): GeoSeg-1M's triplets per task
    #: (481K interactive, 336K referring, 105K reasoning).
    start: dict[str, float] = field(default_factory=lambda: {
        "interactive": 0.522, "referring": 0.364, "reasoning": 0.114})
    #: the interactive share at the end of the run, as a factor of its start share
    interactive_end_factor: float = 0.7


@dataclass(frozen=True)
class AugmentConfig:
    hflip: float = 0.0              #: probability of a left-right flip (words swapped)
    vflip: float = 0.0              #: probability of a top-bottom flip (words swapped)
    #: probability of a random contrast, brightness, per-band gain and gamma on a chip (the
    #: default model: the service's per-tile stretch varies with what a tile holds)
    photometric: float = 0.0


@dataclass(frozen=True)
class DatasetConfig:
    name: str = ""                  #: a reader of unigeoseg_backend.datasets
    root: str = ""
    split: str = "train"
    task: str | None = None         #: only this task's samples (None: all the dataset has)
    weight: float = 1.0             #: how many times each sample counts within its task
    mask_rule: str = "official"


@dataclass(frozen=True)
class DistributedConfig:
    backend: str = "auto"           #: "auto" (NCCL on CUDA, Gloo on CPU), "nccl" or "gloo"
    fsdp: bool = False              #: shard parameters and optimizer state (FSDP2)


#: The Phi decoder-layer projections LoRA may adapt (attention, then MLP).
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2")


@dataclass(frozen=True)
class LoraSettings:
    """LoRA adapters on the language model instead of training it fully (:mod:`.lora`);
    the defaults are the LISA family's recipe."""

    enabled: bool = False
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "dense")


@dataclass(frozen=True)
class MetricsConfig:
    tensorboard: bool = True        #: also write TensorBoard events if it is installed


@dataclass(frozen=True)
class ValidationConfig:
    """Periodic validation with the evaluator of ``unigeoseg eval`` (gIoU / cIoU per task)."""

    every: int = 0                  #: steps between validations; 0: never (and none at the end)
    #: also before the first step and after the last (a fine-tune's before / after score)
    at_start: bool = False
    limit: int = 0                  #: the first N samples of each dataset; 0: all
    batch_size: int = 8
    datasets: tuple[DatasetConfig, ...] = ()   #: ``[[validation.datasets]]`` tables


@dataclass(frozen=True)
class TrainConfig:
    run: RunConfig
    model: ModelConfig
    batch: BatchConfig
    optim: OptimConfig
    loss: LossConfig
    tasks: TaskScheduleConfig
    augment: AugmentConfig
    datasets: tuple[DatasetConfig, ...]
    distributed: DistributedConfig
    metrics: MetricsConfig
    validation: ValidationConfig = ValidationConfig()
    lora: LoraSettings = LoraSettings()
    default_model: DefaultModelConfig = DefaultModelConfig()

    def check_world(self, world_size: int) -> None:
        """Raise ConfigError if the batch cannot be split over ``world_size`` processes."""
        b = self.batch
        per_step = b.per_device * b.accumulation * world_size
        if b.global_batch is not None and b.global_batch != per_step:
            raise ConfigError("batch.global_batch", (
                f"{b.global_batch} is not per_device {b.per_device} x accumulation "
                f"{b.accumulation} x {world_size} processes = {per_step}"))


_SECTIONS: dict[str, type] = {
    "run": RunConfig, "model": ModelConfig, "batch": BatchConfig, "optim": OptimConfig,
    "loss": LossConfig, "tasks": TaskScheduleConfig, "augment": AugmentConfig,
    "distributed": DistributedConfig, "metrics": MetricsConfig, "lora": LoraSettings,
    "default_model": DefaultModelConfig,
}


def load_config(path: str | Path, *, check_paths: bool = True) -> TrainConfig:
    """Read and check a training TOML file.

    Args:
        path: the TOML file; relative paths in it (dataset roots, ``model.init``,
            ``run.output_dir``) are taken relative to its folder.
        check_paths: also require every dataset root and the model directory to exist.

    Raises:
        ConfigError: naming the offending key (``file`` for an unreadable file).
    """
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError("file", f"cannot read {path}: {exc}") from exc
    return parse_config(raw, base_dir=path.parent, check_paths=check_paths)


def parse_config(raw: dict[str, Any], *, base_dir: str | Path = ".",
                 check_paths: bool = True) -> TrainConfig:
    """The checked configuration of an already parsed TOML document (see load_config)."""
    tables = [*_SECTIONS, "datasets", "validation"]
    unknown = sorted(set(raw) - set(tables))
    if unknown:
        raise ConfigError(unknown[0], f"unknown section; known: {', '.join(sorted(tables))}")
    sections = {name: _build(cls, raw.get(name, {}), name) for name, cls in _SECTIONS.items()}
    base = Path(base_dir)
    entries = raw.get("datasets", [])
    if not isinstance(entries, list) or not entries:
        raise ConfigError("datasets", "give at least one [[datasets]] table")
    datasets = _datasets(entries, "datasets", base)
    validation_table = dict(raw.get("validation", {}))
    validation_entries = validation_table.pop("datasets", [])
    if not isinstance(validation_entries, list):
        raise ConfigError("validation.datasets", "expected [[validation.datasets]] tables")
    validation = replace(_build(ValidationConfig, validation_table, "validation"),
                         datasets=_datasets(validation_entries, "validation.datasets", base))
    model = sections["model"]
    model = replace(model, **{key: _relative_to(getattr(model, key), base)
                              for key in ("init", "tokenizer", *COMPONENTS)
                              if getattr(model, key)})
    run = replace(sections["run"], output_dir=_relative_to(sections["run"].output_dir, base))
    config = TrainConfig(datasets=datasets, validation=validation,
                         **{**sections, "model": model, "run": run})
    _check(config, check_paths)
    return config


def _datasets(entries: list[Any], where: str, base: Path) -> tuple[DatasetConfig, ...]:
    """``[[datasets]]`` tables as DatasetConfig, roots relative to ``base``."""
    datasets = tuple(_build(DatasetConfig, entry, f"{where}[{i}]")
                     for i, entry in enumerate(entries))
    return tuple(replace(d, root=_relative_to(d.root, base)) if d.root else d
                 for d in datasets)


def _relative_to(path: str, base: Path) -> str:
    """``path`` with ``~`` expanded; a relative one taken relative to ``base``."""
    expanded = Path(path).expanduser()
    return str(expanded if expanded.is_absolute() else base / expanded)


def _build(cls: type, table: Any, where: str) -> Any:
    """``cls`` from a TOML table: every key known, every value of its field's type."""
    if not isinstance(table, dict):
        raise ConfigError(where, f"expected a table, got {type(table).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in fields(cls)]
    for key in table:
        if key not in names:
            raise ConfigError(f"{where}.{key}", f"unknown key; known: {', '.join(names)}")
    values = {key: _convert(value, hints[key], f"{where}.{key}") for key, value in table.items()}
    return cls(**values)


def _convert(value: Any, hint: Any, key: str) -> Any:
    """``value`` as type ``hint`` (bool, int, float, str, X | None, tuple, dict[str, float])."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (types.UnionType, typing.Union):   # X | None: TOML has no null, so X
        return _convert(value, next(a for a in args if a is not type(None)), key)
    if origin is tuple:
        if not isinstance(value, list):
            raise ConfigError(key, f"expected an array, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(v, args[0], key) for v in value)
        if len(value) != len(args):
            raise ConfigError(key, f"expected {len(args)} values, got {value!r}")
        return tuple(_convert(v, a, key) for v, a in zip(value, args, strict=True))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(key, f"expected a table, got {value!r}")
        return {str(k): _convert(v, args[1], f"{key}.{k}") for k, v in value.items()}
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(key, f"expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, f"expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(key, f"expected a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(key, f"expected a finite number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(key, f"expected a string, got {value!r}")
        return value
    raise TypeError(f"no conversion for {hint!r} ({key})")  # a field type added without one


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(key, message)


def _check(c: TrainConfig, check_paths: bool) -> None:
    """Ranges and cross-field rules; paths too when ``check_paths``."""
    _require(c.run.max_steps >= 1, "run.max_steps", "must be at least 1")
    _require(c.run.max_seconds >= 0, "run.max_seconds", "must not be negative")
    _require(c.run.log_every >= 1, "run.log_every", "must be at least 1")
    _require(c.run.checkpoint_every >= 1, "run.checkpoint_every", "must be at least 1")
    _require(c.run.keep_checkpoints >= 1, "run.keep_checkpoints", "must be at least 1")
    _require(c.run.device in ("auto", "cpu", "cuda"), "run.device", "use auto, cpu or cuda")
    _check_model(c.model, check_paths)
    _require(c.batch.per_device >= 1, "batch.per_device", "must be at least 1")
    _require(c.batch.accumulation >= 1, "batch.accumulation", "must be at least 1")
    _require(c.batch.num_workers >= 0, "batch.num_workers", "must not be negative")
    if c.batch.global_batch is not None:
        per_process = c.batch.per_device * c.batch.accumulation
        _require(c.batch.global_batch % per_process == 0, "batch.global_batch",
                 f"{c.batch.global_batch} is not a multiple of per_device x accumulation "
                 f"= {per_process}")
    o = c.optim
    _require(o.lr > 0, "optim.lr", "must be positive")
    _require(0 <= o.min_lr <= o.lr, "optim.min_lr", "must lie in [0, optim.lr]")
    _require(o.weight_decay >= 0, "optim.weight_decay", "must not be negative")
    _require(all(0 <= b < 1 for b in o.betas), "optim.betas", "each must lie in [0, 1)")
    _require(o.eps > 0, "optim.eps", "must be positive")
    _require(0 <= o.warmup_ratio < 1, "optim.warmup_ratio", "must lie in [0, 1)")
    _require(o.grad_clip >= 0, "optim.grad_clip", "must not be negative")
    loss = c.loss
    _require(loss.num_points >= 1, "loss.num_points", "must be at least 1")
    _require(loss.oversample_ratio >= 1, "loss.oversample_ratio", "must be at least 1")
    _require(0 <= loss.importance_sample_ratio <= 1, "loss.importance_sample_ratio",
             "must lie in [0, 1]")
    for name in ("bce_weight", "dice_weight", "lm_weight"):
        _require(getattr(loss, name) >= 0, f"loss.{name}", "must not be negative")
    _check_tasks(c.tasks)
    for name in ("hflip", "vflip", "photometric"):
        _require(0 <= getattr(c.augment, name) <= 1, f"augment.{name}", "must lie in [0, 1]")
    _require(c.augment.photometric == 0 or c.model.family == "default", "augment.photometric",
             "only the default model family has it")
    _require(c.distributed.backend in ("auto", "nccl", "gloo"), "distributed.backend",
             "use auto, nccl or gloo")
    _check_lora(c.lora, c.model)
    if c.model.family == "default":
        _check_default_section(c.default_model)
        _require(not c.lora.enabled, "lora.enabled", "the default model trains without LoRA")
        _require(not c.distributed.fsdp, "distributed.fsdp",
                 "the default model is small: use DDP (fsdp = false)")
    for i, d in enumerate(c.datasets):
        _check_dataset(d, f"datasets[{i}]", check_paths)
    v = c.validation
    _require(v.every >= 0, "validation.every", "must not be negative")
    _require(v.limit >= 0, "validation.limit", "must not be negative")
    _require(v.batch_size >= 1, "validation.batch_size", "must be at least 1")
    _require((v.every == 0 and not v.at_start) or bool(v.datasets), "validation.datasets",
             "validation is asked for: give at least one [[validation.datasets]] table")
    for i, d in enumerate(v.datasets):
        _check_dataset(d, f"validation.datasets[{i}]", check_paths)


def _check_model(m: ModelConfig, check_paths: bool) -> None:
    _require(m.precision in ("bf16", "fp32"), "model.precision", "use bf16 or fp32")
    _require(m.family in FAMILIES, "model.family", f"use {' or '.join(FAMILIES)}")
    if m.family == "default":
        _check_default_model(m, check_paths)
        return
    _require(not (m.init and m.architecture), "model.architecture",
             "give model.init (a released-layout folder) or model.architecture, not both")
    if m.architecture:
        _require(m.architecture in MODEL_CONFIGS, "model.architecture",
                 f"unknown {m.architecture!r}; use one of {', '.join(MODEL_CONFIGS)}")
        _require("tiny" in m.architecture or bool(m.tokenizer or m.language),
                 "model.tokenizer", f"{m.architecture} needs a tokenizer folder (or "
                                    f"model.language)")
    for key in COMPONENTS:
        _require(not getattr(m, key) or bool(m.architecture), f"model.{key}",
                 "pretrained parts go into a random model.architecture (not model.init)")
    for name in m.freeze:
        _require(name in FREEZABLE, "model.freeze",
                 f"unknown component {name!r}; use {', '.join(FREEZABLE)}")
    if check_paths:
        for key in ("init", "tokenizer", "language"):
            path = getattr(m, key)
            _require(not path or Path(path).is_dir(), f"model.{key}",
                     f"{path} is not a directory")
        for key in ("swin", "mask2former"):
            path = getattr(m, key)
            _require(not path or Path(path).is_file(), f"model.{key}", f"{path} is not a file")


def _check_default_model(m: ModelConfig, check_paths: bool) -> None:
    from unigeoseg_backend.default_model.network import DEFAULT_MODEL_CONFIGS

    _require(bool(m.init) != bool(m.architecture), "model.architecture",
             "give model.init (a default-model weights folder: a fine-tune) or "
             "model.architecture (random weights), one of them")
    _require(not m.architecture or m.architecture in DEFAULT_MODEL_CONFIGS,
             "model.architecture",
             f"the default model's configuration: one of {', '.join(DEFAULT_MODEL_CONFIGS)}")
    for key in ("tokenizer", *COMPONENTS):
        _require(not getattr(m, key), f"model.{key}", "not used by the default model")
    if check_paths and m.init:
        _require(Path(m.init).is_dir(), "model.init", f"{m.init} is not a directory")
    for name in m.freeze:
        _require(name in DEFAULT_FREEZABLE, "model.freeze",
                 f"unknown default-model component {name!r}; use {', '.join(DEFAULT_FREEZABLE)}"
                 f" (or freeze = [])")


def _check_default_section(d: DefaultModelConfig) -> None:
    lo, hi = d.gsd_m
    _require(0 < lo <= hi, "default_model.gsd_m", "give [smallest, largest] metres, both > 0")
    _require(d.iou_weight >= 0, "default_model.iou_weight", "must not be negative")
    _require(bool(d.name.strip()) and bool(d.version.strip()), "default_model.name",
             "give a name and a version")


def _check_lora(lora: LoraSettings, m: ModelConfig) -> None:
    _require(lora.rank >= 1, "lora.rank", "must be at least 1")
    _require(lora.alpha > 0, "lora.alpha", "must be positive")
    _require(0 <= lora.dropout < 1, "lora.dropout", "must lie in [0, 1)")
    _require(bool(lora.target_modules), "lora.target_modules", "name at least one projection")
    for name in lora.target_modules:
        _require(name in LORA_TARGETS, "lora.target_modules",
                 f"unknown projection {name!r}; use {', '.join(LORA_TARGETS)}")
    _require(not (lora.enabled and "language" in m.freeze), "lora.enabled",
             "model.freeze freezes the language model: LoRA would train nothing there")


def _check_tasks(t: TaskScheduleConfig) -> None:
    for task in t.start:
        _require(task in TASKS, f"tasks.start.{task}", f"unknown task; use {', '.join(TASKS)}")
        _require(t.start[task] >= 0, f"tasks.start.{task}", "must not be negative")
    total = sum(t.start.values())
    _require(abs(total - 1.0) < 1e-6, "tasks.start", f"shares sum to {total:g}, not 1")
    _require(0 <= t.interactive_end_factor <= 1, "tasks.interactive_end_factor",
             "must lie in [0, 1]")


def _check_dataset(d: DatasetConfig, where: str, check_paths: bool) -> None:
    _require(d.name.strip().lower() in DATASETS, f"{where}.name",
             f"unknown dataset {d.name!r}; use one of {', '.join(DATASETS)}")
    _require(bool(d.root), f"{where}.root", "missing")
    _require(bool(d.split), f"{where}.split", "missing")
    _require(d.weight > 0, f"{where}.weight", "must be positive")
    _require(d.mask_rule in MASK_RULES, f"{where}.mask_rule",
             f"use one of {', '.join(MASK_RULES)}")
    if d.task is not None:
        try:
            parse_task(d.task)
        except ValueError as exc:
            raise ConfigError(f"{where}.task", str(exc)) from exc
    if check_paths:
        _require(Path(d.root).is_dir(), f"{where}.root", f"{d.root} is not a directory")
