"""The UniGeoSeg wire protocol, shared by the QGIS plugin and the backend.

Layout: ``messages`` (frames <-> header + arrays), ``params`` (typed parameters), ``operations``
(each operation's request and reply types, ``read_reply``), ``vocabulary`` (tasks, engines),
``errors`` (error codes), ``curve`` (client keys) and ``client`` (a blocking client; the only
module that imports pyzmq, so it is not imported here).

Dependencies: the standard library and numpy (pyzmq for ``client``), so that QGIS's own Python
can import it. Use relative imports only: the plugin ships a copy of this package inside itself.
"""

from .curve import CurveClientKeys
from .errors import ErrorCode, ProtocolError, RemoteError, RequestTimeout
from .messages import (
    DEFAULT_MAX_MESSAGE_BYTES,
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
from .operations import (
    OPS,
    REQUEST_TYPES,
    CancelReply,
    CancelRequest,
    EngineInfo,
    HelloReply,
    HelloRequest,
    Progress,
    Reply,
    Request,
    RunningRequest,
    SegmentReply,
    SegmentRequest,
    SetImageReply,
    SetImageRequest,
    ShutdownReply,
    ShutdownRequest,
    StatusReply,
    StatusRequest,
    TrainCancelRequest,
    TrainEvent,
    TrainJobReply,
    TrainStartRequest,
    TrainStatusRequest,
    TrainUploadReply,
    TrainUploadRequest,
    final_result,
    read_reply,
)
from .params import Georeference, Prompt, RasterOptions, SegmentOptions
from .vocabulary import (
    ENGINES,
    TASKS,
    TEXT_TASKS,
    default_engine,
    default_task,
    engine_family,
    fine_tuned_engine,
    is_engine,
)

__all__ = [
    "DEFAULT_MAX_MESSAGE_BYTES", "ENGINES", "OPS", "PROTOCOL_VERSION", "REQUEST_TYPES", "TASKS",
    "TEXT_TASKS", "WIRE_DTYPES", "CancelReply", "CancelRequest", "CurveClientKeys", "EngineInfo",
    "ErrorCode", "Georeference", "HelloReply", "HelloRequest", "Message", "Progress", "Prompt",
    "ProtocolError", "RasterOptions", "RemoteError", "Reply", "Request", "RequestTimeout",
    "RunningRequest", "SegmentOptions", "SegmentReply", "SegmentRequest", "SetImageReply",
    "SetImageRequest", "ShutdownReply", "ShutdownRequest", "StatusReply", "StatusRequest",
    "TrainCancelRequest", "TrainEvent", "TrainJobReply", "TrainStartRequest",
    "TrainStatusRequest", "TrainUploadReply", "TrainUploadRequest",
    "decode_message", "default_engine", "default_task", "encode_message", "engine_family",
    "error_header", "final_result", "fine_tuned_engine", "is_engine", "is_final", "ok_header",
    "progress_header", "read_reply", "request_header",
]
