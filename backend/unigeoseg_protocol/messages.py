"""Wire format: multipart ZeroMQ messages made of a JSON header and raw array frames.

Every message is ``[header, frame_1, ..., frame_n]``:

* ``header`` is UTF-8 JSON with at least ``v`` (protocol version) and ``id`` (request id).
  Requests add ``op``; replies add ``ok`` and either ``result`` or ``error``; progress
  events add ``event: "progress"``.
* Arrays travel as raw little-endian C-ordered buffers, one frame each, described in the
  header under ``arrays``: ``{"pixels": {"frame": 1, "dtype": "uint8", "shape": [H, W, C]}}``.

Nothing is ever unpickled: a frame is only ever reinterpreted as a numpy buffer of one of
the whitelisted dtypes. docs/protocol.md is the human-readable contract for this module.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

from .errors import ErrorCode, ProtocolError

#: One frame of a multipart message: bytes, a memoryview, or a ``zmq.Frame`` (received with
#: ``copy=False``; this module never imports zmq, so it is not named in the types).
Frame = Any

#: Version of the wire protocol; a peer speaking another major version is refused.
PROTOCOL_VERSION = 1

#: dtypes allowed in array frames (always little-endian on the wire).
WIRE_DTYPES = ("bool", "uint8", "int8", "uint16", "int16", "uint32", "int32", "float32", "float64")

#: Default cap on the bytes of one message (all frames together).
DEFAULT_MAX_MESSAGE_BYTES = 256 * 1024 * 1024

_MAX_NDIM = 4


@dataclass
class Message:
    """A decoded message: its JSON header and the arrays its frames carried."""

    header: dict[str, Any]
    arrays: dict[str, NDArray[Any]] = field(default_factory=dict)

    @property
    def id(self) -> str:
        request_id: str = self.header["id"]
        return request_id

    @property
    def op(self) -> str | None:
        op = self.header.get("op")
        return op if isinstance(op, str) else None

    @property
    def params(self) -> dict[str, Any]:
        params = self.header.get("params", {})
        return params if isinstance(params, dict) else {}


def encode_message(header: Mapping[str, Any],
                   arrays: Mapping[str, NDArray[Any]] | None = None) -> list[Frame]:
    """Build the frames of one message.

    Args:
        header: JSON-serialisable header; ``v`` is filled in when absent.
        arrays: name -> array; each becomes one raw frame described under ``header["arrays"]``.

    Returns:
        ``[header_bytes, buffer_1, ...]``, ready for ``socket.send_multipart``. Array buffers
        are passed without copying when they are already little-endian and C-contiguous.
    """
    header = dict(header)
    header.setdefault("v", PROTOCOL_VERSION)
    frames: list[Frame] = [b""]
    descriptors = {}
    for name, array in (arrays or {}).items():
        wire = _to_wire_array(name, np.asarray(array))
        descriptors[name] = {"frame": len(frames), "dtype": wire.dtype.name,
                             "shape": list(wire.shape)}
        frames.append(wire.data.cast("B") if wire.size else b"")
    if descriptors:
        header["arrays"] = descriptors
    frames[0] = json.dumps(header, allow_nan=False, separators=(",", ":")).encode("utf-8")
    return frames


def decode_message(frames: Sequence[Frame], max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> Message:
    """Parse and validate the frames of one message.

    Raises:
        ProtocolError: ``payload_too_large`` when the frames exceed ``max_bytes``,
            ``bad_message`` for a malformed header, ``unsupported_version`` for another
            protocol version, ``bad_frame`` for array frames that do not match their descriptors.
    """
    if not frames:
        raise ProtocolError(ErrorCode.BAD_MESSAGE, "empty message")
    if _nbytes(frames[0]) > max_bytes:
        raise ProtocolError(ErrorCode.PAYLOAD_TOO_LARGE,
                            f"header alone is {_nbytes(frames[0])} bytes, over the cap of "
                            f"{max_bytes} bytes", {"max_bytes": max_bytes})
    header = _parse_header(frames[0])  # before the total, so that a size error names the request
    total = sum(_nbytes(f) for f in frames)
    if total > max_bytes:
        raise ProtocolError(
            ErrorCode.PAYLOAD_TOO_LARGE,
            f"message is {total} bytes, over the cap of {max_bytes} bytes",
            {"bytes": total, "max_bytes": max_bytes}, request_id=header.get("id"),
        )
    arrays = _parse_arrays(header, frames)
    return Message(header=header, arrays=arrays)


def request_header(op: str, request_id: str, params: Mapping[str, Any] | None = None,
                   timeout_ms: int | None = None) -> dict[str, Any]:
    """Header of a request: ``{v, id, op, params[, timeout_ms]}``."""
    header: dict[str, Any] = {"v": PROTOCOL_VERSION, "id": request_id, "op": op,
                              "params": dict(params or {})}
    if timeout_ms is not None:
        header["timeout_ms"] = int(timeout_ms)
    return header


def ok_header(request_id: str, result: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Header of a successful final reply."""
    return {"v": PROTOCOL_VERSION, "id": request_id, "ok": True, "result": dict(result or {})}


def error_header(request_id: str | None, code: str, message: str,
                 details: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Header of a failed final reply; ``request_id`` is None when the request had none."""
    error: dict[str, Any] = {"code": str(code), "message": message}
    if details:
        error["details"] = dict(details)
    return {"v": PROTOCOL_VERSION, "id": request_id, "ok": False, "error": error}


def progress_header(request_id: str, done: int, total: int, message: str = "") -> dict[str, Any]:
    """Header of a progress event sent before the final reply of a long operation."""
    return {"v": PROTOCOL_VERSION, "id": request_id, "event": "progress",
            "done": int(done), "total": int(total), "message": message}


def is_final(header: Mapping[str, Any]) -> bool:
    """True for a final reply, False for a progress event."""
    return "ok" in header


# --------------------------------------------------------------------------- internals


def _nbytes(frame: Frame) -> int:
    if hasattr(frame, "nbytes"):
        return int(frame.nbytes)
    if hasattr(frame, "buffer"):  # zmq.Frame
        return len(frame.buffer)
    return len(frame)


def _as_buffer(frame: Frame) -> Frame:
    if hasattr(frame, "buffer") and not isinstance(frame, (bytes, bytearray, memoryview)):
        return frame.buffer  # zmq.Frame received with copy=False
    return frame


def _to_wire_array(name: str, array: NDArray[Any]) -> NDArray[Any]:
    if array.dtype.name not in WIRE_DTYPES:
        raise ProtocolError(ErrorCode.BAD_FRAME,
                            f"array {name!r}: dtype {array.dtype} cannot travel")
    if array.ndim > _MAX_NDIM:
        raise ProtocolError(ErrorCode.BAD_FRAME, f"array {name!r}: {array.ndim} dimensions")
    little = array.dtype.newbyteorder("<")
    return np.ascontiguousarray(array, dtype=little)


def _parse_header(frame: Frame) -> dict[str, Any]:
    raw = bytes(_as_buffer(frame))
    try:
        header = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, json.JSONDecodeError, ValueError) as exc:
        raise ProtocolError(ErrorCode.BAD_MESSAGE,
                            f"header is not valid UTF-8 JSON: {exc}") from None
    if not isinstance(header, dict):
        raise ProtocolError(ErrorCode.BAD_MESSAGE, "header must be a JSON object")
    request_id = header.get("id")
    if request_id is None and header.get("ok") is False:
        # An error reply to a request whose id could not be read carries "id": null.
        return header
    if not isinstance(request_id, str) or not 0 < len(request_id) <= 128:
        raise ProtocolError(ErrorCode.BAD_MESSAGE,
                            "header needs an 'id' string of 1 to 128 chars")
    version = header.get("v")
    if not isinstance(version, int) or isinstance(version, bool):
        raise ProtocolError(ErrorCode.BAD_MESSAGE, "header needs an integer 'v' (protocol version)",
                            request_id=request_id)
    if version != PROTOCOL_VERSION:
        raise ProtocolError(ErrorCode.UNSUPPORTED_VERSION,
                            f"protocol version {version} is not supported; this peer speaks "
                            f"{PROTOCOL_VERSION}", request_id=request_id)
    if "params" in header and not isinstance(header["params"], dict):
        raise ProtocolError(ErrorCode.BAD_MESSAGE, "'params' must be a JSON object",
                            request_id=request_id)
    return header


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not allowed in JSON")


def _parse_arrays(header: dict[str, Any], frames: Sequence[Frame]) -> dict[str, NDArray[Any]]:
    request_id = header["id"]
    descriptors = header.get("arrays", {})
    if not isinstance(descriptors, dict):
        raise ProtocolError(ErrorCode.BAD_MESSAGE, "'arrays' must be a JSON object",
                            request_id=request_id)
    arrays: dict[str, NDArray[Any]] = {}
    used_frames: set[int] = set()
    for name, desc in descriptors.items():
        index, dtype, shape = _check_descriptor(name, desc, request_id)
        if index >= len(frames):
            raise ProtocolError(ErrorCode.BAD_FRAME,
                                f"array {name!r} refers to frame {index}, but the message has "
                                f"{len(frames)} frames", request_id=request_id)
        if index in used_frames:
            raise ProtocolError(ErrorCode.BAD_FRAME, f"frame {index} is described twice",
                                request_id=request_id)
        used_frames.add(index)
        buffer = _as_buffer(frames[index])
        expected = dtype.itemsize * math.prod(shape)
        actual = _nbytes(frames[index])
        if actual != expected:
            raise ProtocolError(ErrorCode.BAD_FRAME,
                                f"array {name!r}: frame {index} has {actual} bytes, but dtype "
                                f"{dtype.name} and shape {shape} need {expected}",
                                request_id=request_id)
        arrays[name] = np.frombuffer(buffer, dtype=dtype).reshape(shape) if expected else \
            np.zeros(shape, dtype=dtype)
    extra = set(range(1, len(frames))) - used_frames
    if extra:
        raise ProtocolError(ErrorCode.BAD_FRAME,
                            f"frames {sorted(extra)} are not described in the header",
                            request_id=request_id)
    return arrays


def _check_descriptor(name: str, desc: Any,
                      request_id: str) -> tuple[int, np.dtype, tuple[int, ...]]:
    if not isinstance(desc, dict):
        raise ProtocolError(ErrorCode.BAD_MESSAGE, f"array {name!r}: descriptor must be an object",
                            request_id=request_id)
    index, dtype_name, shape = desc.get("frame"), desc.get("dtype"), desc.get("shape")
    if not isinstance(index, int) or isinstance(index, bool) or index < 1:
        raise ProtocolError(ErrorCode.BAD_FRAME, f"array {name!r}: 'frame' must be an integer >= 1",
                            request_id=request_id)
    if dtype_name not in WIRE_DTYPES:
        raise ProtocolError(ErrorCode.BAD_FRAME,
                            f"array {name!r}: dtype {dtype_name!r} is not one of {WIRE_DTYPES}",
                            request_id=request_id)
    if (not isinstance(shape, list) or len(shape) > _MAX_NDIM
            or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape)):
        raise ProtocolError(ErrorCode.BAD_FRAME,
                            f"array {name!r}: 'shape' must be a list of at most {_MAX_NDIM} "
                            f"non-negative integers", request_id=request_id)
    return index, np.dtype(dtype_name).newbyteorder("<"), tuple(shape)
