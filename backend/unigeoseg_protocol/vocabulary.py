"""The task and engine vocabulary: the one definition every part of UniGeoSeg imports.

A *task* says what the user asks for (it also selects the UniGeoSeg model's task branch); an
*engine* is the model family that answers a request. Dataset readers, the model, the backend,
the CLI and the plugin all use these names, so they are defined here, in the package every one
of them can import (stdlib only).
"""

from __future__ import annotations

import re
from collections.abc import Collection
from typing import TypeGuard

#: Every task, in the order of the wire protocol's documentation.
TASKS = ("interactive", "referring", "reasoning")

#: Tasks whose prompt is a text instruction (the others are points / a box).
TEXT_TASKS = ("referring", "reasoning")

#: Engines a request may name. ``default`` is the embedded default model (every task, on a
#: CPU), which answers when the engine a task prefers is not offered.
ENGINES = ("sam", "unigeoseg", "default")


def default_task(has_geometry: bool, has_text: bool) -> str:
    """The task of a prompt that names none: ``interactive`` for points / a box alone,
    ``referring`` as soon as there is a text instruction (or nothing at all)."""
    return "interactive" if has_geometry and not has_text else "referring"


def default_engine(task: str, available: Collection[str] | None = None) -> str:
    """The engine for a request that names none: ``sam`` for interactive prompts, else
    ``unigeoseg``; when ``available`` (the engines the backend offers) lacks that one but
    has ``default``, the default model."""
    preferred = "sam" if task == "interactive" else "unigeoseg"
    if available is not None and preferred not in available and "default" in available:
        return "default"
    return preferred


# A fine-tuned model is offered as an engine of its own, named after the engine it was
# fine-tuned from and the model's name: ``default:red-roofs``. Requests name it like any engine
# (``set_image.engine``, ``options.engine``) and ``hello`` lists it with its model card.
FINE_TUNED_SEPARATOR = ":"

#: What a fine-tuned model may be called: letters, digits, ``.``, ``_`` and ``-``, starting
#: with a letter or digit, at most 64 characters (it names a folder in the weights cache).
MODEL_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")

#: Engines whose models this backend can fine-tune.
FINE_TUNABLE_ENGINES = ("default",)


def is_model_name(name: object) -> TypeGuard[str]:
    """Whether ``name`` may name a fine-tuned model (``MODEL_NAME_PATTERN``)."""
    return isinstance(name, str) and MODEL_NAME_PATTERN.fullmatch(name) is not None


def fine_tuned_engine(family: str, model_name: str) -> str:
    """The engine name a fine-tuned model is offered under: ``default:red-roofs``."""
    return f"{family}{FINE_TUNED_SEPARATOR}{model_name}"


def engine_family(engine: str) -> str:
    """The engine a name belongs to: ``default`` for ``default`` and ``default:red-roofs``."""
    return engine.split(FINE_TUNED_SEPARATOR, 1)[0]


def is_engine(name: object) -> TypeGuard[str]:
    """Whether a request may name ``name`` as its engine: one of ``ENGINES``, or a
    fine-tuned model of one of ``FINE_TUNABLE_ENGINES`` (``default:red-roofs``)."""
    if not isinstance(name, str):
        return False
    if name in ENGINES:
        return True
    family, separator, model_name = name.partition(FINE_TUNED_SEPARATOR)
    return bool(separator) and family in FINE_TUNABLE_ENGINES and is_model_name(model_name)
