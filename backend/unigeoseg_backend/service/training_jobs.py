"""The service's fine-tuning jobs: chip sets uploaded in pieces, one trainer process at a time,
and the models they make, offered as engines ``default:<name>``.

Folders, all under the weights cache (``weights.cache_dir()``)::

    <cache>/tmp/training/<pid>-<token>/          this service's work area
        uploads/<upload>/                         a chip set being uploaded (train_upload)
        jobs/<job>/chips/, config.toml, trainer.log, run/
                                                  a job: its chips, trainer config, log, output
    <cache>/finetuned/<name>/                     a finished model: weights and model card
    <cache>/finetuned/.staging-<pid>-<name>/      a model being copied in (renamed when whole)

A finished model only ever appears by renaming a complete staging folder, so a service killed
mid-job leaves no half-written model: its work area and staging folder are removed by the next
service that starts (the owner's process id no longer runs).

Threads: the service's front thread calls :meth:`TrainingJobs.upload`, ``start_job``,
``status`` and ``cancel`` (file writes of a few MB at most, look-ups); one supervisor thread
runs the queued jobs one after the other, each in its own process
(``service.trainer_launch`` -> ``python -m unigeoseg_trainer CONFIG.toml``), follows its
``metrics.jsonl`` for the live curve, and on success copies the model in and offers it. The
worker thread that answers clicks is never involved, so clicks are served throughout.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import queue
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from unigeoseg_protocol.errors import ErrorCode, ProtocolError
from unigeoseg_protocol.operations import (
    FINAL_TRAINING_STATES,
    MAX_EVENTS_PER_REPLY,
    MAX_TRAIN_STEPS,
    TrainCancelRequest,
    TrainEvent,
    TrainJobReply,
    TrainStartRequest,
    TrainStatusRequest,
    TrainUploadReply,
    TrainUploadRequest,
    check_upload_path,
)
from unigeoseg_protocol.vocabulary import (
    FINE_TUNABLE_ENGINES,
    engine_family,
    fine_tuned_engine,
    is_model_name,
)

from ..default_model.weights_io import MODEL_CARD_FILE, ModelCard, read_model_card
from ..engines.default_engine import DefaultEngine
from ..errors import EngineUnavailableError, InvalidInputError, UniGeoSegError
from ..segmenter import EngineOffer, EngineRegistry
from ..weights import FINETUNED_FOLDER, cache_dir

logger = logging.getLogger(__name__)

#: Bounds on what clients may leave on the backend's disk.
MAX_UPLOAD_BYTES = 2 << 30        # one chip set, all files together
MAX_UPLOAD_FILES = 100_000
MAX_OPEN_UPLOADS = 8
MAX_QUEUED_JOBS = 4
MAX_RECORDS = 200_000             # records per split of a chip set

#: How long a cancelled trainer gets to exit after SIGTERM before it is killed.
TERMINATE_GRACE_S = 3.0
_POLL_S = 0.25                    # how often the supervisor reads a running job's metrics
_LOG_TAIL_LINES = 12              # log lines a failed job's message quotes


class UnknownJobError(UniGeoSegError, KeyError):
    code = ErrorCode.UNKNOWN_JOB

    def __str__(self) -> str:  # KeyError would quote the message
        return self.message


class UploadTooLargeError(UniGeoSegError, ValueError):
    code = ErrorCode.PAYLOAD_TOO_LARGE


class TooManyJobsError(UniGeoSegError):
    code = ErrorCode.QUEUE_FULL


@dataclass(frozen=True)
class FineTuneRecipe:
    """The trainer settings of a fine-tune that the request does not choose (the default
    model's fine-tune on a few hundred chips, on a CPU)."""

    lr: float = 5e-4
    warmup_ratio: float = 0.05
    batch_size: int = 8            # samples per step (fewer when the chip set is smaller)
    num_points: int = 1024         # points sampled per mask for the loss
    flip: float = 0.5              # probability of each of the left-right / top-bottom flips
    seed: int = 0
    device: str = "cpu"

    def batch_for(self, chips: ChipSet) -> int:
        """Samples per step on ``chips``: ``batch_size``, or all the training records."""
        return max(1, min(self.batch_size, chips.train_records))


# --------------------------------------------------------------------------- chip sets


@dataclass(frozen=True)
class ChipSet:
    """A chip set in the ``local`` layout, checked: ``train.jsonl`` and ``val.jsonl`` whose
    records' images and masks exist under ``root``.

    Attributes:
        chips: distinct images over both splits.
        objects: records whose target is one digitised object (``target: component``).
        instructions: the distinct instructions of the text (referring) records.
        classes: the distinct prompt classes.
    """

    root: Path
    chips: int
    objects: int
    train_records: int
    val_records: int
    instructions: tuple[str, ...]
    classes: tuple[str, ...]

    def summary(self) -> dict[str, Any]:
        return {"chips": self.chips, "objects": self.objects,
                "train_records": self.train_records, "val_records": self.val_records,
                "instructions": list(self.instructions), "classes": list(self.classes)}


def _records(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if number > MAX_RECORDS:
                raise InvalidInputError(f"{path.name} has more than {MAX_RECORDS} records")
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InvalidInputError(f"{path.name} line {number} is not JSON: {exc}") from None
            if not isinstance(record, dict):
                raise InvalidInputError(f"{path.name} line {number} is not a JSON object")
            yield number, record


def read_chip_set(root: Path) -> ChipSet:
    """Check the chip set in ``root`` and count what is in it.

    Raises:
        InvalidInputError: a split file missing or empty, a record that is not JSON or lacks
            its image or mask, a file path that leaves ``root`` or does not exist.
    """
    root = Path(root)
    images: set[str] = set()
    counts = {}
    objects = 0
    instructions: set[str] = set()
    classes: set[str] = set()
    resolved_root = root.resolve()
    for split in ("train", "val"):
        path = root / f"{split}.jsonl"
        if not path.is_file():
            raise InvalidInputError(f"the chip set has no {split}.jsonl (the {split} split "
                                    f"is needed: training chips and held-out chips)")
        count = 0
        for number, record in _records(path):
            for key in ("image", "mask"):
                name = record.get(key)
                try:
                    relative = check_upload_path(name)
                except ProtocolError as exc:
                    raise InvalidInputError(f"{path.name} line {number}: {key}: "
                                            f"{exc.message}") from None
                file = (root / relative).resolve()
                if not file.is_relative_to(resolved_root) or not file.is_file():
                    raise InvalidInputError(f"{path.name} line {number}: {key} {relative} "
                                            f"is not a file of the chip set")
            images.add(record["image"])
            objects += record.get("target") == "component"
            prompt = record.get("prompt")
            if isinstance(prompt, dict) and isinstance(prompt.get("class"), str):
                classes.add(prompt["class"])
            if record.get("task") == "referring" and isinstance(record.get("instruction"), str):
                instructions.add(record["instruction"])
            count += 1
        if count == 0:
            raise InvalidInputError(f"{split}.jsonl of the chip set holds no record")
        counts[split] = count
    return ChipSet(root=root, chips=len(images), objects=objects,
                   train_records=counts["train"], val_records=counts["val"],
                   instructions=tuple(sorted(instructions)), classes=tuple(sorted(classes)))


# --------------------------------------------------------------------------- trainer config


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | Path):
        return json.dumps(str(value))  # a JSON string is a TOML basic string
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return repr(value)


def trainer_config_text(*, name: str, version: str, base_folder: Path, chips: ChipSet,
                        output_dir: Path, max_steps: int, max_seconds: float | None,
                        recipe: FineTuneRecipe) -> str:
    """The TOML of a fine-tune of the default model in ``base_folder`` on ``chips`` (train
    split), scored on their val split before the first step and after the last."""
    batch = recipe.batch_for(chips)
    run: dict[str, Any] = {"output_dir": output_dir, "seed": recipe.seed,
                           "max_steps": max_steps, "log_every": 1,
                           "checkpoint_every": max_steps, "keep_checkpoints": 1,
                           "resume": False, "device": recipe.device}
    if max_seconds is not None:
        run["max_seconds"] = max_seconds
    sections: dict[str, dict[str, Any]] = {
        "run": run,
        "model": {"family": "default", "init": base_folder, "freeze": []},
        "batch": {"per_device": batch, "accumulation": 1, "global_batch": batch,
                  "num_workers": 0},
        "optim": {"lr": recipe.lr, "warmup_ratio": recipe.warmup_ratio},
        "loss": {"num_points": recipe.num_points, "lm_weight": 0.0},
        "augment": {"hflip": recipe.flip, "vflip": recipe.flip},
        "metrics": {"tensorboard": False},
        "validation": {"at_start": True, "every": 0, "batch_size": batch},
        "default_model": {"name": name, "version": version},
    }
    lines = []
    for section, table in sections.items():
        lines.append(f"[{section}]")
        lines += [f"{key} = {_toml_value(value)}" for key, value in table.items()]
        lines.append("")
    for array, split in (("validation.datasets", "val"), ("datasets", "train")):
        lines += [f"[[{array}]]", 'name = "local"', f"root = {_toml_value(chips.root)}",
                  f'split = "{split}"', ""]
    return "\n".join(lines)


def trainer_takes_time_budget() -> bool:
    """Whether the installed trainer stops on ``run.max_seconds`` (else budgets are steps)."""
    try:  # by name: the backend does not depend on the trainer package
        trainer_config = importlib.import_module("unigeoseg_trainer.config")
    except ImportError:
        return False
    return "max_seconds" in trainer_config.RunConfig.__dataclass_fields__


# --------------------------------------------------------------------------- models


def fine_tuned_offer(folder: Path, device: Any) -> EngineOffer:
    """The engine ``default:<folder name>`` serving the fine-tuned model in ``folder``.

    An engine's name is a class attribute (requests, replies and the registry read it), so
    each fine-tuned model is served by a subclass of DefaultEngine that only renames it.
    """
    card = read_model_card(folder)
    engine_name = fine_tuned_engine("default", folder.name)
    kind: type[DefaultEngine] = type(
        "FineTunedDefaultEngine", (DefaultEngine,),
        {"name": engine_name, "title": f"the fine-tuned model {folder.name}"})
    about = {**card.summary(), "fine_tuned": card.training.get("fine_tune", {})}
    return EngineOffer(kind, load=lambda: kind.from_folder(folder, device), about=about)


def write_fine_tune_card(folder: Path, record: dict[str, Any]) -> ModelCard:
    """Add ``record`` (base model, data, instructions, budget, IoU, date) to the card in
    ``folder`` as ``training.fine_tune``, and the held-out IoU to its ``metrics``."""
    card = read_model_card(folder)
    card = replace(card, training={**card.training, "fine_tune": record},
                   metrics={**card.metrics, "held_out_iou": record["iou"]})
    staged = folder / f".{MODEL_CARD_FILE}.part"
    staged.write_text(json.dumps(card.to_json(), indent=2) + "\n", encoding="utf-8")
    os.replace(staged, folder / MODEL_CARD_FILE)
    return card


# --------------------------------------------------------------------------- jobs


@dataclass
class Upload:
    """A chip set being uploaded: its folder and each file's size so far."""

    folder: Path
    sizes: dict[str, int] = field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        return sum(self.sizes.values())


@dataclass
class TrainingJob:
    """One fine-tune, from the request to its end (fields change under TrainingJobs' lock)."""

    id: str
    name: str
    base: str
    chips: ChipSet
    folder: Path                   # jobs/<id>
    max_steps: int
    max_seconds: float | None
    epochs: float | None = None
    state: str = "queued"
    step: int = 0
    loss: float | None = None
    before_iou: float | None = None
    after_iou: float | None = None
    engine: str | None = None
    message: str | None = None
    events: list[TrainEvent] = field(default_factory=list)
    started_wall: float | None = None     # time.time() when its process started
    ended_wall: float | None = None
    process: subprocess.Popen | None = None
    cancel_requested: threading.Event = field(default_factory=threading.Event)

    def elapsed_s(self) -> float:
        if self.started_wall is None:
            return 0.0
        return (self.ended_wall or time.time()) - self.started_wall

    def eta_s(self) -> float | None:
        """Seconds left at the pace of the steps so far (None before two steps)."""
        steps = [e for e in self.events if e.loss is not None]
        if self.state != "running" or len(steps) < 2 or steps[-1].step <= steps[0].step:
            return None
        pace = (steps[-1].elapsed_s - steps[0].elapsed_s) / (steps[-1].step - steps[0].step)
        return round(max(0.0, pace * (self.max_steps - self.step)), 1)

    def reply(self, after: int = 0) -> TrainJobReply:
        events = tuple(self.events[after:after + MAX_EVENTS_PER_REPLY])
        return TrainJobReply(
            job=self.id, name=self.name, base=self.base, state=self.state, step=self.step,
            max_steps=self.max_steps, elapsed_s=round(self.elapsed_s(), 2), loss=self.loss,
            eta_s=self.eta_s(), before_iou=self.before_iou, after_iou=self.after_iou,
            engine=self.engine, message=self.message, data=self.chips.summary(),
            events=events, cursor=min(len(self.events), after + len(events)))


class MetricsFollower:
    """Reads the complete lines a trainer has appended to its ``metrics.jsonl`` so far."""

    def __init__(self, path: Path):
        self.path = path
        self._offset = 0
        self._partial = b""

    def new_rows(self) -> list[dict[str, Any]]:
        try:
            with self.path.open("rb") as file:
                file.seek(self._offset)
                data = file.read()
        except FileNotFoundError:
            return []
        self._offset += len(data)
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()  # the last line may still be being written
        rows = []
        for line in lines:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and isinstance(row.get("step"), int):
                rows.append(row)
        return rows


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) \
        else None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


class TrainingJobs:
    """Uploads, the job queue and the supervisor thread (see the module docstring).

    Args:
        engines: the service's engines; fine-tuned models are added to it.
        cache: the weights cache folder (``weights.cache_dir()``).
        device: where fine-tuned models are served (the service's device).
        local_chips: whether ``train_start`` may name a folder on this machine
            (``chips_dir``): only for a backend that only local clients can reach.
        recipe: the trainer settings the request does not choose.
        max_upload_bytes: the bound on one chip set.
    """

    def __init__(self, engines: EngineRegistry, cache: Path, device: Any = "cpu", *,
                 local_chips: bool = True, recipe: FineTuneRecipe = FineTuneRecipe(),
                 max_upload_bytes: int = MAX_UPLOAD_BYTES):
        self.engines = engines
        cache = Path(cache).resolve()  # the trainer runs in the job's folder
        self.models_root = cache / FINETUNED_FOLDER
        self.training_root = cache / "tmp" / "training"
        self.work = self.training_root / f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.device = device
        self.local_chips = local_chips
        self.recipe = recipe
        self.max_upload_bytes = max_upload_bytes
        self._uploads: dict[str, Upload] = {}
        self._jobs: dict[str, TrainingJob] = {}
        self._queue: queue.Queue[TrainingJob | None] = queue.Queue()
        self._lock = threading.Lock()
        self._supervisor: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Remove what dead services left, offer the fine-tuned models there are, and start
        the supervisor thread."""
        self.remove_stale()
        for name, folder in self.finished_models():
            try:
                self.engines.add(fine_tuned_offer(folder, self.device))
            except UniGeoSegError as exc:
                logger.warning("fine-tuned model %s skipped: %s", name, exc.message)
        self._supervisor = threading.Thread(target=self._supervise, daemon=True,
                                            name="unigeoseg-training")
        self._supervisor.start()

    def close(self, timeout_s: float = 10.0) -> None:
        """Cancel every job (their processes end), stop the supervisor, remove the work area."""
        with self._lock:
            jobs = list(self._jobs.values())
        for job in jobs:
            if job.state not in FINAL_TRAINING_STATES:
                self._request_cancel(job)
        self._queue.put(None)
        if self._supervisor is not None:
            self._supervisor.join(timeout=timeout_s)
        shutil.rmtree(self.work, ignore_errors=True)

    def remove_stale(self) -> None:
        """Delete the work areas and staging folders of services that no longer run."""
        for folder, pid in self._owned_folders():
            if pid != os.getpid() and not _pid_alive(pid):
                logger.info("removing %s, left by a service that stopped", folder)
                shutil.rmtree(folder, ignore_errors=True)

    def _owned_folders(self) -> Iterator[tuple[Path, int]]:
        """Work areas (``<pid>-<token>``) and staging folders (``.staging-<pid>-<name>``),
        with the process id of the service that made each."""
        if self.training_root.is_dir():
            for folder in self.training_root.iterdir():
                pid = folder.name.split("-", 1)[0]
                if pid.isdigit():
                    yield folder, int(pid)
        if self.models_root.is_dir():
            for folder in self.models_root.glob(".staging-*"):
                pid = folder.name.split("-", 2)[1]
                if pid.isdigit():
                    yield folder, int(pid)

    def finished_models(self) -> list[tuple[str, Path]]:
        """The fine-tuned models in the cache: (name, folder), by name."""
        if not self.models_root.is_dir():
            return []
        return [(folder.name, folder) for folder in sorted(self.models_root.iterdir())
                if is_model_name(folder.name) and (folder / MODEL_CARD_FILE).is_file()]

    # ------------------------------------------------------------------ front thread

    def upload(self, request: TrainUploadRequest) -> TrainUploadReply:
        """Store one file (or piece of one) of chip set ``request.upload``."""
        with self._lock:
            upload = self._uploads.get(request.upload)
            if upload is None and len(self._uploads) >= MAX_OPEN_UPLOADS:
                raise TooManyJobsError(f"{MAX_OPEN_UPLOADS} chip sets are being uploaded "
                                       f"already; start a job with one first")
            if upload is None:
                upload = Upload(self.work / "uploads" / request.upload)
            before = upload.sizes.get(request.path, 0)
            if request.offset not in (0, before):
                raise InvalidInputError(
                    f"{request.path} has {before} bytes so far: its next piece starts at "
                    f"offset {before}" + (" (or 0 to send it again)" if before else ""))
            if request.path not in upload.sizes and len(upload.sizes) >= MAX_UPLOAD_FILES:
                raise UploadTooLargeError(f"a chip set holds at most {MAX_UPLOAD_FILES} files")
            size = request.offset + int(request.data.size)
            total = upload.total_bytes - before + size
            if total > self.max_upload_bytes:
                raise UploadTooLargeError(
                    f"the chip set would be {total} bytes, over this backend's bound of "
                    f"{self.max_upload_bytes}; use fewer or smaller chips",
                    {"max_bytes": self.max_upload_bytes})
            target = upload.folder / request.path
            target.parent.mkdir(parents=True, exist_ok=True)
            with target.open("r+b" if request.offset else "wb") as file:
                file.seek(request.offset)
                file.write(request.data.tobytes())
                file.truncate()
            upload.sizes[request.path] = size
            self._uploads[request.upload] = upload
            return TrainUploadReply(request.upload, request.path, size, len(upload.sizes),
                                    upload.total_bytes)

    def start_job(self, request: TrainStartRequest) -> TrainJobReply:
        """Check the request and its chips, and queue the job."""
        self._check_base(request.base)
        if importlib.util.find_spec("unigeoseg_trainer") is None:
            raise EngineUnavailableError("the trainer (unigeoseg_trainer) is not installed "
                                         "with this backend: it cannot fine-tune")
        if request.max_seconds is not None and not trainer_takes_time_budget():
            raise InvalidInputError("this backend's trainer takes a budget in steps only: "
                                    "give max_steps")
        with self._lock:
            self._check_name_free(request.name)
            if sum(job.state == "queued" for job in self._jobs.values()) >= MAX_QUEUED_JOBS:
                raise TooManyJobsError(f"{MAX_QUEUED_JOBS} training jobs are waiting already; "
                                       f"start this one when one has finished")
            job_id = uuid.uuid4().hex[:16]
            folder = self.work / "jobs" / job_id
            if request.upload is not None:
                upload = self._uploads.get(request.upload)
                if upload is None:
                    raise UnknownJobError(f"no chip set {request.upload!r} was uploaded to "
                                          f"this backend (it restarted, or the id is wrong)",
                                          {"upload": request.upload})
                chips_root = self._take_upload(request.upload, upload, folder / "chips")
            else:
                if not self.local_chips:
                    raise InvalidInputError("this backend runs on another machine: send the "
                                            "chips with train_upload instead of chips_dir")
                # resolved: the trainer runs in the job's folder
                chips_root = Path(request.chips_dir).expanduser().resolve()  # type: ignore[arg-type]
                if not chips_root.is_dir():
                    raise InvalidInputError(f"the chips folder {chips_root} does not exist")
            try:
                chips = read_chip_set(chips_root)
            except InvalidInputError:
                if request.upload is not None:
                    shutil.rmtree(folder, ignore_errors=True)
                raise
            job = TrainingJob(id=job_id, name=request.name, base=request.base, chips=chips,
                              folder=folder, max_steps=self._steps(request, chips),
                              max_seconds=request.max_seconds, epochs=request.epochs)
            self._jobs[job_id] = job
            self._queue.put(job)
            logger.info("training job queued", extra={"job": job_id, "model": request.name})
            return job.reply()

    def _steps(self, request: TrainStartRequest, chips: ChipSet) -> int:
        """The job's step budget: ``max_steps``, or the steps of ``epochs`` passes over the
        training records if fewer (MAX_TRAIN_STEPS with a time budget alone)."""
        budgets = [request.max_steps or MAX_TRAIN_STEPS]
        if request.epochs is not None:
            per_epoch = chips.train_records / self.recipe.batch_for(chips)
            budgets.append(max(1, math.ceil(request.epochs * per_epoch)))
        return min(budgets)

    def status(self, request: TrainStatusRequest) -> TrainJobReply:
        with self._lock:
            return self._job(request.job).reply(request.after)

    def cancel(self, request: TrainCancelRequest) -> TrainJobReply:
        with self._lock:
            job = self._job(request.job)
        if job.state not in FINAL_TRAINING_STATES:
            self._request_cancel(job)
        with self._lock:
            if job.state == "queued":  # final at once: the supervisor will skip it
                job.state, job.message = "cancelled", "cancelled before it started"
            return job.reply(len(job.events))

    def _job(self, job_id: str) -> TrainingJob:
        job = self._jobs.get(job_id)
        if job is None:
            raise UnknownJobError(f"no training job {job_id!r} on this backend (it "
                                  f"restarted, or the id is wrong)", {"job": job_id})
        return job

    def _check_base(self, base: str) -> None:
        family = engine_family(base)
        if family == "unigeoseg":
            raise EngineUnavailableError(
                "this backend cannot fine-tune UniGeoSeg: that needs a GPU backend with the "
                "released model, which this version does not offer yet; choose the default "
                "model as the base", {"base": base, "fine_tunable": list(FINE_TUNABLE_ENGINES)})
        if family not in FINE_TUNABLE_ENGINES:
            raise EngineUnavailableError(
                f"the {family} engine cannot be fine-tuned here; choose the default model as "
                f"the base", {"base": base, "fine_tunable": list(FINE_TUNABLE_ENGINES)})
        if base not in self.engines.available():
            reason = self.engines.reasons_unavailable().get(base) \
                or f"no model {base!r} on this backend (hello lists the models)"
            raise EngineUnavailableError(f"cannot fine-tune {base}: {reason}", {"base": base})

    def _check_name_free(self, name: str) -> None:
        if (self.models_root / name).exists():
            raise InvalidInputError(f"a fine-tuned model called {name!r} exists already; "
                                    f"choose another name", {"name": name})
        if any(job.name == name and job.state in ("queued", "running")
               for job in self._jobs.values()):
            raise InvalidInputError(f"a training job is already making a model called "
                                    f"{name!r}; choose another name", {"name": name})

    def _take_upload(self, upload_id: str, upload: Upload, target: Path) -> Path:
        del self._uploads[upload_id]
        target.parent.mkdir(parents=True, exist_ok=True)
        if upload.folder.is_dir():
            os.replace(upload.folder, target)
        else:
            target.mkdir()
        return target

    def _request_cancel(self, job: TrainingJob) -> None:
        job.cancel_requested.set()
        process = job.process
        if process is not None and process.poll() is None:
            process.terminate()

    # ------------------------------------------------------------------ supervisor thread

    def _supervise(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            try:
                self._run(job)
            except UniGeoSegError as exc:
                self._end(job, "failed", exc.message)
            except Exception as exc:  # a bug: the job fails, the service keeps serving
                logger.exception("training job crashed", extra={"job": job.id})
                self._end(job, "failed", f"internal error ({type(exc).__name__}: {exc}); "
                                         f"the backend log has details")
            finally:
                # Its uploaded chips, config, log and trainer output; chips_dir stays.
                shutil.rmtree(job.folder, ignore_errors=True)

    def _end(self, job: TrainingJob, state: str, message: str | None,
             engine: str | None = None) -> None:
        with self._lock:
            job.state, job.message, job.engine = state, message, engine
            job.ended_wall = time.time()
        logger.info("training job %s", state, extra={"job": job.id, "model": job.name,
                                                     "code": state})

    def _run(self, job: TrainingJob) -> None:
        if job.cancel_requested.is_set():
            self._end(job, "cancelled", "cancelled before it started")
            return
        base_folder = self._base_folder(job.base)
        output_dir = job.folder / "run"
        config = job.folder / "config.toml"
        job.folder.mkdir(parents=True, exist_ok=True)
        version = datetime.now(timezone.utc).strftime("%Y%m%d.%H%M%S")
        config.write_text(trainer_config_text(
            name=job.name, version=version, base_folder=base_folder, chips=job.chips,
            output_dir=output_dir, max_steps=job.max_steps, max_seconds=job.max_seconds,
            recipe=self.recipe), encoding="utf-8")
        log_path = job.folder / "trainer.log"
        command = [sys.executable, "-m", "unigeoseg_backend.service.trainer_launch",
                   str(os.getpid()), str(config)]
        with log_path.open("wb") as log:
            process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log,
                                       stderr=subprocess.STDOUT, cwd=job.folder)
        with self._lock:
            job.process, job.state, job.started_wall = process, "running", time.time()
        if job.cancel_requested.is_set():  # cancelled while the process was being started
            process.terminate()
        follower = MetricsFollower(output_dir / "metrics.jsonl")
        terminated_at = None
        while process.poll() is None:
            self._follow(job, follower)
            if job.cancel_requested.is_set():
                terminated_at = terminated_at or time.monotonic()
                if time.monotonic() - terminated_at > TERMINATE_GRACE_S:
                    process.kill()
            job.cancel_requested.wait(_POLL_S)
        self._follow(job, follower)
        if job.cancel_requested.is_set():
            self._end(job, "cancelled", "cancelled; no model was saved")
        elif process.returncode != 0:
            self._end(job, "failed", f"the trainer stopped (exit code {process.returncode}): "
                                     f"{self._log_tail(log_path)}")
        else:
            folder = self._install(job, output_dir, base_folder, version)
            self.engines.add(fine_tuned_offer(folder, self.device))
            self._end(job, "succeeded", None, fine_tuned_engine("default", job.name))

    def _base_folder(self, base: str) -> Path:
        if base == "default":
            engine = self.engines.get("default")
            folder: Path = engine.loaded.folder  # type: ignore[attr-defined]
        else:
            folder = self.models_root / base.split(":", 1)[1]
        return Path(folder).resolve()  # the trainer runs in the job's folder

    def _follow(self, job: TrainingJob, follower: MetricsFollower) -> None:
        rows = follower.new_rows()
        if not rows:
            return
        with self._lock:
            started = job.started_wall or time.time()
            for row in rows:
                step = row["step"]
                written = _number(row.get("time"))  # the trainer's time.time() at the row
                elapsed = round(max(0.0, (written or time.time()) - started), 3)
                loss, val_iou = _number(row.get("loss")), _number(row.get("val/iou"))
                if loss is None and val_iou is None:
                    continue
                job.events.append(TrainEvent(step, elapsed, loss, val_iou))
                job.step = max(job.step, step)
                if loss is not None:
                    job.loss = loss
                if val_iou is not None and step == 0 and job.before_iou is None:
                    job.before_iou = val_iou

    def _install(self, job: TrainingJob, output_dir: Path, base_folder: Path,
                 version: str) -> Path:
        """Copy the exported model into ``<cache>/finetuned/<name>`` with its fine-tune record:
        assembled in a staging folder, then renamed (all or nothing)."""
        exported = output_dir / "model"
        try:
            summary = json.loads((output_dir / "validation" / "summary.json").read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise InvalidInputError(f"the trainer wrote no readable before/after score "
                                    f"({exc}); no model was saved") from None
        before, after = summary.get("before", {}), summary.get("after", {})
        with self._lock:
            job.before_iou = _number(before.get("iou"))
            job.after_iou = _number(after.get("iou"))
        record = {
            "base_engine": job.base,
            "base_model": read_model_card(base_folder).model_id,
            "data": job.chips.summary(),
            "instructions": list(job.chips.instructions),
            "budget": {"max_steps": job.max_steps, "max_seconds": job.max_seconds,
                       "epochs": job.epochs},
            "steps": job.step,
            "elapsed_s": round(job.elapsed_s(), 1),
            "iou": {"before": job.before_iou, "after": job.after_iou,
                    "count": after.get("count", before.get("count"))},
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "version": version,
        }
        self.models_root.mkdir(parents=True, exist_ok=True)
        staging = self.models_root / f".staging-{os.getpid()}-{job.name}"
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(exported, staging)
        write_fine_tune_card(staging, record)
        final = self.models_root / job.name
        if final.exists():
            shutil.rmtree(staging, ignore_errors=True)
            raise InvalidInputError(f"a model called {job.name!r} appeared while the job ran")
        os.rename(staging, final)
        return final

    @staticmethod
    def _log_tail(path: Path) -> str:
        try:
            lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError:
            return "no log"
        errors = [line for line in lines if "Error" in line or "error" in line]
        return " | ".join((errors or lines)[-_LOG_TAIL_LINES:]) or "no output"


def default_training_jobs(engines: EngineRegistry, device: Any, *,
                          local_chips: bool) -> TrainingJobs:
    """The training jobs of a service, working in the weights cache."""
    return TrainingJobs(engines, cache_dir(), device, local_chips=local_chips)

