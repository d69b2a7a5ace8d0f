"""The task and engine vocabulary: the one definition every part of UniGeoSeg imports.

A *task* says what the user asks for (it also selects the UniGeoSeg model's task branch); an
*engine* is the model family that answers a request. Dataset readers, the model, the backend,
the CLI and the plugin all use these names, so they are defined here, in the package every one
of them can import (stdlib only).
"""

from __future__ import annotations

#: Every task, in the order of the wire protocol's documentation.
TASKS = ("interactive", "referring", "reasoning")

#: Tasks whose prompt is a text instruction (the others are points / a box).
TEXT_TASKS = ("referring", "reasoning")

#: Engines a request may name.
ENGINES = ("sam", "unigeoseg")


def default_task(has_geometry: bool, has_text: bool) -> str:
    """The task of a prompt that names none: ``interactive`` for points / a box alone,
    ``referring`` as soon as there is a text instruction (or nothing at all)."""
    return "interactive" if has_geometry and not has_text else "referring"


def default_engine(task: str) -> str:
    """The engine for a request that names none: ``sam`` for interactive prompts, else
    ``unigeoseg`` (the only engine that reads text)."""
    return "sam" if task == "interactive" else "unigeoseg"
