"""UniGeoSeg from components: Swin and the mask decoders from a detectron2 Mask2Former
checkpoint (a numpy pickle), Phi-1.5 from a transformers folder; strict, name-reporting."""

from __future__ import annotations

import pickle
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from transformers import PhiForCausalLM

from unigeoseg_backend.errors import WeightsError
from unigeoseg_backend.model.components import build_from_components, load_mask2former
from unigeoseg_backend.model.language import phi_config_from_official
from unigeoseg_backend.model.prompting import PAD_TOKEN, build_prompt, seg_token_id
from unigeoseg_backend.model.registry import tiny_config, tiny_tokenizer
from unigeoseg_backend.model.unigeoseg import UniGeoSeg

BASE_TOKENS = len(tiny_tokenizer(with_special_tokens=False))
CONFIG = tiny_config("SparseConv_1", vocab_size=BASE_TOKENS + 2)  # + [PAD], [SEG]
PHI_ROWS = BASE_TOKENS + 24  # Phi-1.5 has more rows (51200) than tokens (50295)

#: Mask2Former's names of the tensors that do not follow the prefix rule, as detectron2
#: writes them (Conv2d with a norm), against this model's.
DETECTRON2_CONVS = {
    "pixel_decoder.adapter_1.0.weight": "sem_seg_head.pixel_decoder.adapter_1.weight",
    "pixel_decoder.adapter_1.1.weight": "sem_seg_head.pixel_decoder.adapter_1.norm.weight",
    "pixel_decoder.adapter_1.1.bias": "sem_seg_head.pixel_decoder.adapter_1.norm.bias",
    "pixel_decoder.layer_1.0.weight": "sem_seg_head.pixel_decoder.layer_1.weight",
    "pixel_decoder.layer_1.1.weight": "sem_seg_head.pixel_decoder.layer_1.norm.weight",
    "pixel_decoder.layer_1.1.bias": "sem_seg_head.pixel_decoder.layer_1.norm.bias",
}
#: This model's tensors a Mask2Former checkpoint has not (no conv bias under a norm, and
#: UniGeoSeg's additions to the decoder).
ABSENT_FROM_MASK2FORMER = ("pixel_decoder.adapter_1.0.bias", "pixel_decoder.layer_1.0.bias",
                           "predictor.SEG_query_embed.", "predictor.new_query_embed.",
                           "predictor.SEG_proj.", "predictor.CLASS_proj.")
QKV = "backbone.layers.0.blocks.0.attn.qkv.weight"


def _detectron2_name(name: str) -> str | None:
    """How a Mask2Former checkpoint names this model's tensor (None: it has no such tensor)."""
    if name in DETECTRON2_CONVS:
        return DETECTRON2_CONVS[name]
    if any(name == p or (p.endswith(".") and name.startswith(p)) for p in ABSENT_FROM_MASK2FORMER):
        return None
    for ours, theirs in (("model.vision_tower.", "backbone."),
                         ("pixel_decoder.", "sem_seg_head.pixel_decoder."),
                         ("predictor.", "sem_seg_head.predictor.")):
        if name.startswith(ours):
            return theirs + name[len(ours):]
    return None


@pytest.fixture(scope="module")
def donor() -> UniGeoSeg:
    """The "pretrained" weights the files are written from."""
    torch.manual_seed(11)
    return UniGeoSeg(CONFIG)


@pytest.fixture(scope="module")
def mask2former_arrays(donor) -> dict[str, np.ndarray]:
    """A Mask2Former state dict as detectron2's model zoo pickles it: numpy arrays."""
    arrays = {}
    for name, tensor in donor.state_dict().items():
        theirs = _detectron2_name(name)
        if theirs is not None:
            arrays[theirs] = tensor.numpy().copy()
    hidden = CONFIG.mask_decoder.hidden_dim
    arrays["sem_seg_head.predictor.class_embed.weight"] = np.ones((81, hidden), np.float32)
    arrays["sem_seg_head.predictor.class_embed.bias"] = np.ones(81, np.float32)
    arrays["criterion.empty_weight"] = np.ones(81, np.float32)  # not UniGeoSeg's: not read
    return arrays


def _write_pickle(path: Path, arrays: dict[str, np.ndarray]) -> Path:
    with open(path, "wb") as f:
        pickle.dump({"model": arrays, "__author__": "tests", "matching_heuristics": True}, f)
    return path


@pytest.fixture(scope="module")
def mask2former_pkl(tmp_path_factory, mask2former_arrays) -> Path:
    return _write_pickle(tmp_path_factory.mktemp("m2f") / "model_final.pkl", mask2former_arrays)


@pytest.fixture(scope="module")
def phi_donor() -> PhiForCausalLM:
    torch.manual_seed(12)
    return PhiForCausalLM(phi_config_from_official(dict(CONFIG.language, vocab_size=PHI_ROWS)))


@pytest.fixture(scope="module")
def phi_dir(tmp_path_factory, phi_donor) -> Path:
    """A transformers Phi folder: save_pretrained weights, config and a tokenizer without
    [PAD] and [SEG] (as microsoft/phi-1_5)."""
    folder = tmp_path_factory.mktemp("phi") / "phi-1_5"
    phi_donor.save_pretrained(folder)
    tiny_tokenizer(with_special_tokens=False).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def built(mask2former_pkl, phi_dir):
    torch.manual_seed(13)
    return build_from_components(CONFIG, swin_path=mask2former_pkl,
                                 mask2former_path=mask2former_pkl, language_dir=phi_dir)


def test_mask2former_tensors_arrive_under_our_names(built, mask2former_arrays):
    state = built.model.state_dict()
    for name in state:
        theirs = _detectron2_name(name)
        if theirs is not None:
            assert torch.equal(state[name], torch.from_numpy(mask2former_arrays[theirs])), name
    assert torch.equal(state["pixel_decoder.adapter_1.0.weight"], torch.from_numpy(
        mask2former_arrays["sem_seg_head.pixel_decoder.adapter_1.weight"]))

    reports = {report.part: report for report in built.reports}
    assert list(reports) == ["vision_tower", "pixel_decoder", "predictor", "language"]
    assert set(reports["vision_tower"].loaded) == {
        n for n in state if n.startswith("model.vision_tower.")}
    assert "pixel_decoder.adapter_1.0.bias" in reports["pixel_decoder"].initialised
    assert "predictor.SEG_proj.layers.0.weight" in reports["predictor"].initialised
    assert reports["predictor"].unused == ("sem_seg_head.predictor.class_embed.bias",
                                           "sem_seg_head.predictor.class_embed.weight")


def test_what_no_file_provides_keeps_its_initialisation(built):
    torch.manual_seed(13)
    fresh = UniGeoSeg(CONFIG).state_dict()  # the same random start as the build
    state = built.model.state_dict()
    random = built.random_parameters()
    assert set(random) == {"connector", "heads", "pixel_decoder", "mask_decoder"}
    assert random["pixel_decoder"] == ["pixel_decoder.adapter_1.0.bias",
                                       "pixel_decoder.layer_1.0.bias"]
    for names in random.values():
        for name in names:
            assert torch.equal(state[name], fresh[name]), name
    summary = built.summary()
    assert "randomly initialised: " in summary and "connector" in summary


def test_phi_loads_with_the_vocabulary_resized_like_the_official_script(built, phi_donor):
    state, phi = built.model.state_dict(), phi_donor.state_dict()
    for name in ("model.layers.1.self_attn.q_proj.weight", "model.layers.0.mlp.fc2.bias",
                 "model.final_layernorm.weight"):
        assert torch.equal(state[name], phi[name]), name
    tokenizer = built.tokenizer
    assert len(tokenizer) == CONFIG.language["vocab_size"]
    assert tokenizer.convert_tokens_to_ids(PAD_TOKEN) == BASE_TOKENS
    assert seg_token_id(tokenizer) == BASE_TOKENS + 1
    for ours in ("model.embed_tokens.weight", "lm_head.weight"):
        rows, original = state[ours], phi[ours]
        assert rows.shape[0] == BASE_TOKENS + 2
        assert torch.equal(rows[:BASE_TOKENS], original[:BASE_TOKENS])
        torch.testing.assert_close(rows[BASE_TOKENS], original[:BASE_TOKENS].mean(dim=0))
        assert not torch.equal(rows[BASE_TOKENS + 1], rows[BASE_TOKENS])  # [SEG]: random
    report = built.reports[-1]
    assert report.unused == ("lm_head.bias",)  # UniGeoSeg's lm_head has no bias
    assert "[PAD] = their mean" in report.notes[0]

    model = built.model.eval()
    images = torch.zeros(1, 3, CONFIG.image_size, CONFIG.image_size)
    prompt = build_prompt("referring", "the red roof", tokenizer)
    logits = model.segment(model.encode_images(images), [prompt])
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("kind", ["pth", "safetensors"])
def test_swin_from_pth_and_safetensors_equals_the_pickle(tmp_path, kind, mask2former_arrays):
    backbone = {n: torch.from_numpy(a) for n, a in mask2former_arrays.items()
                if n.startswith("backbone.")}
    if kind == "pth":
        path = tmp_path / "model_final.pth"
        torch.save({"model": backbone, "iteration": 90000}, path)
    else:
        path = tmp_path / "swin.safetensors"
        save_file(backbone, str(path))
    build = build_from_components(CONFIG, swin_path=path)
    state = build.model.state_dict()
    for name, tensor in backbone.items():
        assert torch.equal(state["model.vision_tower." + name[len("backbone."):]], tensor)
    assert [r.part for r in build.reports] == ["vision_tower"] and build.tokenizer is None


def test_a_pickle_with_any_other_global_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "model_final.pkl"
    # A hand-written protocol-0 pickle: {"model": os.system("touch <marker>")}.
    path.write_bytes(f"(dp0\nS'model'\np1\ncos\nsystem\n(S'touch {marker}'\ntRs.".encode())
    refusal = rf"refusing to load os\.system from {re.escape(str(path))}"
    with pytest.raises(WeightsError, match=refusal):
        build_from_components(CONFIG, swin_path=path)
    assert not marker.exists()


def test_a_missing_or_unexpected_tensor_is_named(tmp_path, mask2former_arrays):
    model = UniGeoSeg(CONFIG)
    missing = _write_pickle(tmp_path / "missing.pkl",
                            {n: a for n, a in mask2former_arrays.items() if n != QKV})
    with pytest.raises(WeightsError, match=rf"1 missing \({QKV}\)") as caught:
        load_mask2former(model, missing, ("vision_tower",))
    assert caught.value.details["missing_keys"] == [QKV]

    extra = "sem_seg_head.predictor.extra_head.weight"
    unexpected = _write_pickle(tmp_path / "unexpected.pkl",
                               {**mask2former_arrays, extra: np.zeros(3, np.float32)})
    with pytest.raises(WeightsError, match=rf"1 unexpected \({extra}\)"):
        load_mask2former(model, unexpected, ("pixel_decoder", "predictor"))


def test_a_language_folder_that_does_not_fit_is_refused(phi_dir):
    deeper = replace(CONFIG, language=dict(CONFIG.language, num_hidden_layers=3))
    with pytest.raises(WeightsError, match="num_hidden_layers 2 instead of 3"):
        build_from_components(deeper, language_dir=phi_dir)
    smaller = tiny_config("SparseConv_1", vocab_size=BASE_TOKENS)
    with pytest.raises(WeightsError, match=r"the tokenizer has \d+ tokens with \[PAD\] and "
                                           r"\[SEG\], the model's vocabulary \d+"):
        build_from_components(smaller, language_dir=phi_dir)


def test_the_old_static_query_name_loads_as_query_feat(tmp_path, mask2former_arrays):
    arrays = dict(mask2former_arrays)
    queries = arrays.pop("sem_seg_head.predictor.query_feat.weight")
    path = _write_pickle(tmp_path / "maskformer.pkl",
                         {**arrays, "sem_seg_head.predictor.static_query.weight": queries})
    model = UniGeoSeg(CONFIG)
    load_mask2former(model, path, ("predictor",))
    assert torch.equal(model.predictor.query_feat.weight.detach(), torch.from_numpy(queries))
