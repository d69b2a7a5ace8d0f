"""The UniGeoSeg wire protocol, shared by the QGIS plugin and the backend.

Dependencies: the standard library, numpy and pyzmq only, so that QGIS's own Python can
import it. Use relative imports only: the plugin ships a copy of this package inside itself.
"""

from .curve import CurveClientKeys
from .errors import ErrorCode, ProtocolError, RemoteError, RequestTimeout
from .messages import (
    DEFAULT_MAX_MESSAGE_BYTES,
    OPS,
    PROTOCOL_VERSION,
    WIRE_DTYPES,
    Message,
    decode_message,
    encode_message,
    error_header,
    is_final,
    ok_header,
    progress_header,
    request_header,
)
from .params import Georeference, Prompt, RasterOptions, SegmentOptions
from .vocabulary import ENGINES, TASKS, TEXT_TASKS, default_engine, default_task

__all__ = [
    "DEFAULT_MAX_MESSAGE_BYTES", "ENGINES", "OPS", "PROTOCOL_VERSION", "TASKS", "TEXT_TASKS",
    "WIRE_DTYPES", "CurveClientKeys", "ErrorCode", "Georeference", "Message", "Prompt",
    "ProtocolError", "RasterOptions", "RemoteError", "RequestTimeout", "SegmentOptions",
    "decode_message", "default_engine", "default_task", "encode_message", "error_header",
    "is_final", "ok_header", "progress_header", "request_header",
]
