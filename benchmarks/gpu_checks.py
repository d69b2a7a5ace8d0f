"""Correctness of the CUDA paths (run on a GPU machine): prints one JSON line per check.

* the tiny model on CUDA in float32 (TF32 off) against the same weights on the CPU;
* CUDA graphs against eager execution on the same device (the same kernels: equal outputs);
* the full-size model (random weights) in bfloat16 against float32 on the GPU, as mask
  agreement (IoU of the thresholded masks) and relative error of the logits;
* the text engine end to end on CUDA (released-layout tiny checkpoint, batched tiles and one
  prompt at a time) against the engine on the CPU;
* the training forward on CUDA in bfloat16 with CUDA graphs enabled (autograd must bypass
  them): gradients on every trained parameter, the last masks equal to ``segment``'s.

Exits 1 if a check is outside its tolerance. Usage: ``python benchmarks/gpu_checks.py``.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from unigeoseg_backend.model.preprocess import letterbox_image
from unigeoseg_backend.model.prompting import build_prompt
from unigeoseg_backend.model.registry import get_config, tiny_tokenizer
from unigeoseg_backend.model.unigeoseg import UniGeoSeg

FAILURES: list[str] = []


def report(name: str, ok: bool, **values) -> None:
    print(json.dumps({"check": name, "ok": ok, **values}), flush=True)
    if not ok:
        FAILURES.append(name)


def tiles(size: int, count: int) -> torch.Tensor:
    rng = np.random.default_rng(0)
    images = [letterbox_image((rng.random((size, size + 32 * i, 3)) * 255).astype(np.uint8),
                              size)[0] for i in range(count)]
    return torch.stack(images)


def forward(model: UniGeoSeg, images: torch.Tensor, prompts: list) -> torch.Tensor:
    vision = model.encode_images(images)
    return model.segment(vision, prompts).float().cpu()


def mask_iou(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a > 0, b > 0
    union = (a | b).sum().item()
    return 1.0 if union == 0 else (a & b).sum().item() / union


def check_tiny(tokenizer) -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    model = UniGeoSeg(get_config("unigeoseg-tiny-sparseconv")).eval()
    images = tiles(model.config.image_size, 3)
    prompts = [build_prompt("referring", "the pond next to the road", tokenizer),
               build_prompt("reasoning", "areas where people could swim", tokenizer),
               build_prompt("referring", "the pond next to the road", tokenizer)]
    on_cpu = forward(model, images, prompts)
    model.cuda()
    on_gpu = forward(model, images, prompts)
    diff = (on_cpu - on_gpu).abs().max().item()
    report("tiny fp32 cuda vs cpu", diff < 1e-3, max_abs_diff=diff,
           mask_iou=mask_iou(on_cpu, on_gpu))

    shared = [prompts[0]] * 3
    eager = forward(model, images, shared)
    model.enable_cuda_graphs()
    graphed = [forward(model, images, shared) for _ in range(3)]  # eager, capture, replay
    captures = model.cuda_graphs.captures
    diff = max((g - eager).abs().max().item() for g in graphed)
    # Not bit for bit: under capture transformers builds an explicit attention mask and
    # SDPA may pick another kernel (cuda_graphs.py).
    report("tiny cuda graphs vs eager", diff < 1e-4 and captures == 3, max_abs_diff=diff,
           graphs_captured=captures)
    model.disable_cuda_graphs()


def check_full_size(tokenizer) -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = UniGeoSeg(get_config("unigeoseg-official-sparseconv")).eval()
    images = tiles(512, 2)
    prompt = build_prompt("referring", "the warehouse with the blue roof next to the rail yard",
                          tokenizer)
    fp32 = forward(model, images, [prompt] * 2)
    model.to(torch.bfloat16)
    bf16 = forward(model, images, [prompt] * 2)
    model.enable_cuda_graphs()
    forward(model, images, [prompt] * 2)  # first use of each shape: eager
    graphed = forward(model, images, [prompt] * 2)  # second use: captured, then replayed
    relative = ((bf16 - fp32).norm() / fp32.norm()).item()
    iou = mask_iou(bf16, fp32)
    graph_relative = ((graphed - bf16).norm() / bf16.norm()).item()
    graph_iou = mask_iou(graphed, bf16)
    report("full size bf16 vs fp32", iou > 0.9, mask_iou=iou, relative_logit_error=relative,
           fp32_logit_std=fp32.std().item())
    report("full size cuda graphs vs eager (bf16)",
           graph_iou > 0.98 and graph_relative < 2e-2 and model.cuda_graphs.captures == 3,
           mask_iou=graph_iou, relative_logit_error=graph_relative,
           graphs_captured=model.cuda_graphs.captures)
    del model
    torch.cuda.empty_cache()


def check_engine(tokenizer) -> None:
    from unigeoseg_backend.engines.base import TilePrompt
    from unigeoseg_backend.engines.unigeoseg_engine import UniGeoSegEngine
    from unigeoseg_backend.model.checkpoint import clear_cache, save_released

    torch.manual_seed(0)
    model = UniGeoSeg(get_config("unigeoseg-tiny-sparseconv")).eval()
    rng = np.random.default_rng(1)
    rgbs = [(rng.random((300 + 20 * i, 256, 3)) * 255).astype(np.uint8) for i in range(4)]
    prompt = TilePrompt(text="the red roofs", task="referring")
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_released(model, tokenizer, Path(tmp) / "tiny")
        cpu = UniGeoSegEngine.from_model_dir(folder, torch.device("cpu"))
        expected = [cpu.decode(cpu.encode(rgb), prompt).mask for rgb in rgbs]
        clear_cache()
        gpu = UniGeoSegEngine.from_model_dir(folder, torch.device("cuda"))
        start = time.perf_counter()
        batched = [p.mask for p in gpu.segment_tiles(rgbs, prompt)]
        single = [gpu.decode(gpu.encode(rgb), prompt).mask for rgb in rgbs]
        seconds = time.perf_counter() - start
    agreement = [float((a == b).mean()) for a, b in zip(expected, batched, strict=True)]
    same = all(np.array_equal(a, b) for a, b in zip(batched, single, strict=True))
    report("engine on cuda (bf16, graphs) vs cpu (fp32)", min(agreement) > 0.95,
           pixel_agreement=agreement, batched_equals_single=same, seconds=seconds)


def check_training_forward(tokenizer) -> None:
    torch.manual_seed(0)
    model = UniGeoSeg(get_config("unigeoseg-tiny-sparseconv")).to("cuda", torch.bfloat16)
    model.set_trainable()
    model.enable_cuda_graphs()
    images = tiles(model.config.image_size, 2).to("cuda")
    prompts = [build_prompt("reasoning", "areas where people could swim", tokenizer,
                            answer="the water is calm"),
               build_prompt("referring", "the pond", tokenizer, answer="it is wet")]
    model.eval()  # TATE's dropout off, so that forward and segment are comparable
    outputs = model(images, prompts)
    loss = sum(m.float().sigmoid().mean() for m in outputs.mask_logits) + \
        torch.nn.functional.cross_entropy(outputs.lm_logits.float().flatten(0, 1),
                                          outputs.lm_labels.flatten(), ignore_index=-100)
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    with torch.no_grad():
        inferred = [forward(model, images, prompts) for _ in range(3)]  # eager, capture, replay
    diff = max((i - outputs.mask_logits[-1].detach().float().cpu()).abs().max().item()
               for i in inferred)
    scale = inferred[0].abs().max().item()
    report("training forward cuda bf16", not missing and diff < 0.05 * scale,
           without_grad=missing[:5], max_abs_diff=diff, max_abs_logit=scale,
           graphs_captured=model.cuda_graphs.captures)
    model.disable_cuda_graphs()


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 2
    print(json.dumps({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__}))
    tokenizer = tiny_tokenizer()
    for check in (check_tiny, check_training_forward, check_engine, check_full_size):
        try:
            check(tokenizer)
        except Exception as exc:  # report and go on to the next check
            report(check.__name__, False, error=f"{type(exc).__name__}: {exc}")
    return 1 if FAILURES else 0


if __name__ == "__main__":
    sys.exit(main())
