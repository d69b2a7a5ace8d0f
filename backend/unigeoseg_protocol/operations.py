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

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple, Protocol, TypeVar

from numpy.typing import NDArray

from .errors import ErrorCode, ProtocolError, RemoteError
from .messages import Message, is_final
from .params import Georeference, Prompt, RasterOptions, SegmentOptions
from .vocabulary import ENGINES

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
        if engine not in ENGINES:
            raise _invalid(f"unknown engine {engine!r}; engines are {list(ENGINES)}")
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


#: The request type of each operation, by op name: what a backend parses a request with.
REQUEST_TYPES: dict[str, type[Request[Any]]] = {
    request.OP: request
    for request in (HelloRequest, SetImageRequest, SegmentRequest, CancelRequest,
                    StatusRequest, ShutdownRequest)
}

#: Operations a backend understands.
OPS = tuple(REQUEST_TYPES)
