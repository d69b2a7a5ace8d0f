"""``unigeoseg predict RASTER --text ... --whole-raster``: the options of a whole-raster run.

The run itself is :func:`~..pipelines.whole_raster.segment_raster`; this module parses the
options, loads the engine, shows a progress bar and prints the summary line.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from unigeoseg_protocol.params import Prompt
from unigeoseg_protocol.vocabulary import default_engine

from ..errors import InvalidInputError


def add_whole_raster_arguments(p: argparse.ArgumentParser) -> None:
    """The options of the whole-raster run (added to ``unigeoseg predict``)."""
    p.add_argument("--whole-raster", action="store_true",
                   help="with --text: segment the whole raster tile by tile (seams merged, "
                        "streamed to the output; see --tile, --overlap, --batch-size)")
    p.add_argument("--tile", type=int, default=512, help="whole-raster tile side in px "
                                                         "(default 512)")
    p.add_argument("--overlap", type=int, default=64,
                   help="whole-raster overlap between neighbouring tiles in px (default 64)")
    p.add_argument("--batch-size", type=int, default=8,
                   help="whole-raster tiles read and segmented per group (default 8)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--gdal-cache-mb", type=int, default=128,
                   help="whole-raster GDAL block cache in MB (default 128; GDAL's own default, "
                        "5%% of RAM, would fill with the raster's blocks as they are read)")


def run_predict_raster(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from ..engines.base import EngineSettings
    from ..pipelines.whole_raster import RasterRunOptions, segment_raster
    from ..runtime import build_engines, select_device
    from ..weights import configured_model
    from .predict import configured_default_model

    text = args.text.strip() if args.text else ""
    if not text:
        raise InvalidInputError("--whole-raster needs a non-empty --text")
    if args.point or args.box is not None:
        raise InvalidInputError("--whole-raster takes --text only (no --point / --box)")
    if args.server:
        raise InvalidInputError("--whole-raster runs in this process; drop --server")
    output = Path(args.output)
    if output.suffix.lower() != ".gpkg":
        raise InvalidInputError(f"--whole-raster writes a GeoPackage: name the output *.gpkg, "
                                f"got {output.name!r}")
    if output.exists() and not args.overwrite:
        raise InvalidInputError(f"{output} exists; pass --overwrite to replace it")
    prompt = Prompt(text=text, task=args.task)
    options = RasterRunOptions(
        tile=args.tile, overlap=args.overlap, batch_size=args.batch_size,
        bands=tuple(int(b) for b in args.bands.split(",")) if args.bands else None,
        simplify=args.simplify, min_area=args.min_area, gdal_cache_mb=args.gdal_cache_mb,
        overwrite=args.overwrite)
    engines = build_engines(EngineSettings(
        select_device(args.device), model=configured_model(args.model),
        default_model=configured_default_model(args.default_model)))
    engine = engines.get(default_engine(str(prompt.task), engines.available()))
    with tqdm(unit="tile", disable=args.no_progress, file=sys.stderr, dynamic_ncols=True,
              desc="segmenting") as bar:

        def progress(done: int, total: int, text: str) -> None:
            bar.total = total
            bar.update(done - bar.n)

        summary = segment_raster(args.raster, prompt, engine, output, options, progress)
    print(summary)
    return 0
