"""LoRA on the language model: what trains, and the merged export.

(A LoRA run killed and resumed is bit-identical: test_resume.py.)"""

from __future__ import annotations

import pytest
import torch
from training_runs import TINY, synthetic_chips, tiny_sections, write_config, write_local_dataset

from unigeoseg_backend.model.checkpoint import clear_cache, load_released
from unigeoseg_backend.model.prompting import build_prompt
from unigeoseg_backend.model.registry import get_config
from unigeoseg_backend.model.unigeoseg import UNUSED_PARAMETERS, UniGeoSeg
from unigeoseg_trainer.config import ConfigError, LoraSettings, load_config
from unigeoseg_trainer.lora import add_lora, is_lora_parameter, merged_model
from unigeoseg_trainer.models import freeze
from unigeoseg_trainer.train import prepare, run_loop

pytest.importorskip("peft")

LORA = {"enabled": True}


def test_lora_trains_adapters_embeddings_and_heads_with_phi_frozen():
    torch.manual_seed(0)
    model = UniGeoSeg(get_config(TINY))
    freeze(model, ["swin"])
    trained_without_lora = {n for n, p in model.named_parameters() if p.requires_grad}
    settings = LoraSettings(enabled=True)
    add_lora(model, settings)

    parameters = dict(model.named_parameters())
    adapters = {n for n in parameters if is_lora_parameter(n)}
    targets = [m for name, m in model.named_modules()
               if name.startswith("model.layers.")
               and name.endswith(tuple(f"self_attn.{t}" for t in settings.target_modules))]
    layers = model.config.language["num_hidden_layers"]
    assert len(targets) == 4 * layers
    # rank x (in + out) per adapted projection: A is r x in, B is out x r
    expected_adapter_count = sum(settings.rank * (m.in_features + m.out_features)
                                 for m in targets)
    assert sum(parameters[n].numel() for n in adapters) == expected_adapter_count

    phi_base = [n for n in parameters if n.startswith(("model.layers.", "model.final_layernorm."))
                and not is_lora_parameter(n)]
    assert phi_base and not any(parameters[n].requires_grad for n in phi_base)
    trainable = {n for n, p in parameters.items() if p.requires_grad}
    fully_trained = {n for n in trained_without_lora
                     if not n.startswith(("model.layers.", "model.final_layernorm."))}
    assert {"model.embed_tokens.weight", "lm_head.weight"} <= fully_trained
    assert any(n.startswith("model.mm_projector.") for n in fully_trained)
    assert trainable == adapters | fully_trained
    assert not any(n.startswith(("model.vision_tower.", *UNUSED_PARAMETERS)) for n in trainable)
    expected_total = expected_adapter_count + sum(parameters[n].numel() for n in fully_trained)
    assert sum(parameters[n].numel() for n in trainable) == expected_total


def test_lora_with_the_language_model_frozen_is_a_config_error(tmp_path):
    chips = write_local_dataset(tmp_path / "chips", *synthetic_chips(count=2))
    sections = tiny_sections(tmp_path / "out", model={"freeze": ["swin", "language"]},
                             lora=LORA)
    path = write_config(tmp_path / "run.toml", sections,
                        [{"name": "local", "root": chips, "split": "train"}])
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.key == "lora.enabled"


def test_the_merged_export_gives_the_masks_of_the_lora_model_in_memory(tmp_path):
    chips = write_local_dataset(tmp_path / "chips", *synthetic_chips())
    sections = tiny_sections(tmp_path / "out", run={"max_steps": 6}, lora=LORA)
    config = load_config(write_config(tmp_path / "run.toml", sections,
                                      [{"name": "local", "root": chips, "split": "train"}]))
    run = prepare(config)
    exported = run_loop(run)
    adapted = run.model.eval()
    lora_b = [p for n, p in adapted.named_parameters() if ".lora_B." in n]
    assert lora_b and all(p.abs().max() > 0 for p in lora_b), "the adapters did not train"

    loaded = load_released(exported, device="cpu", dtype=torch.float32)
    clear_cache(exported)
    assert not any(is_lora_parameter(n) for n, _ in loaded.model.named_parameters())
    size = adapted.config.image_size
    images = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(3))
    prompts = [build_prompt("referring", text, run.tokenizer)
               for text in ("the water", "the blue roof on the left", "a field")]
    with torch.no_grad():
        in_memory = adapted(images, prompts).mask_logits[-1]
        from_export = loaded.model.eval()(images, prompts).mask_logits[-1]
        merged = merged_model(adapted, LoraSettings(enabled=True))
        merged_here = merged(images, prompts).mask_logits[-1]
    torch.testing.assert_close(from_export, in_memory, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(merged_here, from_export, atol=0, rtol=0)
    assert torch.equal(from_export > 0, in_memory > 0)
