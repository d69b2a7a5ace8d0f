"""Periodic validation through the evaluation of ``unigeoseg eval``.

Every ``validation.every`` steps (and after the last one) each ``[[validation.datasets]]``
entry is scored by ``unigeoseg_backend.evaluation.pipeline.evaluate``, the function behind
``unigeoseg eval``, on the model being trained (float32, no copy): the same letterbox, prompt,
threshold and gIoU / cIoU, so training and evaluation cannot disagree on a metric. Its
report lands in ``<output_dir>/validation/step_<step>/<i>-<dataset>/`` (metrics.json,
metrics.md, the per-sample rows), and the metrics log gets ``val/<i>-<dataset>/<task>/gIoU``
and ``.../cIoU`` for each task and ``overall``. With several processes the samples are
shared out as ``unigeoseg eval`` under torchrun shares them.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from unigeoseg_backend.datasets import open_dataset
from unigeoseg_backend.distributed import World
from unigeoseg_backend.errors import InvalidInputError
from unigeoseg_backend.evaluation.pipeline import EvalSettings, evaluate
from unigeoseg_backend.model.checkpoint import LoadedModel
from unigeoseg_backend.model.unigeoseg import UniGeoSeg

from .config import ConfigError, ValidationConfig

logger = logging.getLogger(__name__)

VALIDATION = "validation"       #: under run.output_dir


class Validator:
    """Scores the model on the validation datasets when due."""

    def __init__(self, config: ValidationConfig, output_dir: str | Path, world: World):
        self.config = config
        self.output_dir = Path(output_dir)
        self.world = world
        self.listings = []      # listed once, before the first step
        for i, d in enumerate(config.datasets):
            try:
                listing = open_dataset(d.name, d.root, d.split, d.task, mask_rule=d.mask_rule)
            except InvalidInputError as exc:
                raise ConfigError(f"validation.datasets[{i}]", str(exc)) from exc
            if not listing.samples:
                raise ConfigError(f"validation.datasets[{i}]",
                                  f"{d.name} {d.split} in {d.root} yields no samples")
            self.listings.append(listing)

    def due(self, step: int, max_steps: int) -> bool:
        every = self.config.every
        return every > 0 and (step % every == 0 or step == max_steps)

    def run(self, model: UniGeoSeg, tokenizer: Any, step: int) -> dict[str, float]:
        """The validation metrics of ``model`` after ``step`` steps (``val/...`` keys)."""
        model.eval()
        loaded = LoadedModel(model=model, tokenizer=tokenizer, config=model.config,
                             name=f"training step {step}", path=self.output_dir)
        scores: dict[str, float] = {}
        for i, (entry, listing) in enumerate(zip(self.config.datasets, self.listings,
                                                 strict=True)):
            name = f"{i}-{entry.name}"
            out = self.output_dir / VALIDATION / f"step_{step:08d}" / name
            settings = EvalSettings(
                dataset=entry.name, root=Path(entry.root), split=entry.split, out=out,
                task=entry.task, mask_rule=entry.mask_rule,
                batch_size=self.config.batch_size, limit=self.config.limit or None,
                worst=0, restart=True, workers=0, progress=False)
            document = evaluate(settings, listing, self.output_dir, lambda: loaded,
                                model.device, torch.float32, self.world)
            if document is None:        # not rank 0
                continue
            for task, summary in document["metrics"].items():
                for metric in ("gIoU", "cIoU"):
                    if summary[metric] is not None:
                        scores[f"val/{name}/{task}/{metric}"] = summary[metric]
            overall = document["metrics"]["overall"]
            logger.info("validation step %d, %s: gIoU %s, cIoU %s (%d samples)", step, name,
                        overall["gIoU"], overall["cIoU"], overall["count"])
        return scores
