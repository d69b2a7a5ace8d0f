"""The manifests shipped with the package are the project's reference copies."""

from __future__ import annotations

from pathlib import Path

import pytest

from unigeoseg_backend.model.manifest import MANIFEST_DIR, VARIANTS, load_manifest, manifest_tensors


def test_both_variants_differ_only_in_the_connector():
    sparse = manifest_tensors("SparseConv_1")
    mscc = manifest_tensors("MSCC")
    differing = {name for name in set(sparse) | set(mscc) if sparse.get(name) != mscc.get(name)}
    assert differing and all(name.startswith("model.mm_projector.") for name in differing)
    assert len(sparse) == 958 and len(mscc) == 959
    with pytest.raises(ValueError):
        load_manifest("Linear")


def test_the_packaged_manifests_equal_the_shared_reference_when_it_is_there():
    reference = Path(__file__).resolve().parents[3] / "shared" / "reference"
    if not reference.is_dir():
        pytest.skip("no shared/reference beside this checkout")
    for filename in VARIANTS.values():
        assert (MANIFEST_DIR / filename).read_bytes() == (reference / filename).read_bytes()
