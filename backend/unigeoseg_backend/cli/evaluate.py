"""``unigeoseg eval``: score a UniGeoSeg model on a benchmark with the official metrics.

    unigeoseg eval --dataset geoseg-bench --root data/GeoSeg-Bench --split test \\
        --model unigeoseg --out runs/geoseg-bench

Resumes an interrupted run in the same ``--out``; ``torchrun --nproc_per_node N -m
unigeoseg_backend.cli.main eval ...`` shards the samples over N processes (GPUs) with the
same results. See docs/evaluation.md.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from ..errors import InvalidInputError

logger = logging.getLogger(__name__)

#: ``datasets.DATASETS``, repeated so that building the parser does not import torch.
DATASETS = ("geoseg-bench", "rrsis-d", "refsegrs", "earthreason", "local")


def _at_least(minimum: int):
    """An argparse type: an integer no smaller than ``minimum``."""

    def parse(text: str) -> int:
        if not text.strip().lstrip("-").isdigit() or int(text) < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}")
        return int(text)

    return parse


def add_eval_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval", help="score a UniGeoSeg model on a benchmark (gIoU, cIoU, Pr@t)",
        description="Evaluate a UniGeoSeg model on a benchmark with the official metrics "
                    "(per-sample foreground IoU on the letterboxed input, gIoU, cIoU, Pr@0.5-"
                    "0.9), per task and overall. Resumable: rerun with the same --out. Launch "
                    "with torchrun to shard over several processes or GPUs.")
    p.add_argument("--dataset", required=True, choices=DATASETS, help="the on-disk layout")
    p.add_argument("--root", required=True, type=Path, help="the dataset's root folder")
    p.add_argument("--split", default="test", help="split to evaluate (default test)")
    p.add_argument("--task", choices=["referring", "reasoning", "interactive"],
                   help="only this task (default: every task the dataset has)")
    p.add_argument("--model", metavar="PATH_OR_NAME",
                   help="a released-layout model directory or a name under <weights cache>/"
                        "models/ (default: $UNIGEOSEG_MODEL)")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "auto"],
                   help="model precision: float32 (default, as the official evaluation), "
                        "bfloat16, or auto (bfloat16 on CUDA, float32 on the CPU)")
    p.add_argument("--batch-size", type=_at_least(1), default=8, help="samples per forward pass")
    p.add_argument("--limit", type=_at_least(0), help="only the first N samples of the dataset")
    p.add_argument("--worst", type=_at_least(0), default=8,
                   help="PNG overlays of the N lowest-IoU samples (default 8, 0 for none)")
    p.add_argument("--native-resolution", action="store_true",
                   help="also report the metrics at the original image resolution")
    p.add_argument("--rsvg", action="store_true",
                   help="score the bounding box of each prediction's largest 8-connected "
                        "component instead of the mask (the official --rsvg, for box ground "
                        "truths such as RSVG-DIOR; Pr@0.5 is then Acc@0.5)")
    p.add_argument("--mask-rule", choices=["official", "robust"], default="official",
                   help="how mask pixels become foreground: official (each dataset's rule in "
                        "the released code) or robust (any value above half scale)")
    p.add_argument("--workers", type=_at_least(0), default=2,
                   help="threads reading samples ahead of the model (default 2, 0 inline)")
    p.add_argument("--restart", action="store_true",
                   help="discard the results already in --out instead of resuming")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.set_defaults(func=run_eval)


def run_eval(args: argparse.Namespace) -> int:
    import torch

    from ..datasets import open_dataset
    from ..distributed import close_world, init_world
    from ..engines.unigeoseg_engine import model_dtype
    from ..evaluation.pipeline import EvalSettings, evaluate
    from ..evaluation.report import METRICS_MD
    from ..model.checkpoint import load_released
    from ..runtime import select_device
    from ..weights import configured_model, resolve_model

    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    model = configured_model(args.model)
    if model is None:
        raise InvalidInputError("no model to evaluate: pass --model PATH_OR_NAME or set "
                                "$UNIGEOSEG_MODEL")
    model_dir = resolve_model(model)
    device = select_device(args.device)
    world = init_world(device)
    try:
        device = world.device if world.distributed else device
        dtype = model_dtype(device) if args.dtype == "auto" else getattr(torch, args.dtype)
        listing = open_dataset(args.dataset, args.root, split=args.split, task=args.task,
                               mask_rule=args.mask_rule)
        if world.is_main:
            for problem in listing.problems:
                logger.warning("skipped %s: %s", problem.where, problem.message)
        settings = EvalSettings(
            dataset=args.dataset, root=args.root, split=args.split, out=args.out,
            task=args.task, mask_rule=args.mask_rule, batch_size=args.batch_size,
            limit=args.limit, worst=args.worst, native_resolution=args.native_resolution,
            box_predictions=args.rsvg, restart=args.restart, workers=args.workers,
            progress=not args.no_progress)
        document = evaluate(settings, listing, model_dir,
                            lambda: load_released(model_dir, device=device, dtype=dtype),
                            device, dtype, world)
    finally:
        close_world(world)
    if document is not None:
        print((Path(args.out) / METRICS_MD).read_text(encoding="utf-8"), end="")
        print(f"results in {args.out}")
    return 0
