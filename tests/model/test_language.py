"""Phi-1.5 conversion (4.36 fused q/k/v -> installed layout) and UniGeoSeg prompting.

Offline and CPU-only: the full-size model is built on the meta device, numerics use a tiny
Phi, and the tokenizer is a small byte-level BPE trained here.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PhiConfig, PreTrainedTokenizerFast

from unigeoseg_backend.errors import InvalidInputError, WeightsError
from unigeoseg_backend.model.conversion import (
    convert_phi_state_dict,
    extract_language_state,
    split_fused_qkv,
)
from unigeoseg_backend.model.language import build_language_model, phi_config_from_official
from unigeoseg_backend.model.prompting import (
    ANSWER_TOKEN_INDEX,
    IGNORE_INDEX,
    IMAGE_TOKEN_INDEX,
    REFER_TOKEN_INDEX,
    SEG_TOKEN_INDEX,
    PromptTemplate,
    add_special_tokens,
    build_prompt,
    interactive_instruction,
    parse_interactive_coords,
    render_prompt,
    seg_token_id,
)
from unigeoseg_protocol.vocabulary import TASKS

LM_PREFIXES = ("model.embed_tokens.", "model.layers.", "model.final_layernorm.", "lm_head.")




def tiny_config() -> PhiConfig:
    return phi_config_from_official({
        "vocab_size": 1000, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": None,
        "hidden_act": "gelu_new", "partial_rotary_factor": 0.5, "rope_theta": 10000.0,
        "rope_scaling": None, "tie_word_embeddings": False,
    })


def fuse_like_436(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows h0:q, h0:k, h0:v, h1:q, ... built by hand, block by block (weights or biases)."""
    hd = q.shape[0] // heads
    blocks = []
    for h in range(heads):
        rows = slice(h * hd, (h + 1) * hd)
        blocks += [q[rows], k[rows], v[rows]]
    return torch.cat(blocks, dim=0)


# --- (a) full-size shapes against the released checkpoint's manifest ------------------------

def test_official_config_fields(manifest):
    cfg = phi_config_from_official(manifest["config"])
    assert (cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size) == (50297, 2048, 8192)
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (24, 32, 32)
    assert cfg.hidden_act == "gelu_new" and cfg.layer_norm_eps == 1e-5
    assert cfg.rope_parameters["partial_rotary_factor"] == 0.5
    assert cfg.rope_parameters["rope_theta"] == 10000.0
    assert cfg.tie_word_embeddings is False and cfg.qk_layernorm is False


def test_manifest_lm_keys_map_onto_meta_model(manifest):
    cfg = phi_config_from_official(manifest["config"])
    with torch.device("meta"):
        model = build_language_model(cfg)
    params = {n: p for n, p in model.state_dict().items()}
    assert "lm_head.bias" not in params

    lm = {name: shape for name, shape, _dtype, _kind in manifest["tensors"]
          if name.startswith(LM_PREFIXES)}
    assert len(lm) == 1 + 240 + 2 + 1
    fake = {name: torch.empty(shape, device="meta") for name, shape in lm.items()}
    converted = convert_phi_state_dict(fake, num_heads=cfg.num_attention_heads)

    assert set(converted) == set(params)
    for name, tensor in converted.items():
        assert tensor.shape == params[name].shape, name
    numel = sum(t.numel() for t in converted.values())
    assert numel == sum(torch.Size(s).numel() for s in lm.values())
    assert numel == sum(p.numel() for p in params.values())
    per_prefix = manifest["totals"]["per_prefix"]
    assert numel == sum(per_prefix[p]["numel"] for p in
                        ("model.embed_tokens", "model.layers", "model.final_layernorm", "lm_head"))


def test_extract_language_state_leaves_multimodal_keys(manifest):
    fake = {name: torch.empty(shape, device="meta") for name, shape, _d, _k in manifest["tensors"]}
    lm = extract_language_state(fake)
    assert len(lm) == 244
    assert not any(k.startswith(("model.mm_projector", "model.vision_tower")) for k in lm)


# --- (b) numerics of the q/k/v mapping ---------------------------------------------------------

def test_fused_checkpoint_round_trip_gives_same_logits():
    torch.manual_seed(0)
    cfg = tiny_config()
    original = build_language_model(cfg).eval()
    heads = cfg.num_attention_heads

    state = {}
    for key, tensor in original.state_dict().items():
        if ".self_attn.q_proj." in key:
            base, kind = key.split(".self_attn.q_proj.")
            parts = [original.state_dict()[f"{base}.self_attn.{p}.{kind}"]
                     for p in ("q_proj", "k_proj", "v_proj")]
            state[f"{base}.self_attn.query_key_value.{kind}"] = fuse_like_436(*parts, heads)
        elif ".self_attn.k_proj." in key or ".self_attn.v_proj." in key:
            continue
        else:
            state[key] = tensor.clone()
    assert not any("q_proj" in k for k in state)
    assert state["model.layers.0.self_attn.query_key_value.weight"].shape == (192, 64)

    fresh = build_language_model(cfg).eval()
    fresh.load_state_dict(convert_phi_state_dict(state, num_heads=heads), strict=True)
    ids = torch.randint(0, cfg.vocab_size, (2, 9))
    with torch.no_grad():
        expected = original(input_ids=ids).logits
        actual = fresh(input_ids=ids).logits
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


def test_split_matches_436_split_heads_on_random_fused():
    torch.manual_seed(1)
    heads, head_dim, d_in = 4, 16, 64
    w = torch.randn(3 * heads * head_dim, d_in)
    b = torch.randn(3 * heads * head_dim)
    x = torch.randn(2, 5, d_in)  # B x T x D_in

    fused = F.linear(x, w, b).view(2, 5, heads, 3, head_dim)  # as 4.36 _split_heads
    ref = [fused[..., j, :].reshape(2, 5, heads * head_dim) for j in range(3)]

    q_w, q_b, k_w, k_b, v_w, v_b = split_fused_qkv(w, b, heads)
    for got, want in zip((F.linear(x, q_w, q_b), F.linear(x, k_w, k_b), F.linear(x, v_w, v_b)),
                         ref, strict=True):
        torch.testing.assert_close(got, want)
    # ... and not the naive [Q | K | V] reading
    assert not torch.allclose(q_w, w[: heads * head_dim])


def test_split_checkpoint_untouched_and_loaded_strictly():
    torch.manual_seed(2)
    model = build_language_model(tiny_config())
    state = model.state_dict()
    converted = convert_phi_state_dict(state, num_heads=4)
    assert converted.keys() == state.keys()
    assert all(converted[k] is state[k] for k in state)
    build_language_model(tiny_config()).load_state_dict(converted, strict=True)


def test_unmappable_and_conflicting_keys_are_named():
    model = build_language_model(tiny_config())
    state = dict(model.state_dict())
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.zeros(8)  # dropped silently
    assert "model.layers.0.self_attn.rotary_emb.inv_freq" not in convert_phi_state_dict(
        state, num_heads=4)

    bad = dict(state, **{"model.layers.0.attn.c_attn.weight": torch.zeros(1),
                         "transformer.h.0.ln.weight": torch.zeros(1)})
    with pytest.raises(WeightsError) as info:
        convert_phi_state_dict(bad, num_heads=4)
    assert info.value.details["unmapped_keys"] == ["model.layers.0.attn.c_attn.weight",
                                                   "transformer.h.0.ln.weight"]
    assert "transformer.h.0.ln.weight" in str(info.value)

    both = dict(state)
    both["model.layers.1.self_attn.query_key_value.weight"] = torch.zeros(192, 64)
    with pytest.raises(WeightsError, match="more than once"):
        convert_phi_state_dict(both, num_heads=4)

    with pytest.raises(WeightsError, match="3\\*num_heads"):
        split_fused_qkv(torch.zeros(190, 64), None, 4)

    # a fused bias converts on its own (the loader converts tensor by tensor)
    alone = convert_phi_state_dict(
        {"model.layers.0.self_attn.query_key_value.bias": torch.arange(192.0)}, num_heads=4)
    assert sorted(alone) == [f"model.layers.0.self_attn.{p}_proj.bias" for p in "kqv"]


def test_config_errors():
    with pytest.raises(WeightsError, match="hidden_size"):
        phi_config_from_official({"vocab_size": 10})
    good = {"vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
            "num_hidden_layers": 1, "num_attention_heads": 2}
    with pytest.raises(WeightsError, match="rope_scaling"):
        phi_config_from_official(dict(good, rope_scaling={"type": "linear", "factor": 2.0}))
    with pytest.raises(WeightsError, match="tie_word_embeddings"):
        phi_config_from_official(dict(good, tie_word_embeddings=True))


# --- (c) prompts -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tokenizer():
    """Byte-level BPE (as Phi's) on a few sentences; <|endoftext|> special like Phi-1.5."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator([
        render_prompt(PromptTemplate.GEOSEG_BENCH), render_prompt(PromptTemplate.REFSEGRS),
        "the red roof next to the river", "Please segment the region/target corresponding to",
    ], trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|endoftext|>",
                                  eos_token="<|endoftext|>", unk_token="<|endoftext|>")
    n = len(tok)
    assert add_special_tokens(tok) == 2
    assert tok.pad_token == "[PAD]" and tok.pad_token_id == n
    assert seg_token_id(tok) == n + 1
    assert add_special_tokens(tok) == 0  # idempotent
    return tok


def test_template_text():
    text = render_prompt()
    assert text.startswith("[INST] <<SYS>>\nYou are a helpful language and vision assistant. ")
    assert text.endswith(
        "\n<</SYS>>\n\nThis is an image <image>, Please doing Reasoning Segmentation according "
        "to the following instruction:\n<refer> [/INST] Sure, It is <seg>. \n<answer>. "
        "<|endoftext|>")
    assert "Referring Segmentation" in render_prompt(PromptTemplate.RRSISD)
    assert render_prompt(PromptTemplate.RRSISD).endswith("<refer> [/INST] \nSure. <|endoftext|>")


@pytest.mark.parametrize("task", TASKS)
def test_geoseg_bench_prompt_ids(tokenizer, task):
    instruction = "the red roof next to the river"
    p = build_prompt(task, instruction, tokenizer)
    ids = p.input_ids
    # Reasoning wording for every task on GeoSeg-Bench; the task only sets prompt_type
    assert p.text == render_prompt(PromptTemplate.GEOSEG_BENCH)
    assert p.prompt_type == {"referring": "ref", "reasoning": "reason",
                             "interactive": "intera"}[task]
    assert [i for i in ids if i < 0] == [IMAGE_TOKEN_INDEX, REFER_TOKEN_INDEX,
                                         SEG_TOKEN_INDEX, ANSWER_TOKEN_INDEX]
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert ids[-1] == eos and ids.count(eos) == 1
    i_img, i_ref = ids.index(IMAGE_TOKEN_INDEX), ids.index(REFER_TOKEN_INDEX)
    assert tokenizer.decode(ids[:i_img]).endswith("This is an image ")
    assert tokenizer.decode(ids[i_img + 1:i_ref]) == (
        ", Please doing Reasoning Segmentation according to the following instruction:\n")
    # <refer> expands to tokenize(" " + instruction) + [SEG]
    seg = seg_token_id(tokenizer)
    assert p.refer_ids[-1] == seg and p.refer_ids.count(seg) == 1
    assert tokenizer.decode(p.refer_ids[:-1]) == " " + instruction
    assert p.answer_ids == [seg]  # empty reason
    assert p.dataset_type == "reason_seg"
    # user turn ignored, response (from " Sure") and <|endoftext|> supervised
    first = next(i for i, lab in enumerate(p.labels) if lab != IGNORE_INDEX)
    assert all(lab == IGNORE_INDEX for lab in p.labels[:first])
    assert p.labels[first:] == ids[first:]
    assert tokenizer.decode(ids[first:ids.index(SEG_TOKEN_INDEX)]) == " Sure, It is "
    assert i_ref < first


def test_other_templates_and_answers(tokenizer):
    seg = seg_token_id(tokenizer)
    p = build_prompt("reasoning", "where would a ship dock", tokenizer,
                     template="earthreason")
    assert tokenizer.decode(p.answer_ids[:-1]) == "There is no target object in the image."
    p = build_prompt("reasoning", "x", tokenizer, answer="the red roof")
    assert p.answer_ids[-1] == seg and tokenizer.decode(p.answer_ids[:-1]) == "the red roof"

    p = build_prompt("referring", "the red roof", tokenizer, template=PromptTemplate.REFSEGRS)
    assert p.answer_ids is None and p.dataset_type == "refer_seg"
    assert [i for i in p.input_ids if i < 0] == [IMAGE_TOKEN_INDEX, REFER_TOKEN_INDEX,
                                                 SEG_TOKEN_INDEX]
    with pytest.raises(InvalidInputError, match="no <answer>"):
        build_prompt("referring", "x", tokenizer, template="rrsisd", answer="because")
    with pytest.raises(ValueError):
        build_prompt("panoptic", "x", tokenizer)


def test_interactive_prompt_carries_coords(tokenizer):
    text = interactive_instruction(box_norm=(0.434, 0.113, 0.717, 0.287))
    p = build_prompt("interactive", text, tokenizer)
    torch.testing.assert_close(p.intera_coords, torch.tensor([[0.434, 0.113, 0.717, 0.287]]))
    assert build_prompt("referring", text, tokenizer).intera_coords is None


def test_seg_token_required():
    bpe = Tokenizer(models.WordLevel({"[": 0, "SEG": 1, "]": 2, "<unk>": 3}, unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="<unk>")
    with pytest.raises(InvalidInputError, match="add_special_tokens"):
        seg_token_id(tok)


# --- (d) interactive coordinate text ---------------------------------------------------------

def test_official_examples():
    assert interactive_instruction(points_norm=[(0.49, 0.828)]) == (
        "Please segment the region/target corresponding to the point [0.490,0.828].")
    assert interactive_instruction(box_norm=[0.434, 0.113, 0.717, 0.287]) == (
        "Please segment the region/target corresponding to the box "
        "x0,y0=[0.434,0.113], x1,y1=[0.717,0.287].")


@pytest.mark.parametrize("points", [[(0.0, 1.0)], [(0.1, 0.2), (0.3, 0.4)],
                                    [(0.1234, 0.5678), (0.9, 0.05), (0.5, 0.5)]])
def test_points_round_trip(points):
    coords = parse_interactive_coords(interactive_instruction(points_norm=points))
    assert coords.shape == (len(points), 2)
    torch.testing.assert_close(coords, torch.tensor(points), atol=5e-4, rtol=0)


def test_box_round_trip():
    coords = parse_interactive_coords(interactive_instruction(box_norm=(0.0, 0.25, 0.5, 1.0)))
    torch.testing.assert_close(coords, torch.tensor([[0.0, 0.25, 0.5, 1.0]]))


def test_parser_quirks():
    # a space after the comma does not parse (the figure's "[0.49, 0.828]")
    assert parse_interactive_coords("the point [0.49, 0.828].") is None
    # 4 points: None, not the first three
    assert parse_interactive_coords("[0.1,0.1] [0.2,0.2] [0.3,0.3] [0.4,0.4]") is None
    # no minus sign
    assert parse_interactive_coords("the point [-0.1,0.5]") is None
    # box first, even when point-like brackets come before it
    c = parse_interactive_coords("[0.9,0.9] then the box x0,y0=[0.1,0.2],x1,y1=[0.3,0.4]")
    torch.testing.assert_close(c, torch.tensor([[0.1, 0.2, 0.3, 0.4]]))
    # a box with a bad inner comma falls through: its good corner reads as one point
    c = parse_interactive_coords("box x0,y0=[0.1, 0.2], x1,y1=[0.3,0.4].")
    torch.testing.assert_close(c, torch.tensor([[0.3, 0.4]]))
    # no clipping
    torch.testing.assert_close(parse_interactive_coords("[1.5,2]"), torch.tensor([[1.5, 2.0]]))
    assert parse_interactive_coords("segment the roof") is None
    with pytest.raises(InvalidInputError, match="malformed"):
        parse_interactive_coords("[1.2.3,0.5]")


def test_instruction_validation():
    with pytest.raises(InvalidInputError, match="exactly one"):
        interactive_instruction()
    with pytest.raises(InvalidInputError, match="exactly one"):
        interactive_instruction(points_norm=[(0.1, 0.1)], box_norm=(0, 0, 1, 1))
    with pytest.raises(InvalidInputError, match=r"\[0, 1\]"):
        interactive_instruction(points_norm=[(-0.1, 0.5)])
    with pytest.raises(InvalidInputError, match="1 <= N <= 3"):
        interactive_instruction(points_norm=[(0.1, 0.1)] * 4)
    with pytest.raises(InvalidInputError, match="XYXY"):
        interactive_instruction(box_norm=(0.5, 0.1, 0.4, 0.2))
