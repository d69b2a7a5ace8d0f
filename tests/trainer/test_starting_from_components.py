"""A run started from pretrained parts (``model.swin``, ``model.language``) with gradient
checkpointing: the parts arrive, the vocabulary follows Phi's tokenizer, the export loads."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from training_runs import TINY, synthetic_chips, tiny_sections, write_config, write_local_dataset
from transformers import PhiForCausalLM

from unigeoseg_backend.model.checkpoint import clear_cache, load_released
from unigeoseg_backend.model.language import phi_config_from_official
from unigeoseg_backend.model.registry import get_config, tiny_tokenizer
from unigeoseg_backend.model.unigeoseg import UniGeoSeg
from unigeoseg_trainer.config import ConfigError, load_config
from unigeoseg_trainer.train import prepare, run_loop

SWIN = "model.vision_tower."


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """A Mask2Former-style file holding a Swin (``backbone.*``, safetensors) and a
    transformers Phi folder with a tokenizer lacking [PAD] and [SEG] (as microsoft/phi-1_5)."""
    folder = tmp_path_factory.mktemp("parts")
    torch.manual_seed(21)
    donor = UniGeoSeg(get_config(TINY))
    swin = {"backbone." + name[len(SWIN):]: tensor.contiguous()
            for name, tensor in donor.state_dict().items() if name.startswith(SWIN)}
    save_file(swin, str(folder / "mask2former_swin.safetensors"))
    base = tiny_tokenizer(with_special_tokens=False)
    torch.manual_seed(22)
    phi = PhiForCausalLM(phi_config_from_official(
        dict(get_config(TINY).language, vocab_size=len(base) + 24)))
    phi.save_pretrained(folder / "phi-1_5")
    base.save_pretrained(folder / "phi-1_5")
    return folder, swin, phi, len(base)


def _config(tmp_path, parts, **model):
    folder = parts[0]
    chips = write_local_dataset(tmp_path / "chips", *synthetic_chips(count=2))
    sections = tiny_sections(tmp_path / "out", run={"max_steps": 2},
                             model={"swin": folder / "mask2former_swin.safetensors",
                                    "language": folder / "phi-1_5",
                                    "gradient_checkpointing": True, **model})
    return write_config(tmp_path / "run.toml", sections,
                        [{"name": "local", "root": chips, "split": "train"}])


def test_a_run_starts_from_swin_and_phi_files_with_gradient_checkpointing(tmp_path, parts):
    _, swin, phi, base_tokens = parts
    run = prepare(load_config(_config(tmp_path, parts)))
    state = run.model.state_dict()
    for name, tensor in swin.items():
        assert torch.equal(state[SWIN + name[len("backbone."):]], tensor), name
    assert len(run.tokenizer) == base_tokens + 2                 # [PAD] and [SEG] added
    embeddings = state["model.embed_tokens.weight"]
    assert embeddings.shape[0] == len(run.tokenizer)
    assert torch.equal(embeddings[:base_tokens], phi.model.embed_tokens.weight[:base_tokens])
    assert torch.equal(state["model.layers.1.mlp.fc2.weight"],
                       phi.model.layers[1].mlp.fc2.weight)
    assert run.model.gradient_checkpointing_state["language"]

    exported = run_loop(run)
    loaded = load_released(exported, device="cpu", dtype=torch.float32)
    clear_cache(exported)
    assert loaded.model.config.language["vocab_size"] == len(run.tokenizer)


def test_parts_with_a_released_starting_point_are_a_config_error(tmp_path, parts):
    path = _config(tmp_path, parts, architecture="", init=tmp_path)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.key == "model.swin"
