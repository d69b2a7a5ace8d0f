"""The task and engine vocabulary: the one definition every part of UniGeoSeg imports.

A *task* says what the user asks for (it also selects the UniGeoSeg model's task branch); an
*engine* is the model family that answers a request. Dataset readers, the model, the backend,
the CLI and the plugin all use these names, so they are defined here, in the package every one
of them can import (stdlib only).
"""

from __future__ import annotations

from collections.abc import Collection

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
