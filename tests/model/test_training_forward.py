"""The training forward: same masks as inference, padded batches, labels, and gradients."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from unigeoseg_backend.model.preprocess import letterbox_image
from unigeoseg_backend.model.prompting import IGNORE_INDEX, PromptTemplate, build_prompt
from unigeoseg_backend.model.registry import get_config, tiny_tokenizer
from unigeoseg_backend.model.unigeoseg import UNUSED_PARAMETERS, UniGeoSeg

TINY = "unigeoseg-tiny-sparseconv"
ANSWER = "the water is calm"


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return UniGeoSeg(get_config(TINY)).eval(), tiny_tokenizer()


def _images(model: UniGeoSeg, count: int) -> torch.Tensor:
    rng = np.random.default_rng(0)
    tiles = [(rng.random((96, 128, 3)) * 255).astype(np.uint8) for _ in range(count)]
    return torch.stack([letterbox_image(t, size=model.config.image_size)[0] for t in tiles])


def test_the_last_mask_logits_are_those_of_segment(tiny):
    model, tokenizer = tiny
    images = _images(model, 2)
    prompts = [build_prompt("reasoning", "areas where people could swim", tokenizer,
                            answer=ANSWER),
               build_prompt("referring", "the red roof", tokenizer,
                            template=PromptTemplate.REFSEGRS)]
    with torch.no_grad():
        outputs = model(images, prompts)
        inferred = model.segment(model.encode_images(images), prompts)
    size = model.config.image_size // 4
    assert len(outputs.mask_logits) == model.config.mask_decoder.num_layers + 1
    assert all(m.shape == (2, 1, size, size) for m in outputs.mask_logits)
    # The forward runs the reasoning prompt to its end (answer text), inference stops after
    # <refer>: causal attention makes the SEG states equal up to rounding.
    torch.testing.assert_close(outputs.mask_logits[-1], inferred, atol=1e-5, rtol=1e-5)


def test_a_padded_batch_equals_each_prompt_alone(tiny):
    model, tokenizer = tiny
    images = _images(model, 2)
    short = build_prompt("referring", "pond", tokenizer, answer="it is wet")
    long = build_prompt("reasoning", "the warehouse with the blue roof next to the yard",
                        tokenizer, answer=ANSWER)
    with torch.no_grad():
        batched = model(images, [short, long])
        alone = [model(images[i:i + 1], [p]) for i, p in enumerate((short, long))]
    lengths = [a.lm_logits.shape[1] for a in alone]
    assert lengths[0] != lengths[1] and batched.lm_logits.shape[1] == max(lengths)
    for i, single in enumerate(alone):
        for stage_batched, stage_alone in zip(batched.mask_logits, single.mask_logits,
                                              strict=True):
            torch.testing.assert_close(stage_batched[i:i + 1], stage_alone,
                                       atol=1e-5, rtol=1e-5)
        real = lengths[i]
        torch.testing.assert_close(batched.lm_logits[i, :real], single.lm_logits[0],
                                   atol=1e-5, rtol=1e-5)
        assert torch.equal(batched.lm_labels[i, :real], single.lm_labels[0])
        assert (batched.lm_labels[i, real:] == IGNORE_INDEX).all()


def test_labels_are_the_next_tokens_of_the_response(tiny):
    model, tokenizer = tiny
    prompt = build_prompt("reasoning", "areas where people could swim", tokenizer,
                          answer=ANSWER)
    with torch.no_grad():
        outputs = model(_images(model, 1), [prompt])
    labels = outputs.lm_labels[0]
    assert outputs.lm_logits.shape == (1, labels.shape[0], model.config.language["vocab_size"])
    assert labels[-1] == IGNORE_INDEX
    learnt = labels[labels != IGNORE_INDEX].tolist()
    text = tokenizer.decode(learnt)
    assert text == f" Sure, It is . \n{ANSWER}[SEG]. <|endoftext|>"  # the official labels
    assert "swim" not in text  # the instruction is the user's turn: not learnt

    # a prompt whose template trains no text (refer_seg) gives no LM output by default,
    # and all-ignored labels when the logits are asked for
    refer = build_prompt("referring", "the pond", tokenizer, template=PromptTemplate.RRSISD)
    with torch.no_grad():
        assert model(_images(model, 1), [refer]).lm_logits is None
        forced = model(_images(model, 1), [refer], compute_lm_logits=True)
    assert forced.lm_logits is not None and (forced.lm_labels == IGNORE_INDEX).all()


def test_gradients_reach_every_trained_parameter_and_not_swin():
    torch.manual_seed(1)
    model = UniGeoSeg(get_config(TINY)).train()
    tokenizer = tiny_tokenizer()
    model.set_trainable()
    prompts = [build_prompt("interactive", "Please segment the region/target corresponding to "
                            "the point [0.250,0.500].", tokenizer, answer="a field"),
               build_prompt("reasoning", "areas where people could swim", tokenizer,
                            answer=ANSWER)]
    outputs = model(_images(model, 2), prompts)
    target = torch.zeros_like(outputs.mask_logits[-1])
    loss = sum(F.binary_cross_entropy_with_logits(m, target) for m in outputs.mask_logits)
    loss = loss + F.cross_entropy(outputs.lm_logits.flatten(0, 1), outputs.lm_labels.flatten(),
                                  ignore_index=IGNORE_INDEX)
    loss.backward()

    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    without = sorted(n for n, p in trained.items() if p.grad is None)
    assert without == []
    frozen = {n: p for n, p in model.named_parameters() if not p.requires_grad}
    assert all(p.grad is None for p in frozen.values())
    assert {n for n in frozen if not n.startswith("model.vision_tower.")} == {
        n for n, _ in model.named_parameters() if n.startswith(UNUSED_PARAMETERS)}
    assert any(n.startswith("model.vision_tower.") for n in frozen)
    for name in ("model.mm_projector.fc.weight", "model.layers.0.self_attn.q_proj.weight",
                 "lm_head.weight", "heads.text_projector.weight", "heads.global_latents",
                 "pixel_decoder.mask_features.weight", "predictor.mask_embed.layers.0.weight"):
        assert trained[name].grad.abs().sum() > 0, name

    groups = model.trainable_parameter_groups()
    assert set(groups) == {"language", "connector", "pixel_decoder", "mask_decoder", "heads"}
    assert sorted(n for g in groups.values() for n in g) == sorted(trained)


def test_every_saved_tensor_is_a_named_parameter_or_buffer():
    model = UniGeoSeg(get_config("unigeoseg-tiny-mscc"))
    named = list(model.named_parameters(remove_duplicate=False))
    assert len({id(p) for _, p in named}) == len(named)
    buffers = {n for n, _ in model.named_buffers()}
    assert {n for n, _ in named} == set(model.state_dict()) - buffers
