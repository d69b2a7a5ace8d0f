"""UniGeoSeg per-tile latency, split into vision, language model and mask decoder.

Random weights (seeded), 512 px letterbox for the released configuration, the configured size
for tiny ones. Prints numbers; never passes or fails on time. The same command runs on a GPU,
where the full-size model runs in bf16:

    python benchmarks/bench_unigeoseg.py --model unigeoseg-tiny-sparseconv          # CPU
    python benchmarks/bench_unigeoseg.py --model unigeoseg-official-sparseconv \\
        --batch-sizes 1,16,32 --modes eager,graphs                                   # GPU

Whole-raster throughput and memory: ``benchmarks/bench_raster_text.py``.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time

import numpy as np
import torch

from unigeoseg_backend.model.preprocess import letterbox_image
from unigeoseg_backend.model.prompting import build_prompt
from unigeoseg_backend.model.registry import get_config, tiny_tokenizer
from unigeoseg_backend.model.unigeoseg import UniGeoSeg
from unigeoseg_backend.runtime import device_info, select_device

#: Untimed steps first: CUDA graphs capture a shape on its second use (cuda_graphs.py).
WARMUP_STEPS = 2


def synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench(model: UniGeoSeg, tokenizer, batch: int, repeats: int) -> dict:
    device = model.device
    rng = np.random.default_rng(0)
    tile = (rng.random((512, 512, 3)) * 255).astype(np.uint8)
    image, _ = letterbox_image(tile, size=model.config.image_size)
    images = image[None].expand(batch, -1, -1, -1).contiguous()
    prompts = [build_prompt("referring", "the warehouse with the blue roof next to the rail yard",
                            tokenizer)] * batch
    vision_s, language_s, decoder_s, total_s = [], [], [], []
    for step in range(repeats + WARMUP_STEPS):
        synchronise(device)
        start = time.perf_counter()
        vision = model.encode_images(images)
        synchronise(device)
        encoded = time.perf_counter()
        timings: dict[str, float] = {}
        model.segment(vision, prompts, timings)
        synchronise(device)
        end = time.perf_counter()
        if step < WARMUP_STEPS:
            continue  # allocations, kernel selection, and CUDA graph capture
        vision_s.append(encoded - start)
        language_s.append(timings["language_s"])
        decoder_s.append(timings["decoder_s"])
        total_s.append(end - start)
    median_ms = {name: 1000 * statistics.median(values) for name, values in
                 (("vision_ms", vision_s), ("language_ms", language_s),
                  ("decoder_ms", decoder_s), ("total_ms", total_s))}
    return {"batch": batch, **median_ms,
            "per_tile_ms": median_ms["total_ms"] / batch,
            "tiles_per_s": 1000 * batch / median_ms["total_ms"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="unigeoseg-tiny-sparseconv")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-sizes", default="1,4")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--modes", default="eager",
                        help="eager and/or graphs (CUDA graphs per stage, CUDA only), e.g. "
                             "eager,graphs")
    args = parser.parse_args()

    device = select_device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    start = time.perf_counter()
    config = get_config(args.model)
    with torch.device(device):  # build on the device: a 1.6 B model initialises in seconds
        model = UniGeoSeg(config).to(dtype=dtype).eval()
    build_s = time.perf_counter() - start
    tokenizer = tiny_tokenizer()
    if len(tokenizer) > config.language["vocab_size"]:
        raise SystemExit("the tiny tokenizer does not fit this model's vocabulary")
    params = sum(p.numel() for p in model.parameters())
    print(json.dumps({"model": args.model, "params": params, "dtype": str(dtype),
                      "build_s": round(build_s, 1), **device_info(device)}))
    for mode in args.modes.split(","):
        if mode == "graphs":
            model.enable_cuda_graphs()
        elif mode == "eager":
            model.disable_cuda_graphs()
        else:
            raise SystemExit(f"unknown mode {mode!r} (eager, graphs)")
        for batch in (int(b) for b in args.batch_sizes.split(",")):
            row = {"mode": mode, **bench(model, tokenizer, batch, args.repeats)}
            if device.type == "cuda":
                row["gpu_peak_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
            print(json.dumps({k: round(v, 2) if isinstance(v, float) else v
                              for k, v in row.items()}), flush=True)
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"peak_rss_mb": round(peak_rss_mb)}))


if __name__ == "__main__":
    main()
