"""Named model configurations: the released model's two connector variants and tiny ones.

Tiny configurations run the very same code with small widths (random weights), for tests and
CPU benchmarks; they are never presented as a result.
"""

from __future__ import annotations

from collections.abc import Callable

from .heads import HeadsConfig
from .mask_decoder import MaskDecoderConfig
from .pixel_decoder import PixelDecoderConfig
from .swin import SwinConfig
from .unigeoseg import PHI_1_5, UniGeoSegConfig


def official_config(connector: str) -> UniGeoSegConfig:
    """The released UniGeoSeg (Swin-B, Phi-1.5, Mask2Former) with the given connector."""
    return UniGeoSegConfig(language=dict(PHI_1_5), connector=connector)


def tiny_config(connector: str, vocab_size: int = 1000) -> UniGeoSegConfig:
    """Same architecture, widths of a few dozen channels, 128 px letterbox."""
    swin = SwinConfig(embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4), window_size=4,
                      drop_path_rate=0.0)
    language = dict(PHI_1_5, vocab_size=vocab_size, hidden_size=64, intermediate_size=128,
                    num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=512)
    return UniGeoSegConfig(
        language=language, connector=connector, swin=swin,
        pixel_decoder=PixelDecoderConfig(in_channels=tuple(swin.num_features), conv_dim=32,
                                         mask_dim=32, num_encoder_layers=1, num_heads=2,
                                         ffn_dim=64, num_points=2, num_groups=8),
        mask_decoder=MaskDecoderConfig(hidden_dim=32, num_heads=2, ffn_dim=64, num_layers=3,
                                       mask_dim=32, num_queries=5),
        heads=HeadsConfig(hidden=64, vision_dim=swin.num_features[-1], seg_dim=32, proj_dim=16,
                          n_latents=4, reason_queries=2, dproj_heads=2, dproj_dim_head=8,
                          n_seg_queries=5, legacy_dtype=None),
        image_size=128)


#: name -> config factory.
MODEL_CONFIGS: dict[str, Callable[[], UniGeoSegConfig]] = {
    "unigeoseg-official-sparseconv": lambda: official_config("SparseConv_1"),
    "unigeoseg-official-mscc": lambda: official_config("MSCC"),
    "unigeoseg-tiny-sparseconv": lambda: tiny_config("SparseConv_1"),
    "unigeoseg-tiny-mscc": lambda: tiny_config("MSCC"),
}


def get_config(name: str) -> UniGeoSegConfig:
    if name not in MODEL_CONFIGS:
        raise KeyError(f"unknown model {name!r}; known: {sorted(MODEL_CONFIGS)}")
    return MODEL_CONFIGS[name]()


def tiny_tokenizer(vocab_size: int = 400, *, with_special_tokens: bool = True):
    """A small byte-level BPE tokenizer (like Phi's) trained here, offline, on the prompt
    templates, with ``[PAD]`` and ``[SEG]`` added (unless ``with_special_tokens`` is False:
    then it stands for Phi-1.5's own tokenizer): the text side of the tiny configurations."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from .prompting import (
        PromptTemplate,
        add_special_tokens,
        interactive_instruction,
        render_prompt,
    )

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = [render_prompt(template) for template in PromptTemplate]
    corpus += ["the warehouse with the blue roof next to the rail yard",
               "areas where people could swim",
               interactive_instruction(box_norm=(0.1, 0.2, 0.3, 0.4))]
    bpe.train_from_iterator(corpus, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|endoftext|>",
                                        eos_token="<|endoftext|>", unk_token="<|endoftext|>")
    if with_special_tokens:
        add_special_tokens(tokenizer)
    return tokenizer
