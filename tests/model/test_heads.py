"""UniGeoSeg task-aware heads: checkpoint names, and each component against its formula.

The formulas are written out independently here (notes §2.4-2.6, official code behaviour) and
compared with the modules on a tiny float64 configuration.
"""

from __future__ import annotations

import math

import pytest
import torch

from unigeoseg_backend.model.heads import (
    TASK_ONE_HOT,
    DescriptionProjector,
    HeadsConfig,
    SegQueryBuilder,
    TaskAwareTextEnhancement,
    UniGeoSegHeads,
    pad_coords,
    task_index,
)
from unigeoseg_protocol.vocabulary import TASKS

#: Top-level checkpoint prefixes that other modules own.
FOREIGN_PREFIXES = ("model.", "pixel_decoder.", "predictor.")

TINY = HeadsConfig(hidden=16, vision_dim=8, seg_dim=4, proj_dim=8, n_latents=3, reason_queries=2,
                   dproj_heads=2, dproj_dim_head=4, n_seg_queries=5, legacy_dtype=None)
D = TINY.hidden




def _owned(name: str) -> bool:
    return not (name.startswith(FOREIGN_PREFIXES) or name == "lm_head"
                or name.startswith("lm_head."))


@pytest.fixture
def heads() -> UniGeoSegHeads:
    torch.manual_seed(0)
    module = UniGeoSegHeads(TINY).double().eval()
    with torch.no_grad():  # non-trivial values everywhere (biases, LayerNorm affine)
        for p in module.parameters():
            p.normal_(0.0, 0.5)
    return module


def _softmax_pool(query: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """softmax(q xᵀ / sqrt(d)) over tokens, (N,)."""
    return torch.softmax(x @ query / math.sqrt(x.shape[-1]), dim=0)


def _ref_branch(h: UniGeoSegHeads, e: torch.Tensor) -> torch.Tensor:
    a = _softmax_pool(h.ref_attn.query[0], e)
    return torch.stack([e[i] * a[i] for i in range(e.shape[0])])


def _reason_vector(h: UniGeoSegHeads, e: torch.Tensor) -> torch.Tensor:
    pool = h.enhanced_reasoning_pooling
    heads = [_softmax_pool(q, e) @ e for q in pool.multi_query]
    m = sum(heads) / len(heads)
    f = (e @ pool.functional_proj.weight.T + pool.functional_proj.bias).mean(dim=0)
    fused = torch.cat([m, f]) @ pool.fusion.weight.T + pool.fusion.bias
    return torch.nn.functional.layer_norm(fused, (D,), pool.layer_norm.weight, pool.layer_norm.bias)


def _intera_branch(h: UniGeoSegHeads, e: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """rows: the n x 4 coordinate rows, already padded."""
    proj, fuse = h.intera_coord_project, h.intera_fuse
    z = torch.zeros_like(e)
    for i in range(min(rows.shape[0], e.shape[0])):
        z[i] = proj.weight.to(e.dtype) @ rows[i] + proj.bias.to(e.dtype)
    return torch.cat([e, z], dim=1) @ fuse.weight.to(e.dtype).T + fuse.bias.to(e.dtype)


def _lkm(h: UniGeoSegHeads, p: torch.Tensor, lam: float) -> torch.Tensor:
    g = h.global_latents
    w = torch.softmax(torch.stack([g[k] @ p for k in range(g.shape[0])]), dim=0)
    return (1 - lam) * p + lam * sum(w[k] * g[k] for k in range(g.shape[0]))


def _perceiver(dp: DescriptionProjector, latents: torch.Tensor, media: torch.Tensor):
    """Reference Perceiver block on one sample: latents n x P, media V x P -> latent 0 (P,)."""
    (attn, ff), = dp.layers
    ln = torch.nn.functional.layer_norm
    x = ln(media, media.shape[-1:], attn.norm_media.weight, attn.norm_media.bias)
    lat = ln(latents, latents.shape[-1:], attn.norm_latents.weight, attn.norm_latents.bias)
    q, kv = lat @ attn.to_q.weight.T, torch.cat([x, lat[:1]]) @ attn.to_kv.weight.T
    k, v = kv.chunk(2, dim=-1)
    c = TINY.dproj_dim_head
    heads = []
    for j in range(TINY.dproj_heads):  # head j owns channels j*c .. (j+1)*c of q, k and v
        qj, kj, vj = (t[:, j * c:(j + 1) * c] for t in (q, k, v))
        heads.append(torch.softmax(qj @ kj.T / math.sqrt(c), dim=-1) @ vj)
    out = torch.cat(heads, dim=-1)
    latents = out @ attn.to_out.weight.T + latents
    norm, fc1, _, fc2 = ff
    hidden = ln(latents, latents.shape[-1:], norm.weight, norm.bias) @ fc1.weight.T
    latents = torch.nn.functional.gelu(hidden) @ fc2.weight.T + latents
    return ln(latents, latents.shape[-1:], dp.norm.weight, dp.norm.bias)[0]


# --- (a) checkpoint names, shapes, dtypes -------------------------------------------------

def test_state_dict_matches_released_checkpoint(manifest):
    expected = {name: (tuple(shape), dtype, kind)
                for name, shape, dtype, kind in manifest["tensors"] if _owned(name)}
    with torch.device("meta"):
        heads = UniGeoSegHeads(HeadsConfig())
    params = dict(heads.named_parameters())
    actual = {name: (tuple(t.shape), str(t.dtype).removeprefix("torch."),
                     "param" if name in params else "buffer")
              for name, t in heads.state_dict().items()}
    assert sorted(set(expected) - set(actual)) == []  # missing here
    assert sorted(set(actual) - set(expected)) == []  # extra here
    assert {k: (v, expected[k]) for k, v in actual.items() if expected[k] != v} == {}
    # the manifest's notes on these names agree too
    odd_dtypes = {n: dt for n, dt in manifest["tensors_with_non_default_dtype_as_constructed"]
                  if _owned(n)}
    assert odd_dtypes == {n: v[1] for n, v in actual.items() if v[1] != "float32"}
    assert {n for n, _ in manifest["unused_in_forward"] if _owned(n)} <= set(actual)


def test_views_share_the_registered_modules(heads):
    assert heads.text_enhancement.ref_attn is heads.ref_attn
    assert heads.seg_pooling.ref_attn is heads.ref_attn
    assert heads.seg_pooling.lkm.global_latents is heads.global_latents
    assert heads.seg_query_builder.d_layers is heads.d_layers
    # a view built after the parameters were replaced sees the new ones
    heads.to_empty(device="cpu")
    assert heads.latent_memory.global_latents is heads.global_latents


# --- (b) TATE -------------------------------------------------------------------------------

def test_tate_referring_scales_each_token(heads):
    e = torch.randn(7, D, dtype=torch.float64)
    out = heads.enhance_template(e, "referring")
    assert out.shape == e.shape
    torch.testing.assert_close(out, _ref_branch(heads, e))


def test_tate_reasoning_broadcasts_one_vector(heads):
    e = torch.randn(5, D, dtype=torch.float64)
    out = heads.enhance_template(e, "reasoning")
    torch.testing.assert_close(out, _reason_vector(heads, e).expand(5, D))


@pytest.mark.parametrize(("coords", "rows"), [
    (None, [[0, 0, 0, 0]]),
    (torch.empty(0, 2), [[0, 0, 0, 0]]),
    (torch.tensor([0.25, 0.5]), [[0.25, 0.5, 0, 0]]),
    (torch.tensor([[0.1, 0.2], [0.3, 0.4], [0.5, 0.6]]),
     [[0.1, 0.2, 0, 0], [0.3, 0.4, 0, 0], [0.5, 0.6, 0, 0]]),
    (torch.tensor([0.434, 0.113, 0.717, 0.287]), [[0.434, 0.113, 0.717, 0.287]]),
])
def test_tate_interactive_fuses_padded_coordinates(heads, coords, rows):
    rows = torch.tensor(rows, dtype=torch.float64)
    torch.testing.assert_close(pad_coords(coords, torch.device("cpu"), torch.float64), rows)
    e = torch.randn(6, D, dtype=torch.float64)
    out = heads.enhance_template(e, "interactive", coords)
    torch.testing.assert_close(out, _intera_branch(heads, e, rows))


def test_tate_interactive_clips_coordinates_to_the_chunk(heads):
    e = torch.randn(2, D, dtype=torch.float64)
    coords = torch.rand(3, 2, dtype=torch.float64)
    expected = _intera_branch(heads, e, pad_coords(coords, e.device, e.dtype))
    torch.testing.assert_close(heads.enhance_template(e, "interactive", coords), expected)


def test_the_one_hot_code_numbers_the_vocabulary_tasks_in_the_official_order():
    assert set(TASK_ONE_HOT) == set(TASKS)
    assert [task_index(task) for task in ("referring", "reasoning", "interactive")] == [0, 1, 2]


def test_tate_selects_one_branch_by_task(heads):
    e = torch.randn(4, D, dtype=torch.float64)
    box = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    branches = {"referring": _ref_branch(heads, e),
                "reasoning": _reason_vector(heads, e).expand(4, D),
                "interactive": _intera_branch(heads, e, box[None])}
    for task in TASKS:
        torch.testing.assert_close(heads.enhance_template(e, task, box), branches[task])
    with pytest.raises(ValueError, match="unknown task"):
        heads.enhance_template(e, "ref")
    # every branch's parameters get gradients whatever the task (all branches run)
    heads.enhance_template(e, "referring", box).sum().backward()
    assert heads.enhanced_reasoning_pooling.fusion.weight.grad is not None
    assert heads.intera_fuse.weight.grad is not None


def test_tate_batch_is_per_sample(heads):
    chunks = [torch.randn(n, D, dtype=torch.float64) for n in (3, 5, 4)]
    tasks = ["interactive", "referring", "reasoning"]
    coords = [torch.tensor([0.5, 0.5]), None, None]
    batch = heads.text_enhancement.forward_batch(chunks, tasks, coords)
    for out, e, t, c in zip(batch, chunks, tasks, coords, strict=True):
        torch.testing.assert_close(out, heads.enhance_template(e, t, c))


def test_tate_runs_bf16_constructed_layers_in_the_input_dtype():
    torch.manual_seed(0)
    cfg = HeadsConfig(hidden=16, reason_queries=2)  # legacy_dtype bfloat16, as released
    tate = TaskAwareTextEnhancement.from_config(cfg).eval()
    assert tate.intera_fuse.weight.dtype == torch.bfloat16
    e = torch.randn(3, 16)
    out = tate(e, "interactive", torch.tensor([0.2, 0.7]))
    assert out.dtype == torch.float32
    z = torch.zeros_like(e)
    z[0] = tate.intera_coord_project.weight.float() @ torch.tensor([0.2, 0.7, 0, 0]) \
        + tate.intera_coord_project.bias.float()
    fuse = tate.intera_fuse
    expected = torch.cat([e, z], 1) @ fuse.weight.float().T + fuse.bias.float()
    torch.testing.assert_close(out, expected)


# --- (b) SEG pooling and LKM ------------------------------------------------------------------

@pytest.mark.parametrize(("task", "lam"), [("referring", 0.2), ("reasoning", 0.2),
                                           ("interactive", 0.0)])
def test_lkm_formula(heads, task, lam):
    p = torch.randn(D, dtype=torch.float64)
    out = heads.latent_memory(p, task)
    torch.testing.assert_close(out, _lkm(heads, p, lam))
    if lam == 0.0:
        torch.testing.assert_close(out, p)
    batch = torch.randn(3, D, dtype=torch.float64)
    torch.testing.assert_close(heads.latent_memory(batch, task),
                               torch.stack([_lkm(heads, b, lam) for b in batch]))


def test_seg_pooling_uses_the_shared_query_and_first_task(heads):
    s1, s2 = torch.randn(4, D, dtype=torch.float64), torch.randn(2, D, dtype=torch.float64)
    out = heads.seg_pooling([s1, s2], ["referring", "interactive"])
    for o, s in zip(out, (s1, s2), strict=True):
        p = _softmax_pool(heads.ref_attn.query[0], s) @ s
        assert o.shape == (s.shape[0] + 1, D)
        torch.testing.assert_close(o[0], _lkm(heads, p, 0.2))  # λ of tasks[0] for both
        torch.testing.assert_close(o[1:], s)
    # the query is the one TATE's referring branch uses
    with torch.no_grad():
        heads.ref_attn.query.mul_(3.0)
    p = _softmax_pool(heads.ref_attn.query[0], s1) @ s1
    torch.testing.assert_close(heads.seg_pooling([s1], ["interactive"])[0][0], p)


def test_seg_pooling_of_no_states_is_zero(heads):
    empty = torch.empty(0, D, dtype=torch.float64)
    (out,) = heads.seg_pooling([empty], ["reasoning"])
    assert out.shape == (1, D) and out.dtype == torch.float64
    assert torch.equal(out, torch.zeros(1, D, dtype=torch.float64))


# --- (b) D_Projector and SEG query ----------------------------------------------------------

def test_description_projector_depends_on_latent_zero_and_media_only(heads):
    dp = heads.d_layers
    latents = torch.randn(1, 5, TINY.proj_dim, dtype=torch.float64)
    media = torch.randn(1, 9, TINY.proj_dim, dtype=torch.float64)
    out = dp(latents, media)
    assert out.shape == (1, 1, TINY.proj_dim)
    torch.testing.assert_close(out[0, 0], _perceiver(dp, latents[0], media[0]))
    other = latents.clone()
    other[:, 1:] = torch.randn(1, 4, TINY.proj_dim, dtype=torch.float64)
    torch.testing.assert_close(dp(other, media), out)
    torch.testing.assert_close(dp(latents[:, :1], media), out)
    changed = latents.clone()  # (not a constant shift: every LayerNorm would undo that)
    changed[:, 0] = torch.randn(TINY.proj_dim, dtype=torch.float64)
    assert not torch.allclose(dp(changed, media), out)
    assert not torch.allclose(dp(latents, torch.randn_like(media)), out)


def test_seg_query_builder_formula_and_shape(heads):
    b, hw = 3, (2, 3)
    seg_states = [torch.randn(n, D, dtype=torch.float64) for n in (4, 2, 6)]
    res5 = torch.randn(b, TINY.vision_dim, *hw, dtype=torch.float64)
    out = heads.seg_query_builder(seg_states, res5)
    assert out.shape == (b, 1, TINY.seg_dim)
    for i, s in enumerate(seg_states):  # official: d_layers on text_projector([p'; S])
        lat = s @ heads.text_projector.weight.T + heads.text_projector.bias
        tokens = res5[i].flatten(1).T  # C H W -> HW C
        vis = tokens @ heads.local_project.weight.T + heads.local_project.bias
        origin = heads.origin_SEG_token_projector(s[0])
        seg = heads.SEG_token_projector(torch.cat([origin, _perceiver(heads.d_layers, lat, vis)]))
        torch.testing.assert_close(out[i, 0], seg)
    # rows of S other than p' do not matter
    shuffled = [torch.cat([s[:1], torch.randn_like(s[1:])]) for s in seg_states]
    torch.testing.assert_close(heads.seg_query_builder(shuffled, res5), out)
    with pytest.raises(ValueError, match="res5"):
        heads.seg_query_builder(seg_states, res5[:2])


def test_build_seg_query_end_to_end_shape():
    torch.manual_seed(0)
    cfg = HeadsConfig(hidden=16, vision_dim=8, proj_dim=8, dproj_heads=2, dproj_dim_head=4)
    heads = UniGeoSegHeads(cfg).float()
    states = [torch.randn(n, 16) for n in (3, 1)]
    out = heads.build_seg_query(states, ["reasoning", "reasoning"], torch.randn(2, 8, 4, 4))
    assert out.shape == (2, 1, 256)
    builder = SegQueryBuilder.from_config(cfg)
    assert builder(heads.seg_pooling(states, ["referring"] * 2), torch.randn(2, 8, 4, 4)).shape \
        == (2, 1, 256)


def test_config_rejects_bad_lambdas():
    with pytest.raises(ValueError, match="keys"):
        HeadsConfig(lkm_lambda={"ref": 0.2, "reason": 0.2, "intera": 0.0})
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        HeadsConfig(lkm_lambda={"referring": 1.5, "reasoning": 0.2, "interactive": 0.0})
