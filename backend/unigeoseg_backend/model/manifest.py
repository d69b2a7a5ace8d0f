"""The released checkpoint's tensor manifests (names, shapes, dtypes), shipped with the package.

Derived from the public architecture definition of MiliLab/UniGeoSeg at 73abc28: names and
shapes only, no weights. Used to check that the clean-room modules can load the released
checkpoint strictly.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

MANIFEST_DIR = Path(__file__).resolve().parent / "manifests"
#: Connector variant -> manifest file.
VARIANTS = {"SparseConv_1": "unigeoseg_official_state_dict.sparseconv1.json",
            "MSCC": "unigeoseg_official_state_dict.mscc.json"}


@cache
def load_manifest(variant: str = "SparseConv_1") -> dict[str, Any]:
    """The whole manifest of a connector variant (``SparseConv_1`` or ``MSCC``)."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown connector variant {variant!r}; known: {sorted(VARIANTS)}")
    return json.loads((MANIFEST_DIR / VARIANTS[variant]).read_text(encoding="utf-8"))


def manifest_tensors(variant: str = "SparseConv_1",
                     prefix: str = "") -> dict[str, tuple[tuple[int, ...], str, str]]:
    """``name -> (shape, dtype, kind)`` for the tensors whose names start with ``prefix``
    (the prefix is kept in the names)."""
    return {name: (tuple(shape), dtype, kind)
            for name, shape, dtype, kind in load_manifest(variant)["tensors"]
            if name.startswith(prefix)}
