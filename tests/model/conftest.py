"""Fixtures of the model tests: the released checkpoint's manifest, from the package."""

from __future__ import annotations

import pytest

from unigeoseg_backend.model.manifest import load_manifest


@pytest.fixture(scope="session")
def manifest() -> dict:
    """The SparseConv_1 manifest shipped in unigeoseg_backend/model/manifests/."""
    return load_manifest("SparseConv_1")


@pytest.fixture(scope="session")
def manifest_mscc() -> dict:
    return load_manifest("MSCC")
