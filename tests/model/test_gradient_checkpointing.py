"""Gradient checkpointing: off by default, same outputs and gradients when on, and no
checkpointing under no_grad inference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torch.utils.checkpoint

from unigeoseg_backend.model.prompting import IGNORE_INDEX, build_prompt
from unigeoseg_backend.model.registry import get_config, tiny_tokenizer
from unigeoseg_backend.model.unigeoseg import UniGeoSeg

TINY = "unigeoseg-tiny-sparseconv"
EVERYWHERE = {"language": True, "vision_tower": True, "mask_decoder": True}


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def _model() -> UniGeoSeg:
    torch.manual_seed(3)
    model = UniGeoSeg(get_config(TINY)).train()
    model.set_trainable(vision_tower=True)  # Swin too, so its checkpointed stages get grads
    return model


def _inputs(model: UniGeoSeg, tokenizer) -> tuple[torch.Tensor, list]:
    generator = torch.Generator().manual_seed(4)
    size = model.config.image_size
    images = torch.randn(2, 3, size, size, generator=generator)
    prompts = [build_prompt("reasoning", "areas where people could swim", tokenizer,
                            answer="the water is calm"),
               build_prompt("referring", "the red roof", tokenizer)]  # different lengths
    return images, prompts


def _step(model: UniGeoSeg, images, prompts):
    """One training forward and backward (dropout on: same seed each time)."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(5)
    outputs = model(images, prompts, compute_lm_logits=True)
    target = torch.zeros_like(outputs.mask_logits[-1])
    loss = sum(F.binary_cross_entropy_with_logits(m, target) for m in outputs.mask_logits)
    loss = loss + F.cross_entropy(outputs.lm_logits.flatten(0, 1), outputs.lm_labels.flatten(),
                                  ignore_index=IGNORE_INDEX)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return outputs, grads


def _counting_checkpoint(monkeypatch) -> list[int]:
    calls: list[int] = []
    real = torch.utils.checkpoint.checkpoint

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counting)
    return calls


def test_checkpointing_is_off_by_default():
    model = UniGeoSeg(get_config(TINY))
    assert model.gradient_checkpointing_state == dict.fromkeys(EVERYWHERE, False)


def test_checkpointed_outputs_and_gradients_equal_the_plain_ones(tokenizer, monkeypatch):
    model = _model()
    images, prompts = _inputs(model, tokenizer)
    plain_outputs, plain_grads = _step(model, images, prompts)

    calls = _counting_checkpoint(monkeypatch)
    model.set_gradient_checkpointing(True, vision_tower=True, mask_decoder=True)
    assert model.gradient_checkpointing_state == EVERYWHERE
    outputs, grads = _step(model, images, prompts)
    config = model.config
    assert len(calls) == (config.language["num_hidden_layers"] + len(config.swin.depths)
                          + config.mask_decoder.num_layers)

    for plain, checkpointed in zip(plain_outputs.mask_logits, outputs.mask_logits, strict=True):
        torch.testing.assert_close(checkpointed, plain, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(outputs.lm_logits, plain_outputs.lm_logits, rtol=1e-6, atol=1e-6)
    assert torch.equal(outputs.lm_labels, plain_outputs.lm_labels)
    assert grads.keys() == plain_grads.keys()
    assert any(n.startswith("model.vision_tower.layers.") for n in grads)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, plain_grads[name], rtol=1e-5, atol=1e-6, msg=name)

    model.set_gradient_checkpointing(False)
    assert model.gradient_checkpointing_state == dict.fromkeys(EVERYWHERE, False)


def test_checkpointing_is_ignored_under_no_grad(tokenizer, monkeypatch):
    model = _model()
    images, prompts = _inputs(model, tokenizer)
    model.eval()
    with torch.no_grad():
        plain = model.segment(model.encode_images(images), prompts)
    model.set_gradient_checkpointing(True, vision_tower=True, mask_decoder=True)
    calls = _counting_checkpoint(monkeypatch)
    model.train()  # even in training mode, no_grad runs every layer as it is
    with torch.no_grad():
        model(images, prompts, compute_lm_logits=True)
    model.eval()
    with torch.no_grad():
        checkpointed = model.segment(model.encode_images(images), prompts)
    assert calls == []
    assert torch.equal(checkpointed, plain)
