"""``unigeoseg``: serve the backend, segment a raster from the shell, manage weights.

Each subcommand returns an exit code: 0 success, 1 failure (a readable message on stderr),
2 bad usage (and for ``weights download``: the server could not be reached), 130 interrupted.
"""

from __future__ import annotations

import argparse
import gc
import logging
import signal
import sys
from pathlib import Path

from unigeoseg_protocol.errors import ProtocolError

from .. import __version__

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="unigeoseg", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"unigeoseg {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_serve_parser(sub)
    from .evaluate import add_eval_parser
    from .predict import add_predict_parser
    from .weights import add_weights_parser

    add_predict_parser(sub)
    add_eval_parser(sub)
    add_weights_parser(sub)
    train = sub.add_parser("train", help="train or fine-tune UniGeoSeg (docs/training.md)")
    train.add_argument("config", type=Path, help="the training TOML file")
    train.set_defaults(func=run_train)
    return parser


def run_train(args: argparse.Namespace) -> int:
    # Imported here: the backend never depends on the trainer package.
    from unigeoseg_trainer.train import run_from_file

    return run_from_file(args.config)


def _add_serve_parser(sub: argparse._SubParsersAction) -> None:
    from .predict import DEFAULT_MODEL_HELP

    serve = sub.add_parser("serve", help="run the ZeroMQ backend service")
    serve.add_argument("--address", help="endpoint to bind (default tcp://127.0.0.1:5557)")
    serve.add_argument("--config", type=Path, help="TOML file of service settings")
    serve.add_argument("--device", help="auto (default), cpu, cuda or cuda:N")
    serve.add_argument("--sam-checkpoint", type=Path, help="SAM checkpoint file (.pth)")
    serve.add_argument("--sam-type", choices=["vit_b", "vit_l", "vit_h", "tiny"],
                       help="SAM architecture of the checkpoint (default vit_b)")
    serve.add_argument("--model", metavar="PATH_OR_NAME",
                       help="UniGeoSeg model for text prompts (engine unigeoseg): a released-"
                            "layout directory, or a name under <weights cache>/models/; loaded "
                            "at startup on the same device (bfloat16 on CUDA, float32 on CPU); "
                            "default: the config file's model, else $UNIGEOSEG_MODEL")
    serve.add_argument("--default-model", type=Path, metavar="DIR", help=DEFAULT_MODEL_HELP)
    serve.add_argument("--max-message-mb", type=float, help="cap on one request's size")
    serve.add_argument("--queue-size", type=int, help="requests allowed to wait")
    serve.add_argument("--request-timeout", type=float, help="default per-request timeout (s)")
    serve.add_argument("--log-level", help="DEBUG, INFO (default), WARNING")
    serve.set_defaults(func=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    from ..engines.base import EngineSettings
    from ..runtime import build_engines, device_info, select_device
    from ..segmenter import Segmenter
    from ..service.config import ServiceConfig
    from ..service.logs import configure_logging
    from ..service.server import Service
    from ..weights import configured_model
    from .predict import configured_default_model

    config = ServiceConfig.from_toml(args.config) if args.config else ServiceConfig()
    max_bytes = int(args.max_message_mb * 1024 * 1024) if args.max_message_mb else None
    config = config.with_overrides(
        address=args.address, device=args.device, sam_checkpoint=args.sam_checkpoint,
        sam_type=args.sam_type, model=args.model, max_message_bytes=max_bytes,
        queue_size=args.queue_size, request_timeout_s=args.request_timeout,
        log_level=args.log_level)
    configure_logging(config.log_level)
    device = select_device(config.device)
    if config.model is None and configured_model(None) is not None:  # flags > TOML > env
        config = config.with_overrides(model=configured_model(None))
    engines = build_engines(EngineSettings(device, config.sam_checkpoint, config.sam_type,
                                           config.model,
                                           configured_default_model(args.default_model)))
    for name, reason in engines.reasons_unavailable().items():
        logger.warning("engine %s unavailable: %s", name, reason, extra={"engine": name})
    for name in engines.available():
        engines.get(name)  # load weights now: a bad checkpoint fails here, not on first click
        logger.info("engine %s loaded", name,
                    extra={"engine": name, "model": engines.loaded().get(name)})
    # The model's objects live as long as the process: take them out of the cyclic garbage
    # collector's walks, which otherwise add tens of ms to a click that allocates many lists.
    gc.collect()
    gc.freeze()
    segmenter = Segmenter(engines, config.image_cache_bytes, config.embedding_cache_bytes)
    service = Service(config, segmenter, device_info(device))
    service.start()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: service.stop())
    # The address line on stdout lets a parent process (plugin, tests) wait for readiness.
    print(f"unigeoseg serving on {service.bound_address}", flush=True)
    service.serve_forever()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ProtocolError as exc:
        print(f"unigeoseg {args.command}: error: {exc.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"unigeoseg {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
