"""Step 2 (the OFFICIAL venv: torch 2.1.2, transformers 4.36.2, timm 0.6.13): the official
UniGeoSeg eval path on the seeded release folder.

Usage (from the root of an export of MiliLab/UniGeoSeg, so that ``unigeoseg`` imports)::

    python run_official.py WORK

reads WORK/release and WORK/inputs.npz (make_release.py), writes WORK/official.npz.

What is NOT the official code, all outside its forward logic (README.md lists them too):

1. ``MultiScaleDeformableAttention`` (the compiled CUDA op) is a stub module whose functions
   raise, so ``MSDeformAttn.forward`` takes its own ``except:`` branch, the official
   pure-PyTorch ``ms_deform_attn_core_pytorch``.
2. ``build_swin_b`` (hard-coded Swin-B depths [2, 2, 18, 2]) is replaced, in llava_phi's
   namespace, by the same official ``SwinTransformer`` class with depths [2, 2, 2, 2]; every
   other argument is build_swin_b's (drop_path 0.3 is inactive in eval mode).
3. The mask config is the eval's ``maskformer2_swin_base_384_bs16_50ep.yaml`` with smaller
   Mask2Former widths (HIDDEN_DIM/CONVS_DIM/MASK_DIM 32, NHEADS 4, DIM_FEEDFORWARD 64,
   DEC_LAYERS 4, TRANSFORMER_ENC_LAYERS 2, NUM_OBJECT_QUERIES 5, SWIN.DEPTHS [2, 2, 2, 2]).
4. The tokenizer is read with ``PreTrainedTokenizerFast(tokenizer_file=...)``: the folder's
   tokenizer_config.json names the transformers-5 class ``TokenizersBackend``, unknown to
   4.36's AutoTokenizer (eval.py's ``AutoTokenizer.from_pretrained`` would build the same
   fast tokenizer), and its BPE merges are rewritten from the pair form that tokenizers
   >= 0.20 writes to the "a b" strings that tokenizers 0.15 reads (same merges). The script
   asserts that the official tokenisation gives our input ids.
5. ``from_pretrained(..., torch_dtype=torch.float32)`` instead of eval.py's float16 load
   followed by ``.to(float)``: the checkpoint is fp32 and an fp16 round trip would only add
   noise. The three modules the official ``__init__`` creates in bfloat16 stay bfloat16 on
   load (the checkpoint holds them in bf16) and are cast to fp32 by ``.to(float)``, as in
   eval.py.
6. The inputs come from the official ``RSRSDataset`` + ``DataCollector`` on a throw-away
   benchmark folder (one PNG, an empty mask, the question JSON), one folder per case, whose
   path carries ``/ref/`` or ``/intera/`` exactly as GeoSeg-Bench's ``prompt_type`` routing
   needs; ``eval_seg`` is called with eval.py's arguments. Hooks on the predictor (outputs)
   and on the language model read the logits before thresholding and a few intermediates.
"""

from __future__ import annotations

import json
import os
import sys
import types
from pathlib import Path

import numpy as np
import torch

# --- 1. the compiled op: a stub, so the official CPU fallback runs ---------------------------
_msda = types.ModuleType("MultiScaleDeformableAttention")


def _no_op(*args, **kwargs):
    raise RuntimeError("MultiScaleDeformableAttention CUDA op stubbed out")


_msda.ms_deform_attn_forward = _no_op
_msda.ms_deform_attn_backward = _no_op
sys.modules["MultiScaleDeformableAttention"] = _msda

import cv2  # noqa: E402
import unigeoseg.model.language_model.llava_phi as llava_phi  # noqa: E402
from transformers import PreTrainedTokenizerFast  # noqa: E402
from unigeoseg import conversation as conversation_lib  # noqa: E402
from unigeoseg.eval_and_test.eval_dataset.RS_val_dataset import (  # noqa: E402
    DataCollector,
    RSRSDataset,
)
from unigeoseg.mask_config.config import get_mask_config  # noqa: E402
from unigeoseg.model.multimodal_encoder.swin_trans import SwinTransformer  # noqa: E402

DEPTHS = [2, 2, 2, 2]


# --- 2. Swin-B with fewer blocks --------------------------------------------------------------
def build_swin_small_depth(pretrain=None):
    model = SwinTransformer(embed_dim=128, depths=DEPTHS, num_heads=[4, 8, 16, 32],
                            window_size=12, mlp_ratio=4., qkv_bias=True, qk_scale=None,
                            drop_rate=0., attn_drop_rate=0., drop_path_rate=0.3, ape=False,
                            patch_norm=True, out_indices=(0, 1, 2, 3), use_checkpoint=False)
    assert pretrain is None
    return model


llava_phi.build_swin_b = build_swin_small_depth


# --- 3. mask config ---------------------------------------------------------------------------
def mask_config():
    cfg = get_mask_config("./unigeoseg/mask_config/maskformer2_swin_base_384_bs16_50ep.yaml")
    cfg.MODEL.MASK_FORMER.SEG_TASK = "referring"  # eval's DataArguments default seg_task
    cfg.MODEL.SWIN.DEPTHS = DEPTHS
    mf, head = cfg.MODEL.MASK_FORMER, cfg.MODEL.SEM_SEG_HEAD
    mf.HIDDEN_DIM, mf.NHEADS, mf.DIM_FEEDFORWARD = 32, 4, 64
    mf.DEC_LAYERS, mf.NUM_OBJECT_QUERIES = 4, 5
    head.CONVS_DIM, head.MASK_DIM, head.TRANSFORMER_ENC_LAYERS = 32, 32, 2
    return cfg


def load_tokenizer(folder: Path, work: Path):
    config = json.loads((folder / "tokenizer_config.json").read_text())
    # tokenizers >= 0.20 writes BPE merges as pairs, 0.15 reads "a b" strings: same merges.
    data = json.loads((folder / "tokenizer.json").read_text())
    merges = data["model"]["merges"]
    assert all(isinstance(m, list) and " " not in "".join(m) for m in merges) or all(
        isinstance(m, str) for m in merges)
    data["model"]["merges"] = [m if isinstance(m, str) else " ".join(m) for m in merges]
    (work / "tokenizer-0.15.json").write_text(json.dumps(data))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_file=str(work / "tokenizer-0.15.json"),
        **{k: config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")})
    assert tokenizer.convert_tokens_to_ids("[SEG]") == len(tokenizer) - 1
    return tokenizer


def write_bench(root: Path, image: np.ndarray, cases: dict) -> dict[str, Path]:
    """One RSRS benchmark folder per case; the path decides prompt_type like GeoSeg-Bench's."""
    folders = {}
    for case, spec in cases.items():
        sub = {"ref": "ref", "intera": "intera", "reason": "reason"}[spec["prompt_type"]]
        base = root / case / sub / "test"
        base.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(base / "img.png"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        cv2.imwrite(str(base / "mask.png"), np.zeros(image.shape[:2], np.uint8))
        (base / "qa.json").write_text(json.dumps({"question": [spec["instruction"]],
                                                  "reason": []}))
        (base / "test.json").write_text(json.dumps([{"img": "img.png", "mask": "mask.png",
                                                     "json": "qa.json"}]))
        folders[case] = base
    return folders


def main(work: Path) -> None:
    torch.manual_seed(0)
    folder = work / "release"
    inputs = np.load(work / "inputs.npz")
    cases = json.loads(str(inputs["cases"]))
    image = inputs["image"]

    tokenizer = load_tokenizer(folder, work)
    model, info = llava_phi.UniGeoSeg.from_pretrained(
        str(folder), mask_decoder_cfg=mask_config(), use_seg_query=False,
        torch_dtype=torch.float32, output_loading_info=True)
    problems = {k: v for k, v in info.items() if v}
    if problems:
        raise SystemExit(f"the official model does not load the folder cleanly: {problems}")
    model.to(device="cpu", dtype=torch.float).eval()  # eval.py: model.to(dtype=torch.float)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"official model: {n_params / 1e6:.2f} M parameters, loaded without missing or "
          f"unexpected keys")

    captured = {}
    model.predictor.register_forward_hook(
        lambda m, args, out: captured.update(pred_masks=out["pred_masks"].detach().clone(),
                                             seg_embedding=args[4].detach().clone()))
    model.model.register_forward_hook(
        lambda m, args, out: captured.update(hidden=out.last_hidden_state.detach().clone()))

    conversation_lib.default_conversation = conversation_lib.conv_templates["llava_phi"]
    bench = write_bench(work / "bench", image, cases)
    result = {"weights_sha256": inputs["weights_sha256"], "image_sha256": inputs["image_sha256"]}
    for case, spec in cases.items():
        dataset = RSRSDataset(base_data_path=str(bench[case]) + os.sep, tokenizer=tokenizer,
                              image_size=512, split="test")
        batch = DataCollector(tokenizer=tokenizer)([dataset[0]])
        assert batch["prompt_type"] == [spec["prompt_type"]], batch["prompt_type"]
        assert batch["input_ids"][0].tolist() == spec["input_ids"], "prompt tokens differ"
        assert batch["token_refer_id"][0].tolist() == spec["refer_ids"], "<refer> ids differ"
        letterboxed = batch["images"].float()
        with torch.no_grad():
            outputs = model.eval_seg(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                images=letterboxed, masks=batch["masks"],
                token_refer_id=batch["token_refer_id"],
                refer_embedding_indices=batch["refer_embedding_indices"],
                labels=batch["labels"], token_answer_id=batch["token_answer_id"],
                answer_embedding_indices=batch["answer_embedding_indices"],
                prompt_type=batch["prompt_type"], intera_coords=batch["intera_coords"])
        logits = captured["pred_masks"][0, 0].float().numpy()
        mask = outputs[0]["pred_masks"]
        coords = batch["intera_coords"][0]
        print(f"{case:13s} prompt_type={spec['prompt_type']:6s} coords="
              f"{None if coords is None else coords.tolist()} logits {logits.shape} "
              f"[{logits.min():+.3f}, {logits.max():+.3f}] mask pixels {int(mask.sum())}")
        result[f"{case}/logits"] = logits.astype(np.float32)
        result[f"{case}/mask_pixels"] = np.int64(mask.sum().item())
        # intermediates (debugging; not in the committed file)
        result[f"{case}/seg_embedding"] = captured["seg_embedding"].float().numpy()
        result[f"{case}/hidden"] = captured["hidden"][0].float().numpy()
        result[f"{case}/image"] = letterboxed[0].numpy()
    np.savez(work / "official.npz", **result)
    print(f"wrote {work / 'official.npz'}")


if __name__ == "__main__":
    main(Path(sys.argv[1]).resolve())
