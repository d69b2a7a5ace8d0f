"""``unigeoseg predict``: segment a raster with points, a box or a text prompt, write a GeoPackage.

Runs the same Segmenter as the service, in this process, or sends the tile to a running
service with ``--server`` (so a warm GPU model is reused).

Points and boxes go to SAM. ``--text`` goes to UniGeoSeg (``--model``) on one window: the
window around ``--point`` / ``--box`` when given (they then only place the window), else the
raster's centre. ``--text --whole-raster`` tiles the whole raster (cli/predict_raster.py).
Where SAM or UniGeoSeg is not available, the default model answers instead: the one shipped
in the package, or the weights folder ``--default-model`` (else ``$UNIGEOSEG_DEFAULT_MODEL``)
names, e.g. a training run's export.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
import rasterio
from shapely.geometry import shape

from unigeoseg_protocol.params import Prompt, SegmentOptions
from unigeoseg_protocol.vocabulary import TEXT_TASKS

from ..errors import CRSError, InvalidInputError

#: Environment variable naming the default model's weights folder (model card and
#: safetensors) to use instead of the one shipped in the package.
DEFAULT_MODEL_ENV = "UNIGEOSEG_DEFAULT_MODEL"
DEFAULT_MODEL_HELP = ("the default model's weights folder (model_card.json and its "
                      "safetensors, e.g. a training run's export) to use instead of the one "
                      f"shipped in the package (default: ${DEFAULT_MODEL_ENV})")


def configured_default_model(explicit: Path | None) -> Path | None:
    """The default model's weights folder to use: the one given, else
    ``$UNIGEOSEG_DEFAULT_MODEL``, else None (the one shipped in the package).

    Raises:
        InvalidInputError: the folder named does not exist.
    """
    folder = explicit or (Path(os.environ[DEFAULT_MODEL_ENV]).expanduser()
                          if os.environ.get(DEFAULT_MODEL_ENV) else None)
    if folder is not None and not folder.is_dir():
        source = "--default-model" if explicit else f"${DEFAULT_MODEL_ENV}"
        raise InvalidInputError(f"the default model folder {folder} ({source}) does not exist")
    return folder


def _point(text: str) -> tuple[float, float, int]:
    parts = text.split(",")
    try:
        if len(parts) == 2:
            return float(parts[0]), float(parts[1]), 1
        if len(parts) == 3 and parts[2].strip() in ("0", "1"):
            return float(parts[0]), float(parts[1]), int(parts[2])
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"expected X,Y or X,Y,LABEL (LABEL 1 or 0), got {text!r}")


def _box(text: str) -> tuple[float, float, float, float]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 4:
        raise argparse.ArgumentTypeError(f"expected XMIN,YMIN,XMAX,YMAX, got {text!r}")
    return values  # type: ignore[return-value]


def add_predict_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "predict", help="segment a raster from points / a box / a text prompt into a GeoPackage",
        description="Segment one window of a raster and write the polygons (raster CRS). Points "
                    "and a box go to SAM. With --text, UniGeoSeg segments the window around "
                    "--point / --box (which then only place the window), or the raster's centre "
                    "window; --whole-raster segments the whole raster in overlapping tiles with "
                    "seams merged.")
    p.add_argument("raster", type=Path, help="GeoTIFF (or any GDAL raster)")
    p.add_argument("-o", "--output", type=Path, required=True, help="output .gpkg or .geojson")
    p.add_argument("--point", type=_point, action="append", default=[], metavar="X,Y[,LABEL]",
                   help="a prompt point in map coordinates; LABEL 1 (default) or 0; repeatable")
    p.add_argument("--box", type=_box, metavar="XMIN,YMIN,XMAX,YMAX", help="a prompt box")
    p.add_argument("--prompt-crs", help="CRS of --point / --box (default: the raster CRS)")
    p.add_argument("--text", help="instruction for UniGeoSeg, e.g. 'the warehouse with the blue "
                                  "roof'; one window (see --window), or the whole raster with "
                                  "--whole-raster")
    p.add_argument("--task", choices=TEXT_TASKS, default="referring",
                   help="task of --text (default referring)")
    p.add_argument("--model", metavar="PATH_OR_NAME",
                   help="UniGeoSeg model for --text: a released-layout directory or a name "
                        "under <weights cache>/models/ (default: $UNIGEOSEG_MODEL; with "
                        "--server, the service's is used)")
    p.add_argument("--default-model", type=Path, metavar="DIR",
                   help=f"{DEFAULT_MODEL_HELP}; with --server, the service's is used")
    p.add_argument("--sam-checkpoint", type=Path, help="SAM checkpoint (default: weights cache)")
    p.add_argument("--sam-type", default="vit_b", choices=["vit_b", "vit_l", "vit_h", "tiny"])
    p.add_argument("--device", default="auto")
    p.add_argument("--server", help="send the work to a running service at this address")
    p.add_argument("--bands", help="1-based bands to use as R,G,B (or one grey band)")
    p.add_argument("--window", type=int, default=None,
                   help="tile side in px read around the prompt (default 1024), or, with "
                        "--text, around the points / box or at the raster's centre (default 512)")
    p.add_argument("--simplify", type=float, default=0.0, help="tolerance in map units")
    p.add_argument("--min-area", type=float, default=0.0, help="in square map units")
    p.add_argument("--single-mask", action="store_true", help="skip SAM's multimask choice")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    from .predict_raster import add_whole_raster_arguments

    add_whole_raster_arguments(p)  # --whole-raster and its tiling options
    p.set_defaults(func=run_predict)


def run_predict(args: argparse.Namespace) -> int:
    if getattr(args, "whole_raster", False):
        from .predict_raster import run_predict_raster

        return run_predict_raster(args)
    from ..geo.crs import parse_crs
    from ..geo.grid import TileGrid
    from ..geo.raster_io import centre_window, prompt_window, read_tile
    from ..geo.vector_io import write_vector

    text = args.text.strip() if args.text else None
    if args.text is not None and not text:
        raise InvalidInputError("--text is empty")
    if text is None and not args.point and args.box is None:
        raise InvalidInputError("give at least one --point or a --box (or --text)")
    if args.output.exists() and not args.overwrite:
        raise InvalidInputError(f"{args.output} exists; pass --overwrite to replace it")
    window_px = args.window or (512 if text else 1024)
    bands = [int(b) for b in args.bands.split(",")] if args.bands else None
    points = tuple((x, y) for x, y, _ in args.point)
    if text:
        # The text engine reads the text; points and a box only choose the window. No
        # engine named: the backend's choice (UniGeoSeg, else the default model).
        prompt = Prompt(text=text, task=args.task)
        options = SegmentOptions(simplify=args.simplify,
                                 min_area=args.min_area)
    else:
        prompt = Prompt(points=points, labels=tuple(label for _, _, label in args.point),
                        box=args.box, task="interactive", crs=args.prompt_crs)
        options = SegmentOptions(multimask=not args.single_mask,
                                 simplify=args.simplify, min_area=args.min_area)

    with rasterio.open(args.raster) as dataset:
        if dataset.crs is None:
            raise CRSError(f"{args.raster} has no CRS; georeference it first")
        raster_crs = parse_crs(dataset.crs.to_wkt())
        full = TileGrid(crs=raster_crs, transform=dataset.transform, width=dataset.width,
                        height=dataset.height)
        src_crs = parse_crs(args.prompt_crs) if args.prompt_crs else None
        points_px = full.map_to_pixel(np.asarray(points, dtype=np.float64).reshape(-1, 2),
                                      src_crs) if points else None
        if points_px is not None:
            full.check_inside(points_px)
        box_px = full.box_to_pixel(args.box, src_crs) if args.box else None
        if points_px is None and box_px is None:
            window = centre_window(dataset, window_px)
        else:
            window = prompt_window(dataset, points_px, box_px, window_px)
        tile = read_tile(dataset, window, bands)

    if args.server:
        features, summary = _segment_remote(args.server, tile, prompt, options)
    else:
        features, summary = _segment_local(args, tile, prompt, options)
    geometries = [shape(f["geometry"]) for f in features["features"]]
    properties = [f["properties"] for f in features["features"]]
    write_vector(args.output, geometries, properties, raster_crs, overwrite=args.overwrite)
    print(f"{len(geometries)} polygon(s) written to {args.output} ({summary})")
    return 0


def _segment_local(args: argparse.Namespace, tile, prompt: Prompt, options: SegmentOptions):
    from ..engines.base import EngineSettings
    from ..runtime import build_engines, select_device
    from ..segmenter import Segmenter
    from ..weights import configured_model

    engines = build_engines(EngineSettings(
        select_device(args.device), args.sam_checkpoint, args.sam_type,
        configured_model(args.model) if prompt.text else None,
        configured_default_model(args.default_model)))
    segmenter = Segmenter(engines)
    record = segmenter.add_image(tile.pixels, tile.georeference, tile.raster)
    result = segmenter.segment(record, prompt, options)
    return result.features, _summary(result)


def _segment_remote(address: str, tile, prompt: Prompt, options: SegmentOptions):
    from unigeoseg_protocol.client import Client

    with Client(address, timeout_s=600) as client:
        reply = client.segment(prompt, options, pixels=tile.pixels,
                               georeference=tile.georeference, raster=tile.raster)
    return reply.features, _summary(reply, address)


def _summary(reply, address: str | None = None) -> str:
    """The run's summary line: score, engine and model, where, and the engine's message if
    any."""
    where = f" via {address}" if address else ""
    message = f"; {reply.message}" if reply.message else ""
    return f"score {reply.score:.3f}, engine {reply.engine}, model {reply.model}{where}{message}"
