"""The backend service: a ZeroMQ ROUTER front end and one worker thread that owns the models.

Threads and sockets::

    clients (DEALER) ──tcp──▶ ROUTER  [front thread: parse, validate, answer hello/status/
                                          cancel/shutdown, queue work, enforce deadlines]
                                 ▲                   │ bounded queue.Queue of Jobs
                                 │ inproc PULL       ▼
                              PUSH ◀──────── worker thread [set_image, segment on the GPU]

    train_* requests are answered by the front thread too (training_jobs.TrainingJobs: file
    writes, look-ups); the training itself runs in a trainer process of its own.

The service is transport: each operation's request is validated, and its reply built, by the
types of ``unigeoseg_protocol.operations``.

Only the front thread touches the ROUTER socket (ZeroMQ sockets are not thread-safe); the worker
sends replies and progress events through its own PUSH socket. A request that is cancelled or
runs past its deadline is answered at once by the front thread; the worker's late result is
dropped, and the worker checks the request's CancelToken between stages.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any

import zmq

from unigeoseg_protocol.errors import ErrorCode, ProtocolError
from unigeoseg_protocol.messages import (
    PROTOCOL_VERSION,
    Message,
    decode_message,
    encode_message,
    error_header,
    ok_header,
    progress_header,
)
from unigeoseg_protocol.operations import (
    OPS,
    REQUEST_TYPES,
    CancelReply,
    CancelRequest,
    EngineInfo,
    HelloReply,
    HelloRequest,
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
    TrainJobReply,
    TrainStartRequest,
    TrainStatusRequest,
    TrainUploadReply,
    TrainUploadRequest,
)

from .. import __version__
from ..errors import InvalidInputError
from ..segmenter import CancelToken, Segmenter
from .config import ServiceConfig, is_local_address
from .training_jobs import TrainingJobs, default_training_jobs

logger = logging.getLogger(__name__)

_WORKER_ENDPOINT = "inproc://unigeoseg-worker-replies"
_POLL_MS = 100  # how often the front loop looks at deadlines and the stop flag

#: The requests the worker runs (the front thread answers the others itself).
WorkRequest = SetImageRequest | SegmentRequest
WorkReply = SetImageReply | SegmentReply


@dataclass
class Job:
    """A request waiting for, or running on, the worker."""

    client: bytes
    request_id: str
    op: str
    message: Message
    token: CancelToken
    received: float
    request: WorkRequest

    @property
    def key(self) -> tuple[bytes, str]:
        return (self.client, self.request_id)


class Service:
    """Serve requests until ``stop()``.

    Args:
        config: validated settings (address, caps, timeouts, CURVE).
        segmenter: the models and caches; used only from the worker thread.
        device_info: what ``hello`` reports about the compute device.
        training: the fine-tuning jobs (uploads, trainer processes, fine-tuned models); None
            for those of the weights cache, started with the service.
    """

    def __init__(self, config: ServiceConfig, segmenter: Segmenter,
                 device_info: dict[str, Any] | None = None,
                 context: zmq.Context | None = None, training: TrainingJobs | None = None):
        config.validate()
        self.config = config
        self.segmenter = segmenter
        self.device_info = device_info or {"device": "cpu", "gpu": None}
        self._context = context or zmq.Context()
        self._own_context = context is None
        self._queue: queue.Queue[Job] = queue.Queue(maxsize=config.queue_size)
        self._pending: dict[tuple[bytes, str], Job] = {}
        self._running: Job | None = None
        self._stop = threading.Event()
        self._started = time.monotonic()
        self._served = 0
        self._authenticator = None
        self._router: zmq.Socket | None = None
        self._replies: zmq.Socket | None = None
        self._worker: threading.Thread | None = None
        self.training = training
        self.bound_address: str | None = None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> str:
        """Bind the sockets and start the worker; returns the bound address."""
        router = self._context.socket(zmq.ROUTER)
        router.setsockopt(zmq.LINGER, 0)
        router.setsockopt(zmq.ROUTER_MANDATORY, 0)  # replies to vanished clients are dropped
        # Transport-level guard against memory exhaustion: frames far beyond the cap are dropped
        # (and the peer disconnected) before they are buffered; anything up to 4x the cap is
        # received and answered with a typed payload_too_large error instead.
        router.setsockopt(zmq.MAXMSGSIZE, 4 * self.config.max_message_bytes)
        if self.config.curve_enabled:
            self._enable_curve(router)
        router.bind(self.config.address)
        self.bound_address = router.getsockopt_string(zmq.LAST_ENDPOINT)
        replies = self._context.socket(zmq.PULL)
        replies.bind(_WORKER_ENDPOINT + f"-{id(self)}")
        self._router, self._replies = router, replies
        self._worker = threading.Thread(target=self._work, name="unigeoseg-worker", daemon=True)
        self._worker.start()
        if self.training is None:
            # chips_dir (a folder on this machine) only for clients that are on it too
            self.training = default_training_jobs(
                self.segmenter.engines, self.device_info["device"],
                local_chips=is_local_address(self.config.address)
                and not self.config.curve_enabled)
        self.training.start()
        logger.info("listening", extra={"address": self.bound_address})
        return self.bound_address

    def stop(self) -> None:
        """Ask the front loop to finish (safe from signal handlers and other threads)."""
        self._stop.set()

    def serve_forever(self) -> None:
        if self._router is None:
            self.start()
        poller = zmq.Poller()
        poller.register(self._router, zmq.POLLIN)
        poller.register(self._replies, zmq.POLLIN)
        try:
            while not self._stop.is_set():
                events = dict(poller.poll(_POLL_MS))
                if self._replies in events:
                    self._forward_worker_messages()
                if self._router in events:
                    self._receive_requests()
                self._expire_deadlines()
        finally:
            self._shutdown()

    def _shutdown(self) -> None:
        logger.info("shutting down")
        while True:  # answer whatever is still waiting
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            job.token.cancel()
            self._reply_error(job.client, job.request_id, ErrorCode.SHUTTING_DOWN,
                              "the backend is shutting down")
        self._queue.put(None)  # type: ignore[arg-type]  # wakes the worker so it exits
        if self._running is not None:
            self._running.token.cancel()
        if self._worker is not None:
            self._worker.join(timeout=10)
        if self.training is not None:
            self.training.close()  # trainer processes end, their folders are removed
        self._forward_worker_messages()
        for sock in (self._router, self._replies):
            if sock is not None:
                sock.close(linger=0)
        if self._authenticator is not None:
            self._authenticator.stop()
        if self._own_context:
            self._context.term()

    def _enable_curve(self, router: zmq.Socket) -> None:
        import zmq.auth
        from zmq.auth.thread import ThreadAuthenticator

        public, secret = zmq.auth.load_certificate(str(self.config.curve_server_secret_file))
        if secret is None:
            raise InvalidInputError(f"{self.config.curve_server_secret_file} holds no secret key")
        self._authenticator = ThreadAuthenticator(self._context)
        self._authenticator.start()
        self._authenticator.configure_curve(
            domain="*", location=str(self.config.curve_authorized_clients_dir))
        router.curve_secretkey = secret
        router.curve_publickey = public
        router.curve_server = True

    # ------------------------------------------------------------------ front thread

    def _receive_requests(self) -> None:
        while True:
            try:
                frames = self._router.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            client, frames = frames[0].bytes, frames[1:]
            try:
                message = decode_message(frames, self.config.max_message_bytes)
            except ProtocolError as exc:
                logger.warning("rejected message: %s", exc.message,
                               extra={"request_id": exc.request_id, "code": str(exc.code)})
                self._reply_error(client, exc.request_id, exc.code, exc.message, exc.details)
                continue
            self._handle(client, message)

    def _handle(self, client: bytes, message: Message) -> None:
        request_id, op = message.id, message.op
        if op not in OPS:
            self._reply_error(client, request_id, ErrorCode.UNKNOWN_OP,
                              f"unknown op {op!r}; this backend knows {list(OPS)}")
            return
        # Heartbeats (hello, status) every few seconds would drown the log at INFO.
        level = logging.DEBUG if op in ("hello", "status") else logging.INFO
        logger.log(level, "request", extra={"request_id": request_id, "op": op})
        try:
            request = REQUEST_TYPES[op].from_message(message)
            if isinstance(request, HelloRequest):
                self._reply_ok(client, request_id, self._hello())
            elif isinstance(request, StatusRequest):
                self._reply_ok(client, request_id, self._status())
            elif isinstance(request, CancelRequest):
                self._reply_ok(client, request_id, self._cancel(client, request))
            elif isinstance(request, ShutdownRequest):
                self._reply_ok(client, request_id, ShutdownReply())
                self.stop()
            elif isinstance(request, (SetImageRequest, SegmentRequest)):
                self._enqueue(client, message, request)
            elif isinstance(request, (TrainUploadRequest, TrainStartRequest,
                                      TrainStatusRequest, TrainCancelRequest)):
                # Answered here: a file write or a look-up; the training itself runs in
                # a process of its own, never on the worker.
                self._reply_ok(client, request_id, self._training(request))
            else:  # an op of the protocol package that this backend does not serve yet
                raise ProtocolError(ErrorCode.UNKNOWN_OP, f"this backend does not serve {op!r}")
        except ProtocolError as exc:
            self._reply_error(client, request_id, exc.code, exc.message, exc.details)

    def _enqueue(self, client: bytes, message: Message, request: WorkRequest) -> None:
        if (client, message.id) in self._pending:
            raise InvalidInputError(f"request id {message.id} is already in progress")
        timeout_s = self.config.request_timeout_s
        if "timeout_ms" in message.header:
            timeout_ms = message.header["timeout_ms"]
            if not isinstance(timeout_ms, int) or isinstance(timeout_ms, bool) or timeout_ms <= 0:
                raise InvalidInputError("timeout_ms must be a positive integer")
            timeout_s = min(timeout_ms / 1000, self.config.max_request_timeout_s)
        now = time.monotonic()
        job = Job(client=client, request_id=message.id, op=request.OP, message=message,
                  token=CancelToken(deadline=now + timeout_s), received=now, request=request)
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise ProtocolError(ErrorCode.QUEUE_FULL,
                                f"{self.config.queue_size} requests are already waiting; "
                                f"retry when one finishes") from None
        self._pending[job.key] = job

    def _cancel(self, client: bytes, request: CancelRequest) -> CancelReply:
        target = request.target
        job = self._pending.pop((client, target), None)
        if job is None:
            return CancelReply(target, cancelled=False, reason="not pending")
        job.token.cancel()
        self._reply_error(client, target, ErrorCode.CANCELLED, "cancelled by the client")
        return CancelReply(target, cancelled=True,
                           was="running" if self._running is job else "queued")

    def _expire_deadlines(self) -> None:
        now = time.monotonic()
        for key, job in list(self._pending.items()):
            if job.token.deadline is not None and now > job.token.deadline:
                del self._pending[key]
                job.token.cancel()
                logger.warning("request timed out", extra={"request_id": job.request_id,
                                                           "op": job.op})
                self._reply_error(job.client, job.request_id, ErrorCode.TIMEOUT,
                                  f"{job.op} ran past its timeout of "
                                  f"{job.token.deadline - job.received:.1f} s")

    def _forward_worker_messages(self) -> None:
        while True:
            try:
                frames = self._replies.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            client, request_id, kind = frames[0].bytes, frames[1].bytes.decode(), frames[2].bytes
            key = (client, request_id)
            if key not in self._pending:
                continue  # already answered (cancelled or timed out): drop the late result
            if kind == b"final":
                del self._pending[key]
                self._served += 1
            self._router.send_multipart([client, *frames[3:]], copy=False)

    def _training(self, request: TrainUploadRequest | TrainStartRequest | TrainStatusRequest
                  | TrainCancelRequest) -> TrainUploadReply | TrainJobReply:
        training = self.training
        if training is None:
            raise ProtocolError(ErrorCode.UNKNOWN_OP, "this service was not started")
        try:
            if isinstance(request, TrainUploadRequest):
                return training.upload(request)
            if isinstance(request, TrainStartRequest):
                return training.start_job(request)
            if isinstance(request, TrainStatusRequest):
                return training.status(request)
            return training.cancel(request)
        except OSError as exc:  # a full or unwritable disk: the front thread keeps serving
            logger.exception("training request failed", extra={"op": request.OP})
            raise ProtocolError(ErrorCode.INTERNAL,
                                f"the backend could not write the training files: {exc}"
                                ) from None

    def _reply_ok(self, client: bytes, request_id: str,
                  reply: HelloReply | StatusReply | CancelReply | ShutdownReply
                  | TrainUploadReply | TrainJobReply) -> None:
        result, arrays = reply.to_wire()
        self._router.send_multipart([client, *encode_message(ok_header(request_id, result),
                                                             arrays)], copy=False)

    def _reply_error(self, client: bytes, request_id: str | None, code: ErrorCode | str,
                     message: str, details: dict[str, Any] | None = None) -> None:
        self._router.send_multipart(
            [client, *encode_message(error_header(request_id, str(code), message, details))])

    def _hello(self) -> HelloReply:
        registry = self.segmenter.engines
        loaded = registry.loaded()
        engines = {name: EngineInfo(available=True, loaded=name in loaded,
                                    model=loaded.get(name), tasks=tuple(registry.tasks(name)),
                                    about=registry.about(name))
                   for name in registry.available()}
        for name, reason in registry.reasons_unavailable().items():
            engines.setdefault(name, EngineInfo(available=False, reason=reason))
        return HelloReply(protocol_version=PROTOCOL_VERSION, backend_version=__version__,
                          engines=engines, device=self.device_info["device"],
                          gpu=self.device_info.get("gpu"),
                          torch_version=self.device_info.get("torch_version"),
                          max_message_bytes=self.config.max_message_bytes,
                          authenticated=self.config.curve_enabled)

    def _status(self) -> StatusReply:
        running = self._running
        return StatusReply(
            queued=self._queue.qsize(),
            running=None if running is None else RunningRequest(running.request_id, running.op),
            served=self._served, encodes=self.segmenter.encode_count,
            images_cached=len(self.segmenter.images),
            embeddings_cached=len(self.segmenter.embeddings),
            embedding_cache_bytes=self.segmenter.embeddings.nbytes,
            uptime_s=round(time.monotonic() - self._started, 1))

    # ------------------------------------------------------------------ worker thread

    def _work(self) -> None:
        push = self._context.socket(zmq.PUSH)
        push.setsockopt(zmq.LINGER, 1000)
        push.connect(_WORKER_ENDPOINT + f"-{id(self)}")
        try:
            while True:
                job = self._queue.get()
                if job is None:
                    return
                if job.token.cancelled:
                    continue
                self._running = job
                try:
                    self._run_job(job, push)
                finally:
                    self._running = None
        finally:
            push.close()

    def _run_job(self, job: Job, push: zmq.Socket) -> None:
        start = time.perf_counter()

        def send(kind: bytes, header: dict[str, Any], arrays=None) -> None:
            push.send_multipart([job.client, job.request_id.encode(), kind,
                                 *encode_message(header, arrays)], copy=False)

        def progress(done: int, total: int, text: str) -> None:
            send(b"progress", progress_header(job.request_id, done, total, text))

        extra = {"request_id": job.request_id, "op": job.op}
        try:
            job.token.check()
            reply = self._execute(job, progress)
        except ProtocolError as exc:
            logger.info("request failed: %s", exc.message, extra={**extra, "code": str(exc.code)})
            send(b"final", error_header(job.request_id, str(exc.code), exc.message, exc.details))
            return
        except Exception as exc:  # a bug or a device failure: report it, keep serving
            logger.exception("request crashed", extra=extra)
            send(b"final", error_header(job.request_id, str(ErrorCode.INTERNAL),
                                        f"internal error ({type(exc).__name__}: {exc}); "
                                        f"the backend log has details"))
            return
        elapsed_ms = (time.perf_counter() - start) * 1000
        result, arrays = dataclasses.replace(reply, server_ms=round(elapsed_ms, 3)).to_wire()
        logger.info("request done", extra={**extra, "elapsed_ms": round(elapsed_ms, 1)})
        send(b"final", ok_header(job.request_id, result), arrays)

    def _execute(self, job: Job, progress) -> WorkReply:
        request = job.request
        if isinstance(request, SetImageRequest):
            return self.segmenter.set_image(request.pixels, request.georeference, request.raster,
                                            request.engine, job.token, progress)
        if request.image_id is not None:
            record = self.segmenter.get_image(request.image_id)
        else:
            record = self.segmenter.add_image(request.pixels, request.georeference,
                                              request.raster)
        return self.segmenter.segment(record, request.prompt, request.options, job.token)
