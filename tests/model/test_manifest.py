"""The manifests shipped in ``unigeoseg_backend/model/manifests/``: the source of the released
checkpoint's tensor names, shapes and dtypes."""

from __future__ import annotations

import pytest

from unigeoseg_backend.model.manifest import load_manifest, manifest_tensors


def test_both_variants_differ_only_in_the_connector():
    sparse = manifest_tensors("SparseConv_1")
    mscc = manifest_tensors("MSCC")
    differing = {name for name in set(sparse) | set(mscc) if sparse.get(name) != mscc.get(name)}
    assert differing and all(name.startswith("model.mm_projector.") for name in differing)
    assert len(sparse) == 958 and len(mscc) == 959
    with pytest.raises(ValueError):
        load_manifest("Linear")

