"""Step 3 (our venv): our forward on the same folder and inputs, compared with the official
outputs; with ``--write``, the golden file tests/model/data/official_forward_tiny.npz.

Usage: ``HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/official_forward/compare.py WORK
[--write]``. Exits 1 when a case differs by more than the test's tolerance.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "model"))

from test_official_forward import (  # noqa: E402
    ATOL,
    CASES,
    DATA,
    IMAGE_SIZE,
    RTOL,
    make_image,
    register_config,
)

from unigeoseg_backend.model.checkpoint import load_released  # noqa: E402
from unigeoseg_backend.model.preprocess import letterbox_image  # noqa: E402
from unigeoseg_backend.model.prompting import build_prompt  # noqa: E402


def upsampled_mask(grid: np.ndarray) -> np.ndarray:
    t = torch.as_tensor(grid, dtype=torch.float32)[None, None]
    return (F.interpolate(t, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear",
                          align_corners=False) > 0)[0, 0].numpy()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("work", type=Path)
    parser.add_argument("--write", action="store_true", help="write the golden file")
    args = parser.parse_args()
    official = dict(np.load(args.work / "official.npz"))
    register_config()
    loaded = load_released(args.work / "release", device="cpu", dtype=torch.float32)
    model, tokenizer = loaded.model, loaded.tokenizer

    image, _ = letterbox_image(make_image(), IMAGE_SIZE)
    failed = False
    with torch.no_grad():
        vision = model.encode_images(image[None])
        for case, (task, instruction) in CASES.items():
            d_image = float((image - torch.from_numpy(official[f"{case}/image"])).abs().max())
            prompt = build_prompt(task, instruction, tokenizer)
            # intermediates: the language model's last hidden states and the SEG query
            text = model._embed_text(prompt)
            sequence = text.with_image(vision.visual_tokens[0])
            hidden = model._run_language_model([sequence])[0]
            refer = hidden[text.refer_span(len(sequence))]
            query = model.heads.build_seg_query([refer], [prompt.task], vision.res5)
            logits = model.segment(vision, [prompt])[0, 0].numpy()

            # The official sequence goes on after <refer> (the response and <answer>); the
            # model is causal, so its first len(ours) states must be ours.
            ref_hidden = official[f"{case}/hidden"]
            d_hidden = float(np.abs(hidden.numpy() - ref_hidden[:hidden.shape[0]]).max())
            d_query = float(np.abs(query.numpy().reshape(-1)
                                   - official[f"{case}/seg_embedding"].reshape(-1)).max())
            ref = official[f"{case}/logits"]
            d_logits = float(np.abs(logits - ref).max())
            scale = float(np.abs(ref).max())
            agree = float((upsampled_mask(logits) == upsampled_mask(ref)).mean())
            ok = np.allclose(logits, ref, atol=ATOL * scale, rtol=RTOL)
            failed |= not ok
            print(f"{case:13s} |image| {d_image:.1e}  |hidden| {d_hidden:.2e} "
                  f"(first {hidden.shape[0]} of {ref_hidden.shape[0]})  |SEG query| {d_query:.2e}  "
                  f"|logits| {d_logits:.2e} (max |logit| {scale:.2f}, rel "
                  f"{d_logits / scale:.1e})  mask agreement {agree:.6f}  "
                  f"{'OK' if ok else 'DIFFERENT'}")
    if args.write:
        if failed:
            print("not writing the golden file: the comparison failed")
            return 1
        keep = {k: v for k, v in official.items()
                if k in ("weights_sha256", "image_sha256") or k.endswith(("/logits",
                                                                          "/mask_pixels"))}
        DATA.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(DATA, **keep)
        print(f"wrote {DATA} ({DATA.stat().st_size / 1024:.0f} KiB)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
