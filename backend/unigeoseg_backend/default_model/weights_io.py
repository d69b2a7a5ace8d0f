"""The default model's weights on disk: one safetensors file and a JSON model card beside it.

A weights folder holds :data:`MODEL_CARD_FILE` and the safetensors file the card names. The
card says what the model is (name, version, configuration in ``network.DEFAULT_MODEL_CONFIGS``),
the text encoder it was trained with, the pixel sizes it was trained at, the classes it knows
(each with its own pixel sizes), its limits in words, and the SHA-256 of the weights file.

Loading checks the digest before any tensor is read: a damaged or replaced file is a
:class:`~..errors.WeightsError` naming it, never a model with some random weights. The tensors
must then be exactly the configuration's (every missing, unexpected or mis-shaped name is
reported). The shipped folder is :func:`shipped_weights_dir`; tests and training write their
own with :func:`save_default_model`.

Public API:
    ModelCard, GsdRange, ClassCard, LoadedDefaultModel
    read_model_card(folder) -> ModelCard
    load_default_model(folder, device) -> LoadedDefaultModel
    save_default_model(model, card, folder) -> ModelCard (with the written file's sha256)
    shipped_weights_dir() -> Path
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from ..errors import WeightsError
from ..model.weight_files import check_layout, read_json, read_state_file
from ..weights import sha256_file
from .network import DEFAULT_MODEL_CONFIGS, DefaultSegmenter, build_default_model
from .text_encoder import DEFAULT_CLASSES, KnownClass

#: The model card's file name inside a weights folder.
MODEL_CARD_FILE = "model_card.json"
#: The card format this code reads.
CARD_FORMAT = 1


def shipped_weights_dir() -> Path:
    """The weights folder inside the installed package (``default_model/weights``)."""
    return Path(__file__).resolve().parent / "weights"


@dataclass(frozen=True)
class GsdRange:
    """Ground sample distances (pixel sizes on the ground) in metres, ``min_m <= max_m``."""

    min_m: float
    max_m: float

    def __post_init__(self) -> None:
        if not (0 < self.min_m <= self.max_m and math.isfinite(self.max_m)):
            raise ValueError(f"a GSD range needs 0 < min <= max, got {self.min_m}..{self.max_m}")

    def clamp(self, gsd_m: float) -> float:
        return min(max(gsd_m, self.min_m), self.max_m)

    def __contains__(self, gsd_m: float) -> bool:
        # a relative tolerance: a tile resampled to the range's end lands there up to rounding
        return self.min_m * (1 - 1e-6) <= gsd_m <= self.max_m * (1 + 1e-6)

    def describe(self) -> str:
        return f"{self.min_m:g}-{self.max_m:g} m"


@dataclass(frozen=True)
class ClassCard:
    """A class the model was trained to find, and the pixel sizes it was trained at.

    ``phrases``: the wordings instructions are matched against. Empty for a built-in class
    (a ``text_encoder.DEFAULT_CLASSES`` name, whose phrasings are the code's); a class learnt
    in a fine-tune brings the instructions it was trained with.
    """

    name: str
    gsd: GsdRange
    phrases: tuple[str, ...] = ()

    def known_class(self) -> KnownClass | None:
        """The phrasings to match instructions against, or None when there are none."""
        if self.phrases:
            return KnownClass(self.name, self.phrases)
        return next((c for c in DEFAULT_CLASSES if c.name == self.name), None)


@dataclass(frozen=True)
class ModelCard:
    """What a weights file is.

    Attributes:
        name: the model's name as ``hello`` and provenance show it (``default-v1``).
        version: its version (``1.0.0``).
        config: the network configuration (``network.DEFAULT_MODEL_CONFIGS`` key).
        weights_file: the safetensors file's name, in the card's folder.
        sha256: the weights file's SHA-256, lower-case hex.
        text_encoder: the text model it was trained with (name, package, version).
        gsd: the pixel sizes it was trained at; input is resampled into this range.
        classes: what it was trained to find.
        limits: its known limits, in sentences for the analyst.
        mask_threshold: the probability above which a pixel is in the mask.
        training: how it was trained (free form: data, steps, time).
        metrics: what it reached (free form: IoU per evaluation region).
    """

    name: str
    version: str
    config: str
    weights_file: str
    sha256: str
    text_encoder: dict[str, str]
    gsd: GsdRange
    classes: tuple[ClassCard, ...]
    limits: tuple[str, ...] = ()
    mask_threshold: float = 0.5
    training: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def model_id(self) -> str:
        """``name@version``, what ``model_id`` and the polygons' provenance carry."""
        return f"{self.name}@{self.version}"

    def summary(self) -> dict[str, Any]:
        """What the analyst is shown (``hello``): name, version, classes, pixel sizes, limits."""
        return {"name": self.name, "version": self.version,
                "classes": [c.name for c in self.classes],
                "gsd_m": [self.gsd.min_m, self.gsd.max_m], "limits": list(self.limits)}

    def class_card(self, name: str) -> ClassCard | None:
        return next((c for c in self.classes if c.name == name), None)

    def known_classes(self) -> list[KnownClass]:
        """The card's classes with the phrasings instructions are matched against."""
        return [k for k in (c.known_class() for c in self.classes) if k is not None]

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["format"] = CARD_FORMAT
        data["gsd"] = {"min_m": self.gsd.min_m, "max_m": self.gsd.max_m}
        data["classes"] = [{"name": c.name, "gsd": {"min_m": c.gsd.min_m, "max_m": c.gsd.max_m},
                            **({"phrases": list(c.phrases)} if c.phrases else {})}
                           for c in self.classes]
        data["limits"] = list(self.limits)
        return data

    @classmethod
    def from_json(cls, data: Any, source: Path) -> ModelCard:
        """Parse a card; anything missing or malformed is a WeightsError naming ``source``."""
        try:
            if data.get("format") != CARD_FORMAT:
                raise ValueError(f"card format {data.get('format')!r}, this code reads "
                                 f"{CARD_FORMAT}")
            if data["config"] not in DEFAULT_MODEL_CONFIGS:
                raise ValueError(f"unknown configuration {data['config']!r} (known: "
                                 f"{', '.join(DEFAULT_MODEL_CONFIGS)})")
            return cls(
                name=str(data["name"]), version=str(data["version"]), config=data["config"],
                weights_file=_plain_file_name(str(data["weights_file"])),
                sha256=str(data["sha256"]).lower(),
                text_encoder={str(k): str(v) for k, v in data["text_encoder"].items()},
                gsd=GsdRange(float(data["gsd"]["min_m"]), float(data["gsd"]["max_m"])),
                classes=tuple(ClassCard(str(c["name"]), GsdRange(float(c["gsd"]["min_m"]),
                                                                 float(c["gsd"]["max_m"])),
                                        tuple(str(p) for p in c.get("phrases", ())))
                              for c in data["classes"]),
                limits=tuple(str(s) for s in data.get("limits", ())),
                mask_threshold=float(data.get("mask_threshold", 0.5)),
                training=dict(data.get("training", {})), metrics=dict(data.get("metrics", {})))
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            detail = f"missing {exc}" if isinstance(exc, KeyError) else str(exc)
            raise WeightsError(f"model card {source} is not valid: {detail}",
                               {"path": str(source)}) from exc


def _plain_file_name(name: str) -> str:
    if Path(name).name != name or name in ("", ".", ".."):
        raise ValueError(f"weights_file must be a file name in the card's folder, got {name!r}")
    return name


def read_model_card(folder: Path) -> ModelCard:
    """The card of the weights folder ``folder``.

    Raises:
        WeightsError: no card, or an unreadable or invalid one (named).
    """
    card_path = Path(folder) / MODEL_CARD_FILE
    return ModelCard.from_json(read_json(card_path, "the default model's card"), card_path)


@dataclass
class LoadedDefaultModel:
    """A model with its card and where it came from."""

    model: DefaultSegmenter
    card: ModelCard
    folder: Path


def load_default_model(folder: Path, device: torch.device | str = "cpu") -> LoadedDefaultModel:
    """The model of weights folder ``folder``, in eval mode on ``device``.

    Raises:
        WeightsError: no or an invalid card; the weights file missing, or its SHA-256 not
            the card's (named: the file is damaged or is not the one the card describes);
            tensors that are not exactly the configuration's (every bad name reported).
    """
    folder = Path(folder)
    card = read_model_card(folder)
    weights = folder / card.weights_file
    if not weights.is_file():
        raise WeightsError(f"{weights} does not exist (named by {folder / MODEL_CARD_FILE})",
                           {"path": str(weights)})
    digest = sha256_file(weights)
    if digest != card.sha256:
        raise WeightsError(
            f"{weights} is damaged or is not the file its model card describes: SHA-256 "
            f"{digest}, the card says {card.sha256}; reinstall the package (or write the "
            f"weights again)", {"path": str(weights), "sha256": digest,
                                "expected_sha256": card.sha256})
    state = read_state_file(weights)
    model = build_default_model(card.config)
    expected = {name: (tuple(t.shape), t.dtype) for name, t in model.state_dict().items()}
    check_layout(weights, f"the default model {card.config}",
                 {name: (tuple(t.shape), t.dtype) for name, t in state.items()}, expected)
    model.load_state_dict(state, strict=True)
    return LoadedDefaultModel(model=model.to(device).eval(), card=card, folder=folder)


def save_default_model(model: DefaultSegmenter, card: ModelCard, folder: Path) -> ModelCard:
    """Write ``model``'s weights as ``card.weights_file`` and the card (with that file's
    SHA-256) into ``folder``; returns the card as written."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights = folder / card.weights_file
    state = {name: t.detach().cpu().contiguous() for name, t in model.state_dict().items()}
    save_file(state, str(weights), metadata={"config": card.config, "name": card.name,
                                             "version": card.version})
    written = replace(card, sha256=sha256_file(weights))
    (folder / MODEL_CARD_FILE).write_text(json.dumps(written.to_json(), indent=2) + "\n",
                                          encoding="utf-8")
    return written


def write_card_metrics(folder: Path, metrics: dict[str, Any] | None = None,
                       training: dict[str, Any] | None = None) -> ModelCard:
    """Replace the ``metrics`` of the card in ``folder`` and add ``training`` entries to its
    training section (the weights file is untouched; the card is written to a temporary
    file and renamed over the old one)."""
    folder = Path(folder)
    card = read_model_card(folder)
    card = replace(card, metrics=dict(card.metrics if metrics is None else metrics),
                   training={**card.training, **(training or {})})
    staged = folder / f".{MODEL_CARD_FILE}.part"
    staged.write_text(json.dumps(card.to_json(), indent=2) + "\n", encoding="utf-8")
    os.replace(staged, folder / MODEL_CARD_FILE)
    return card
