"""The default model's quality on the evaluation regions, as a table
(``default_model.quality.measure_quality``), and the model card's ``metrics`` as JSON.

    python benchmarks/default_model_quality.py [WEIGHTS_FOLDER] [--random CONFIG] [--threads 2]
                                               [--write-card]

Without a folder it measures the shipped weights (``default_model/weights/``). ``--random``
measures random weights of a configuration instead (``default-v1``, ``tiny``): numbers near
0, for timing the measurement. ``--write-card`` writes the numbers into the folder's model
card (``metrics``). Exits 1 when a check misses its threshold.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from unigeoseg_backend.default_model.quality import (
    measure_quality,
    measure_random_quality,
    quality_summary,
)
from unigeoseg_backend.default_model.weights_io import shipped_weights_dir, write_card_metrics


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", nargs="?", type=Path, default=None,
                        help="a weights folder (default: the shipped one)")
    parser.add_argument("--random", metavar="CONFIG", default=None,
                        help="measure random weights of this configuration instead")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for torch")
    parser.add_argument("--write-card", action="store_true",
                        help="write the numbers into the weights folder's model card")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.random:
        report = measure_random_quality(args.random)
    else:
        report = measure_quality(args.folder or shipped_weights_dir())
    print(report.format_table())
    metrics = quality_summary(report)
    print(json.dumps({"metrics": metrics}, indent=2))
    if args.write_card and not args.random:
        folder = args.folder or shipped_weights_dir()
        write_card_metrics(folder, {**metrics, "measured_in_s": round(report.seconds, 1),
                                    "checks_failed": len(report.failures())})
        print(f"metrics written into {folder / 'model_card.json'}")
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())
