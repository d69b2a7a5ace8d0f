"""Each operation's request and reply types: built by one side, validated and parsed by the other.

Every request type names its ``OP`` and has ``to_wire() -> (params, arrays)`` (what a client
sends), ``from_message(message)`` (what a backend accepts: every check that can be made before
the work is queued, raising the ProtocolError the client should see) and
``parse_reply(reply)`` (the typed reply). Every reply type has ``to_wire() -> (result,
arrays)`` (what a backend sends) and ``from_reply(reply)`` (what a client reads);
``from_message(message)`` reads and parses a message in one step; replies without arrays also
have ``to_result()`` / ``from_result(result)``.

:func:`read_reply` is the one interpretation of a reply header (progress, ok or error). A
transport (the blocking client, the plugin's event-loop connection) calls it once per received
message and hands the :class:`Reply` it returns to ``parse_reply``, which reads the header no
further. docs/protocol.md describes the fields on the wire and how to add an operation.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple, Protocol, TypeVar

from numpy.typing import NDArray

from .errors import ErrorCode, ProtocolError, RemoteError
from .messages import Message, is_final
from .params import Georeference, Prompt, RasterOptions, SegmentOptions
from .vocabulary import ENGINES, is_engine, is_model_name

#: The params (JSON object) and array frames of a request, or the result and arrays of a reply.
Wire = tuple[dict[str, Any], dict[str, NDArray[Any]]]

MAX_BANDS = 64

ReplyT_co = TypeVar("ReplyT_co", covariant=True)


class Request(Protocol[ReplyT_co]):
    """What every request type offers (see the module docstring)."""

    OP: ClassVar[str]

    def to_wire(self) -> Wire: ...

    @classmethod
    def from_message(cls, message: Message) -> Request[ReplyT_co]: ...

    def parse_reply(self, reply: Reply) -> ReplyT_co: ...


# --------------------------------------------------------------------------- reading replies


class Progress(NamedTuple):
    """A progress event: ``done`` of ``total`` steps, and a sentence about the current one."""

    done: int
    total: int
    text: str


@dataclass(frozen=True)
class Reply:
    """One message from the backend, interpreted.

    Attributes:
        message: the decoded message (its arrays travel with it).
        kind: ``progress`` (an event before the final reply), ``ok`` or ``error``.
        progress: the event, when ``kind == "progress"``.
        result: the ``result`` object, when ``kind == "ok"``.
        error: the backend's error, when ``kind == "error"``.
    """

    PROGRESS: ClassVar[str] = "progress"
    OK: ClassVar[str] = "ok"
    ERROR: ClassVar[str] = "error"

    message: Message
    kind: str
    progress: Progress | None = None
    result: dict[str, Any] = field(default_factory=dict)
    error: RemoteError | None = None

    @property
    def request_id(self) -> str | None:
        """The id of the request it answers (None in an error reply to an unreadable one)."""
        request_id = self.message.header.get("id")
        return request_id if isinstance(request_id, str) else None

    @property
    def is_final(self) -> bool:
        return self.kind != Reply.PROGRESS


def read_reply(message: Message) -> Reply:
    """Interpret a message from the backend. Tolerant: a malformed progress count reads as 0,
    an error without a code as ``internal``."""
    header = message.header
    if not is_final(header):
        return Reply(message, Reply.PROGRESS,
                     progress=Progress(_int(header.get("done")), _int(header.get("total")),
                                       str(header.get("message", ""))))
    if header["ok"]:
        result = header.get("result")
        return Reply(message, Reply.OK, result=result if isinstance(result, dict) else {})
    error = header.get("error")
    error = error if isinstance(error, dict) else {}
    details = error.get("details")
    request_id = header.get("id")
    return Reply(message, Reply.ERROR, error=RemoteError(
        _error_code(error.get("code")),
        str(error.get("message") or "the backend reported an error"),
        details if isinstance(details, dict) else None,
        request_id=request_id if isinstance(request_id, str) else None))


def final_result(reply: Reply) -> dict[str, Any]:
    """The result of a final ``ok`` reply (transports raise error replies before parsing).

    Raises:
        RemoteError: the reply is an error.
        ProtocolError: ``bad_message`` when it is a progress event.
    """
    if reply.error is not None:
        raise reply.error
    if reply.kind != Reply.OK:
        raise ProtocolError(ErrorCode.BAD_MESSAGE, "expected a final reply, got a progress event",
                            request_id=reply.request_id)
    return reply.result


def _int(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError, OverflowError):
        return 0


def _error_code(value: Any) -> ErrorCode | str:
    """The ErrorCode for a known code; a newer peer's unknown code stays a string."""
    if not isinstance(value, str) or not value:
        return ErrorCode.INTERNAL
    try:
        return ErrorCode(value)
    except ValueError:
        return value


_REQUIRED: Any = object()


def _field(result: Mapping[str, Any], key: str, kind: type | tuple[type, ...],
           default: Any = _REQUIRED) -> Any:
    """``result[key]`` checked against ``kind``; ``default`` when absent (if one is given)."""
    if key not in result or result[key] is None:
        if default is _REQUIRED:
            raise ProtocolError(ErrorCode.BAD_MESSAGE, f"the reply's result lacks {key!r}")
        return default
    value = result[key]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise ProtocolError(ErrorCode.BAD_MESSAGE,
                            f"the reply's {key!r} has the wrong type ({type(value).__name__})")
    return value


def _number(result: Mapping[str, Any], key: str, default: Any = _REQUIRED) -> Any:
    value = _field(result, key, (int, float), default)
    return value if value is None else float(value)


def _with_optional(result: dict[str, Any], **optional: Any) -> dict[str, Any]:
    """``result`` plus the keyword fields that are not None (absent ones stay off the wire)."""
    result.update({key: value for key, value in optional.items() if value is not None})
    return result


# --------------------------------------------------------------------------- request checks


def _invalid(message: str) -> ProtocolError:
    return ProtocolError(ErrorCode.INVALID_ARGUMENT, message)


def _pixels_frame(message: Message, op: str) -> NDArray[Any]:
    """The request's ``pixels`` frame: ``H x W`` or ``H x W x C`` with 1 to 64 bands."""
    pixels = message.arrays.get("pixels")
    if pixels is None:
        raise ProtocolError(ErrorCode.BAD_FRAME,
                            f"{op} needs an array frame named 'pixels' "
                            f"(or, for segment, an image_id)")
    if pixels.ndim not in (2, 3) or pixels.shape[0] == 0 or pixels.shape[1] == 0 \
            or (pixels.ndim == 3 and not 1 <= pixels.shape[2] <= MAX_BANDS):
        raise ProtocolError(ErrorCode.BAD_FRAME,
                            f"pixels must be H x W or H x W x C (1 to {MAX_BANDS} bands), got "
                            f"shape {list(pixels.shape)}")
    return pixels


def _tile_wire(pixels: NDArray[Any], georeference: Georeference,
               raster: RasterOptions) -> Wire:
    return ({"georeference": georeference.to_wire(), "raster": raster.to_wire()},
            {"pixels": pixels})


# --------------------------------------------------------------------------- set_image


@dataclass(frozen=True, eq=False)
class SetImageRequest:
    """Upload a tile; the backend encodes it for ``engine`` (or reuses the cached embedding).

    Attributes:
        pixels: ``H x W`` or ``H x W x C`` (1 to 64 bands), any wire dtype; row 0 is the row
            at the geotransform's origin.
        georeference: the tile's CRS and geotransform.
        raster: how its pixels become the model's 8-bit RGB.
        engine: one of ENGINES.
    """

    OP: ClassVar[str] = "set_image"

    pixels: NDArray[Any]
    georeference: Georeference
    raster: RasterOptions = RasterOptions()
    engine: str = "sam"

    def to_wire(self) -> Wire:
        params, arrays = _tile_wire(self.pixels, self.georeference, self.raster)
        params["engine"] = self.engine
        return params, arrays

    @classmethod
    def from_message(cls, message: Message) -> SetImageRequest:
        params = message.params
        pixels = _pixels_frame(message, cls.OP)
        georeference = Georeference.from_wire(params.get("georeference"))
        raster = RasterOptions.from_wire(params.get("raster"))
        engine = params.get("engine", "sam")
        if not is_engine(engine):
            raise _invalid(f"unknown engine {engine!r}; engines are {list(ENGINES)} and "
                           f"fine-tuned models ('default:<name>', listed by hello)")
        return cls(pixels=pixels, georeference=georeference, raster=raster, engine=engine)

    def parse_reply(self, reply: Reply) -> SetImageReply:
        return SetImageReply.from_reply(reply)


_R = TypeVar("_R", bound="_ResultReply")


class _ResultReply:
    """Base of the reply types whose whole content is the header's ``result``."""

    def to_result(self) -> dict[str, Any]:
        raise NotImplementedError

    @classmethod
    def from_result(cls: type[_R], result: Mapping[str, Any]) -> _R:
        raise NotImplementedError

    def to_wire(self) -> Wire:
        return self.to_result(), {}

    @classmethod
    def from_reply(cls: type[_R], reply: Reply) -> _R:
        return cls.from_result(final_result(reply))

    @classmethod
    def from_message(cls: type[_R], message: Message) -> _R:
        """Read ``message`` (:func:`read_reply`) and parse it."""
        return cls.from_reply(read_reply(message))


@dataclass(frozen=True)
class SetImageReply(_ResultReply):
    """The tile is registered and encoded.

    Attributes:
        image_id: content hash of pixels, georeference and raster options (see ``segment``).
        width, height: the tile's size in pixels.
        engine, model: what encoded it.
        embedding: ``computed``, or ``cached`` when this tile had been encoded before.
        valid_fraction: the fraction of pixels that are not nodata.
        elapsed_ms: time the segmenter took; ``server_ms``: the whole request in the worker.
    """

    image_id: str
    width: int
    height: int
    engine: str
    model: str
    embedding: str
    valid_fraction: float
    elapsed_ms: float
    server_ms: float | None = None

    def to_result(self) -> dict[str, Any]:
        return _with_optional(
            {"image_id": self.image_id, "width": self.width, "height": self.height,
             "engine": self.engine, "model": self.model, "embedding": self.embedding,
             "valid_fraction": self.valid_fraction, "elapsed_ms": self.elapsed_ms},
            server_ms=self.server_ms)

    @classmethod
    def from_result(cls, result: Mapping[str, Any]) -> SetImageReply:
        return cls(image_id=_field(result, "image_id", str), width=_field(result, "width", int),
                   height=_field(result, "height", int), engine=_field(result, "engine", str),
                   model=_field(result, "model", str),
                   embedding=_field(result, "embedding", str),
                   valid_fraction=_number(result, "valid_fraction"),
                   elapsed_ms=_number(result, "elapsed_ms"),
                   server_ms=_number(result, "server_ms", None))


# --------------------------------------------------------------------------- segment


@dataclass(frozen=True, eq=False)
class SegmentRequest:
    """Segment a cached image (``image_id``) or an inline tile (``pixels`` + georeference).

    Exactly one of ``image_id`` and ``pixels`` is given; ``pixels`` needs ``georeference``,
    and ``raster`` then defaults to RasterOptions() (it stays None with an ``image_id``).
    """

    OP: ClassVar[str] = "segment"

    prompt: Prompt
    options: SegmentOptions = SegmentOptions()
    image_id: str | None = None
    pixels: NDArray[Any] | None = None
    georeference: Georeference | None = None
    raster: RasterOptions | None = None

    def __post_init__(self) -> None:
        if (self.image_id is None) == (self.pixels is None) \
                or (self.pixels is not None and self.georeference is None):
            raise ValueError("segment needs an image_id, or pixels with a georeference "
                             "(not both)")
        if self.pixels is not None and self.raster is None:
            object.__setattr__(self, "raster", RasterOptions())

    def to_wire(self) -> Wire:
        arrays: dict[str, NDArray[Any]] = {}
        if self.image_id is not None:
            params: dict[str, Any] = {"image_id": self.image_id}
        else:
            assert self.pixels is not None and self.georeference is not None \
                and self.raster is not None  # __post_init__
            params, arrays = _tile_wire(self.pixels, self.georeference, self.raster)
        params["prompt"] = self.prompt.to_wire()
        params["options"] = self.options.to_wire()
        return params, arrays

    @classmethod
    def from_message(cls, message: Message) -> SegmentRequest:
        params = message.params
        if "image_id" in params:
            image_id = params["image_id"]
            if not isinstance(image_id, str) or not image_id:
                raise _invalid("image_id must be a non-empty string")
            tile: dict[str, Any] = {"image_id": image_id}
        else:
            tile = {"pixels": _pixels_frame(message, cls.OP),
                    "georeference": Georeference.from_wire(params.get("georeference")),
                    "raster": RasterOptions.from_wire(params.get("raster"))}
        return cls(prompt=Prompt.from_wire(params.get("prompt")),
                   options=SegmentOptions.from_wire(params.get("options")), **tile)

    def parse_reply(self, reply: Reply) -> SegmentReply:
        return SegmentReply.from_reply(reply)


@dataclass(frozen=True, eq=False)
class SegmentReply:
    """The segmentation of one prompt.

    Attributes:
        image_id: the image segmented (a new id when the request sent the tile inline).
        features: GeoJSON FeatureCollection in the request's ``output_crs`` (else the tile
            CRS), named by its 2008-style ``crs`` member.
        score: the engine's confidence in the mask.
        engine, model: what answered.
        timings_ms: ``encode_ms`` (0 when the embedding was cached), ``decode_ms``,
            ``polygonize_ms``.
        mask: ``H x W`` uint8 0/1 on the tile grid, when the request asked ``return_mask``.
        server_ms: the whole request in the worker.
        message: a sentence for the analyst from the engine, or None: why there are no
            polygons (a prompt it did not understand, and what it does know), or an
            assumption it made.
    """

    image_id: str
    features: dict[str, Any]
    score: float
    engine: str
    model: str
    timings_ms: dict[str, float] = field(default_factory=dict)
    mask: NDArray[Any] | None = None
    server_ms: float | None = None
    message: str | None = None

    def to_result(self) -> dict[str, Any]:
        return _with_optional(
            {"image_id": self.image_id, "features": self.features, "score": self.score,
             "engine": self.engine, "model": self.model, "timings_ms": self.timings_ms},
            server_ms=self.server_ms, message=self.message)

    def to_wire(self) -> Wire:
        return self.to_result(), ({} if self.mask is None else {"mask": self.mask})

    @classmethod
    def from_message(cls, message: Message) -> SegmentReply:
        """Read ``message`` (:func:`read_reply`) and parse it."""
        return cls.from_reply(read_reply(message))

    @classmethod
    def from_reply(cls, reply: Reply) -> SegmentReply:
        result = final_result(reply)
        features = _field(result, "features", dict)
        if features.get("type") != "FeatureCollection" or \
                not isinstance(features.get("features"), list):
            raise ProtocolError(ErrorCode.BAD_MESSAGE,
                                "the reply's 'features' is not a GeoJSON FeatureCollection")
        return cls(image_id=_field(result, "image_id", str), features=features,
                   score=_number(result, "score"), engine=_field(result, "engine", str),
                   model=_field(result, "model", str),
                   timings_ms=dict(_field(result, "timings_ms", dict, {})),
                   mask=reply.message.arrays.get("mask"),
                   server_ms=_number(result, "server_ms", None),
                   message=_field(result, "message", str, None))


# --------------------------------------------------------------------------- cancel


@dataclass(frozen=True)
class CancelRequest:
    """Cancel ``target``, a request sent earlier on the same connection."""

    OP: ClassVar[str] = "cancel"

    target: str

    def to_wire(self) -> Wire:
        return {"target": self.target}, {}

    @classmethod
    def from_message(cls, message: Message) -> CancelRequest:
        target = message.params.get("target")
        if not isinstance(target, str):
            raise _invalid("cancel needs params.target, the id of the request to cancel")
        return cls(target)

    def parse_reply(self, reply: Reply) -> CancelReply:
        return CancelReply.from_reply(reply)


@dataclass(frozen=True)
class CancelReply(_ResultReply):
    """Whether ``target`` was stopped: ``was`` ``queued`` or ``running``; else ``reason``."""

    target: str
    cancelled: bool
    was: str | None = None
    reason: str | None = None

    def to_result(self) -> dict[str, Any]:
        return _with_optional({"target": self.target, "cancelled": self.cancelled},
                              was=self.was, reason=self.reason)

    @classmethod
    def from_result(cls, result: Mapping[str, Any]) -> CancelReply:
        return cls(target=_field(result, "target", str),
                   cancelled=_field(result, "cancelled", bool),
                   was=_field(result, "was", str, None), reason=_field(result, "reason", str, None))


# ------------------------------------------------------------------- hello, status, shutdown


_P = TypeVar("_P", bound="_ParameterlessRequest")


class _ParameterlessRequest:
    """Base of the requests without params (any params sent are ignored)."""

    OP: ClassVar[str]

    def to_wire(self) -> Wire:
        return {}, {}

    @classmethod
    def from_message(cls: type[_P], message: Message) -> _P:
        return cls()

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self)

    def __hash__(self) -> int:
        return hash(type(self))


@dataclass(frozen=True)
class EngineInfo:
    """One engine in ``hello``: whether it can answer, what it loaded, which tasks it does."""

    available: bool
    loaded: bool = False
    model: str | None = None
    tasks: tuple[str, ...] = ()
    reason: str | None = None  #: why it is not available
    #: what its model is, for an engine that says (the default model: ``name``, ``version``,
    #: ``classes`` it was trained to find, ``gsd_m`` it was trained at, ``limits``)
    about: dict[str, Any] | None = None

    def to_wire(self) -> dict[str, Any]:
        if not self.available:
            return {"available": False, "reason": self.reason}
        return _with_optional({"available": True, "loaded": self.loaded, "model": self.model,
                               "tasks": list(self.tasks)}, about=self.about)

    @classmethod
    def from_wire(cls, value: Any) -> EngineInfo:
        if not isinstance(value, dict):
            raise ProtocolError(ErrorCode.BAD_MESSAGE, "an engine in 'hello' is not an object")
        tasks = _field(value, "tasks", list, [])
        return cls(available=_field(value, "available", bool, False),
                   loaded=_field(value, "loaded", bool, False),
                   model=_field(value, "model", str, None),
                   tasks=tuple(str(task) for task in tasks),
                   reason=_field(value, "reason", str, None),
                   about=_field(value, "about", dict, None))


@dataclass(frozen=True)
class HelloReply(_ResultReply):
    """Who the backend is, which engines it offers and on what device.

    Attributes:
        gpu: ``{"name", "memory_bytes"}``, or None on a CPU.
        max_message_bytes: the backend's cap on one message.
        authenticated: whether the backend requires CURVE.
    """

    protocol_version: int
    backend_version: str
    engines: dict[str, EngineInfo]
    device: str
    gpu: dict[str, Any] | None = None
    torch_version: str | None = None
    max_message_bytes: int | None = None
    authenticated: bool = False

    def engine(self, name: str) -> EngineInfo:
        """The engine ``name``; unavailable (with a reason) when the backend does not list it."""
        return self.engines.get(name) or EngineInfo(
            available=False, reason=f"the backend does not offer the {name} engine")

    def to_result(self) -> dict[str, Any]:
        result: dict[str, Any] = {
            "protocol_version": self.protocol_version, "backend_version": self.backend_version,
            "engines": {name: info.to_wire() for name, info in self.engines.items()},
            "device": self.device, "gpu": self.gpu}
        return _with_optional(result, torch_version=self.torch_version,
                              max_message_bytes=self.max_message_bytes,
                              authenticated=self.authenticated)

    @classmethod
    def from_result(cls, result: Mapping[str, Any]) -> HelloReply:
        engines = _field(result, "engines", dict, {})
        return cls(protocol_version=_field(result, "protocol_version", int),
                   backend_version=_field(result, "backend_version", str, "?"),
                   engines={str(name): EngineInfo.from_wire(info)
                            for name, info in engines.items()},
                   device=_field(result, "device", str, "?"),
                   gpu=_field(result, "gpu", dict, None),
                   torch_version=_field(result, "torch_version", str, None),
                   max_message_bytes=_field(result, "max_message_bytes", int, None),
                   authenticated=_field(result, "authenticated", bool, False))


class HelloRequest(_ParameterlessRequest):
    """Ask who the backend is (also the plugin's heartbeat)."""

    OP = "hello"

    def parse_reply(self, reply: Reply) -> HelloReply:
        return HelloReply.from_reply(reply)


class RunningRequest(NamedTuple):
    """The request the worker is running: its id and op."""

    id: str
    op: str


@dataclass(frozen=True)
class StatusReply(_ResultReply):
    """The backend's queue and caches."""

    queued: int
    running: RunningRequest | None
    served: int
    encodes: int
    images_cached: int
    embeddings_cached: int
    embedding_cache_bytes: int
    uptime_s: float

    def to_result(self) -> dict[str, Any]:
        return {"queued": self.queued,
                "running": None if self.running is None else self.running._asdict(),
                "served": self.served, "encodes": self.encodes,
                "images_cached": self.images_cached, "embeddings_cached": self.embeddings_cached,
                "embedding_cache_bytes": self.embedding_cache_bytes, "uptime_s": self.uptime_s}

    @classmethod
    def from_result(cls, result: Mapping[str, Any]) -> StatusReply:
        running = _field(result, "running", dict, None)
        return cls(queued=_field(result, "queued", int),
                   running=None if running is None else RunningRequest(
                       _field(running, "id", str), _field(running, "op", str)),
                   served=_field(result, "served", int), encodes=_field(result, "encodes", int),
                   images_cached=_field(result, "images_cached", int),
                   embeddings_cached=_field(result, "embeddings_cached", int),
                   embedding_cache_bytes=_field(result, "embedding_cache_bytes", int),
                   uptime_s=_number(result, "uptime_s"))


class StatusRequest(_ParameterlessRequest):
    """Ask for the backend's queue and caches."""

    OP = "status"

    def parse_reply(self, reply: Reply) -> StatusReply:
        return StatusReply.from_reply(reply)


@dataclass(frozen=True)
class ShutdownReply(_ResultReply):
    """The backend is stopping: queued requests are answered ``shutting_down``."""

    stopping: bool = True

    def to_result(self) -> dict[str, Any]:
        return {"stopping": self.stopping}

    @classmethod
    def from_result(cls, result: Mapping[str, Any]) -> ShutdownReply:
        return cls(stopping=_field(result, "stopping", bool))


class ShutdownRequest(_ParameterlessRequest):
    """Ask the backend to stop."""

    OP = "shutdown"

    def parse_reply(self, reply: Reply) -> ShutdownReply:
        return ShutdownReply.from_reply(reply)


# --------------------------------------------------------------------------- training

#: The most bytes one ``train_upload`` carries: a chip set's file, or one piece of a bigger one.
MAX_UPLOAD_CHUNK_BYTES = 4 << 20
#: The file names a chip set may hold (docs/datasets.md, the ``local`` layout).
UPLOAD_SUFFIXES = (".png", ".jsonl", ".json")
#: How deep a chip set's folders may nest, and how long a relative path may be.
MAX_UPLOAD_DEPTH = 4
MAX_UPLOAD_PATH_CHARS = 200
#: Bounds of a job's budget.
MAX_TRAIN_STEPS = 100_000
MAX_TRAIN_SECONDS = 7 * 24 * 3600.0
MAX_TRAIN_EPOCHS = 10_000
#: The most loss-curve events one ``train_status`` reply carries (ask again from ``cursor``).
MAX_EVENTS_PER_REPLY = 500

#: A training job's states; the last three are final.
TRAINING_STATES = ("queued", "running", "succeeded", "failed", "cancelled")
FINAL_TRAINING_STATES = ("succeeded", "failed", "cancelled")

_ID_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,64}")


def _identifier(params: Mapping[str, Any], key: str, what: str) -> str:
    value = params.get(key)
    if not isinstance(value, str) or _ID_PATTERN.fullmatch(value) is None:
        raise _invalid(f"{key} must name {what}: 1 to 64 letters, digits, '_' or '-'")
    return value


def check_upload_path(path: Any) -> str:
    """``path`` if it may name a file of a chip set: relative, '/'-separated, without '.',
    '..', hidden or empty parts, ending in one of UPLOAD_SUFFIXES.

    Raises:
        ProtocolError: ``invalid_argument`` saying what is wrong with it.
    """
    if not isinstance(path, str) or not path:
        raise _invalid("path must be the file's path inside the chip set, e.g. 'train.jsonl'")
    if len(path) > MAX_UPLOAD_PATH_CHARS:
        raise _invalid(f"path is longer than {MAX_UPLOAD_PATH_CHARS} characters")
    if path.startswith("/") or "\\" in path or ":" in path or "\x00" in path:
        raise _invalid(f"path {path!r} must be relative, with '/' between folders "
                       f"(no drive, no backslash)")
    parts = path.split("/")
    if any(part in ("", ".", "..") or part.startswith(".") for part in parts):
        raise _invalid(f"path {path!r} may not hold '..', '.', hidden or empty parts")
    if len(parts) > MAX_UPLOAD_DEPTH:
        raise _invalid(f"path {path!r} nests deeper than {MAX_UPLOAD_DEPTH} folders")
    if not parts[-1].lower().endswith(UPLOAD_SUFFIXES):
        raise _invalid(f"path {path!r}: a chip set holds only {', '.join(UPLOAD_SUFFIXES)} "
                       f"files")
    return path


@dataclass(frozen=True, eq=False)
class TrainUploadRequest:
    """Upload one file of a chip set (or a piece of it) into the backend's upload ``upload``.

    Attributes:
        upload: the client's name for this chip set (1 to 64 letters, digits, ``_``, ``-``;
            e.g. ``uuid.uuid4().hex``); the first file creates it.
        path: the file's path inside the chip set (``check_upload_path``).
        data: 1-D uint8, the file's bytes from ``offset`` on (at most MAX_UPLOAD_CHUNK_BYTES).
        offset: where ``data`` goes: 0 starts the file (replacing an earlier one), else the
            file's size so far (the next piece of a big file).
    """

    OP: ClassVar[str] = "train_upload"

    upload: str
    path: str
    data: NDArray[Any]
    offset: int = 0

    def to_wire(self) -> Wire:
        return ({"upload": self.upload, "path": self.path, "offset": self.offset},
                {"data": self.data})

    @classmethod
    def from_message(cls, message: Message) -> TrainUploadRequest:
        params = message.params
        upload = _identifier(params, "upload", "the chip set being uploaded")
        path = check_upload_path(params.get("path"))
        offset = params.get("offset", 0)
        if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0:
            raise _invalid("offset must be a non-negative integer")
        data = message.arrays.get("data")
        if data is None or data.dtype != "uint8" or data.ndim != 1:
            raise ProtocolError(ErrorCode.BAD_FRAME,
                                "train_upload needs a 1-D uint8 array frame named 'data' "
                                "holding the file's bytes")
        if data.size > MAX_UPLOAD_CHUNK_BYTES:
            raise ProtocolError(ErrorCode.PAYLOAD_TOO_LARGE,
                                f"one train_upload carries at most {MAX_UPLOAD_CHUNK_BYTES} "
                                f"bytes; send {path} in pieces (offset)",
                                {"max_bytes": MAX_UPLOAD_CHUNK_BYTES})
        return cls(upload=upload, path=path, data=data, offset=offset)

    def parse_reply(self, reply: Reply) -> TrainUploadReply:
        return TrainUploadReply.from_reply(reply)


@dataclass(frozen=True)
class TrainUploadReply(_ResultReply):
    """The file is stored: its ``size`` so far, and the upload's ``files`` and ``total_bytes``."""

    upload: str
    path: str
    size: int
    files: int
    total_bytes: int

    def to_result(self) -> dict[str, Any]:
        return {"upload": self.upload, "path": self.path, "size": self.size,
                "files": self.files, "total_bytes": self.total_bytes}

    @classmethod
    def from_result(cls, result: Mapping[str, Any]) -> TrainUploadReply:
        return cls(upload=_field(result, "upload", str), path=_field(result, "path", str),
                   size=_field(result, "size", int), files=_field(result, "files", int),
                   total_bytes=_field(result, "total_bytes", int))


@dataclass(frozen=True)
class TrainStartRequest:
    """Start fine-tuning ``base`` on a chip set into a new model called ``name``.

    Attributes:
        name: the new model's name (``vocabulary.MODEL_NAME_PATTERN``); it is then offered as
            the engine ``default:<name>``.
        base: the engine whose model is fine-tuned: ``default``, or a fine-tuned one
            (``default:<name>``) to continue from.
        upload: the chip set uploaded with ``train_upload``; or
        chips_dir: a chip-set folder on the backend's machine (a local backend only).
        max_steps: optimizer steps; epochs: passes over the training records (the backend
            turns them into steps with its batch size); max_seconds: a time budget. At least
            one is given; with several, the job stops at the first one reached.
    """

    OP: ClassVar[str] = "train_start"

    name: str
    base: str = "default"
    upload: str | None = None
    chips_dir: str | None = None
    max_steps: int | None = None
    max_seconds: float | None = None
    epochs: float | None = None

    def __post_init__(self) -> None:
        if (self.upload is None) == (self.chips_dir is None):
            raise ValueError("train_start needs an upload or a chips_dir (not both)")
        if self.max_steps is None and self.max_seconds is None and self.epochs is None:
            raise ValueError("train_start needs a budget: max_steps, epochs or max_seconds")

    def to_wire(self) -> Wire:
        return _with_optional({"name": self.name, "base": self.base}, upload=self.upload,
                              chips_dir=self.chips_dir, max_steps=self.max_steps,
                              max_seconds=self.max_seconds, epochs=self.epochs), {}

    @classmethod
    def from_message(cls, message: Message) -> TrainStartRequest:
        params = message.params
        name = params.get("name")
        if not is_model_name(name):
            raise _invalid("name must name the new model: 1 to 64 letters, digits, '.', '_' "
                           "or '-', starting with a letter or digit")
        base = params.get("base", "default")
        if not is_engine(base):
            raise _invalid(f"base must be an engine, one of {list(ENGINES)} or a fine-tuned "
                           f"model ('default:<name>'), got {base!r}")
        upload = (_identifier(params, "upload", "a chip set sent with train_upload")
                  if params.get("upload") is not None else None)
        chips_dir = params.get("chips_dir")
        if chips_dir is not None and (not isinstance(chips_dir, str) or not chips_dir):
            raise _invalid("chips_dir must be a folder path")
        if (upload is None) == (chips_dir is None):
            raise _invalid("train_start needs the chips: an upload id (train_upload) or a "
                           "chips_dir on the backend's machine, not both")
        max_steps = params.get("max_steps")
        if max_steps is not None and (not isinstance(max_steps, int)
                                      or isinstance(max_steps, bool)
                                      or not 1 <= max_steps <= MAX_TRAIN_STEPS):
            raise _invalid(f"max_steps must be an integer from 1 to {MAX_TRAIN_STEPS}")
        max_seconds = params.get("max_seconds")
        if max_seconds is not None and (not isinstance(max_seconds, int | float)
                                        or isinstance(max_seconds, bool)
                                        or not 0 < max_seconds <= MAX_TRAIN_SECONDS):
            raise _invalid(f"max_seconds must be a number of seconds from 1 to "
                           f"{MAX_TRAIN_SECONDS:.0f}")
        epochs = params.get("epochs")
        if epochs is not None and (not isinstance(epochs, int | float)
                                   or isinstance(epochs, bool)
                                   or not 0 < epochs <= MAX_TRAIN_EPOCHS):
            raise _invalid(f"epochs must be a number of passes over the training chips, more "
                           f"than 0 and at most {MAX_TRAIN_EPOCHS}")
        if max_steps is None and max_seconds is None and epochs is None:
            raise _invalid("train_start needs a budget: max_steps, epochs or max_seconds")
        return cls(name=name, base=base, upload=upload, chips_dir=chips_dir,
                   max_steps=max_steps,
                   max_seconds=None if max_seconds is None else float(max_seconds),
                   epochs=None if epochs is None else float(epochs))

    def parse_reply(self, reply: Reply) -> TrainJobReply:
        return TrainJobReply.from_reply(reply)


@dataclass(frozen=True)
class TrainStatusRequest:
    """Ask how job ``job`` is doing, with the loss-curve events after ``after`` (a
    ``cursor`` of an earlier reply; 0 for all)."""

    OP: ClassVar[str] = "train_status"

    job: str
    after: int = 0

    def to_wire(self) -> Wire:
        return {"job": self.job, "after": self.after}, {}

    @classmethod
    def from_message(cls, message: Message) -> TrainStatusRequest:
        after = message.params.get("after", 0)
        if not isinstance(after, int) or isinstance(after, bool) or after < 0:
            raise _invalid("after must be a non-negative integer (a reply's cursor)")
        return cls(job=_identifier(message.params, "job", "a training job"), after=after)

    def parse_reply(self, reply: Reply) -> TrainJobReply:
        return TrainJobReply.from_reply(reply)


@dataclass(frozen=True)
class TrainCancelRequest:
    """Stop job ``job``: its process ends within seconds and no model is registered."""

    OP: ClassVar[str] = "train_cancel"

    job: str

    def to_wire(self) -> Wire:
        return {"job": self.job}, {}

    @classmethod
    def from_message(cls, message: Message) -> TrainCancelRequest:
        return cls(job=_identifier(message.params, "job", "a training job"))

    def parse_reply(self, reply: Reply) -> TrainJobReply:
        return TrainJobReply.from_reply(reply)


@dataclass(frozen=True)
class TrainEvent:
    """One point of a job's live curve: after ``step`` optimizer steps, ``elapsed_s`` into
    the job, the training ``loss`` and/or the held-out ``val_iou``."""

    step: int
    elapsed_s: float
    loss: float | None = None
    val_iou: float | None = None

    def to_wire(self) -> dict[str, Any]:
        return _with_optional({"step": self.step, "elapsed_s": self.elapsed_s},
                              loss=self.loss, val_iou=self.val_iou)

    @classmethod
    def from_wire(cls, value: Any) -> TrainEvent:
        if not isinstance(value, dict):
            raise ProtocolError(ErrorCode.BAD_MESSAGE, "a training event is not an object")
        return cls(step=_field(value, "step", int), elapsed_s=_number(value, "elapsed_s"),
                   loss=_number(value, "loss", None), val_iou=_number(value, "val_iou", None))


@dataclass(frozen=True)
class TrainJobReply(_ResultReply):
    """A training job as it stands (the reply of ``train_start``, ``train_status`` and
    ``train_cancel``).

    Attributes:
        job: its id; name: the model it makes; base: the engine it fine-tunes.
        state: one of TRAINING_STATES.
        step, max_steps: optimizer steps done and planned.
        elapsed_s: seconds since it started running (0 while queued).
        loss: the latest training loss; eta_s: seconds left, estimated; both None until known.
        before_iou, after_iou: mean IoU on the held-out (val) chips before the first step and
            after the last, once measured.
        engine: what requests name to use the new model (``default:<name>``), once it
            succeeded.
        message: why it failed or was cancelled, or a note, for the analyst.
        data: what it trains on: ``chips``, ``objects``, ``train_records``, ``val_records``,
            ``instructions``.
        events: the curve's points after the request's ``after`` (at most
            MAX_EVENTS_PER_REPLY); cursor: the ``after`` that asks for the next ones.
    """

    job: str
    name: str
    base: str
    state: str
    step: int = 0
    max_steps: int | None = None
    elapsed_s: float = 0.0
    loss: float | None = None
    eta_s: float | None = None
    before_iou: float | None = None
    after_iou: float | None = None
    engine: str | None = None
    message: str | None = None
    data: dict[str, Any] | None = None
    events: tuple[TrainEvent, ...] = ()
    cursor: int = 0

    @property
    def finished(self) -> bool:
        return self.state in FINAL_TRAINING_STATES

    def to_result(self) -> dict[str, Any]:
        return _with_optional(
            {"job": self.job, "name": self.name, "base": self.base, "state": self.state,
             "step": self.step, "elapsed_s": self.elapsed_s,
             "events": [event.to_wire() for event in self.events], "cursor": self.cursor},
            max_steps=self.max_steps, loss=self.loss, eta_s=self.eta_s,
            before_iou=self.before_iou, after_iou=self.after_iou, engine=self.engine,
            message=self.message, data=self.data)

    @classmethod
    def from_result(cls, result: Mapping[str, Any]) -> TrainJobReply:
        state = _field(result, "state", str)
        if state not in TRAINING_STATES:
            raise ProtocolError(ErrorCode.BAD_MESSAGE, f"unknown training state {state!r}")
        return cls(job=_field(result, "job", str), name=_field(result, "name", str),
                   base=_field(result, "base", str), state=state,
                   step=_field(result, "step", int, 0),
                   max_steps=_field(result, "max_steps", int, None),
                   elapsed_s=_number(result, "elapsed_s", 0.0),
                   loss=_number(result, "loss", None), eta_s=_number(result, "eta_s", None),
                   before_iou=_number(result, "before_iou", None),
                   after_iou=_number(result, "after_iou", None),
                   engine=_field(result, "engine", str, None),
                   message=_field(result, "message", str, None),
                   data=_field(result, "data", dict, None),
                   events=tuple(TrainEvent.from_wire(event)
                                for event in _field(result, "events", list, [])),
                   cursor=_field(result, "cursor", int, 0))


#: The request type of each operation, by op name: what a backend parses a request with.
REQUEST_TYPES: dict[str, type[Request[Any]]] = {
    request.OP: request
    for request in (HelloRequest, SetImageRequest, SegmentRequest, CancelRequest,
                    StatusRequest, ShutdownRequest, TrainUploadRequest, TrainStartRequest,
                    TrainStatusRequest, TrainCancelRequest)
}

#: Operations a backend understands.
OPS = tuple(REQUEST_TYPES)
