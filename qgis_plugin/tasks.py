"""Long backend requests in QGIS's task bar, where the analyst sees progress and can cancel.

The request itself is asynchronous on the BackendConnection (GUI thread, socket notifier);
the task's worker thread only waits for its answer, so that QGIS's task manager can show it
and offer its cancel button.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from qgis.core import QgsApplication, QgsTask

from .unigeoseg_protocol.operations import Request

#: Tasks alive in the task manager (QGIS does not keep a Python reference to them).
_LIVE: set[BackendRequestTask] = set()


class BackendRequestTask(QgsTask):
    """One backend request shown as a cancellable QGIS task.

    Callbacks run on the GUI thread, exactly one of ``on_reply`` (with the typed reply) /
    ``on_error``; cancelling from the task bar cancels the request on the backend and reports
    ``cancelled``.
    """

    def __init__(self, description: str, connection, request: Request, timeout_s: float,
                 on_reply: Callable[[Any], None], on_error: Callable[[str, str], None]):
        super().__init__(description, QgsTask.Flag.CanCancel)
        self._connection = connection
        self._on_reply, self._on_error = on_reply, on_error
        self._answered = threading.Event()
        self.request_id = connection.call(request, timeout_s, on_reply=self._reply,
                                          on_error=self._error, on_progress=self._progress)

    def _reply(self, reply) -> None:
        self._answered.set()
        self._on_reply(reply)

    def _error(self, code: str, text: str) -> None:
        self._answered.set()
        self._on_error(code, text)

    def _progress(self, done: int, total: int, text: str) -> None:
        if total > 0:
            self.setProgress(100.0 * done / total)

    def run(self) -> bool:
        """Worker thread: wait for the answer, or for the analyst to cancel."""
        while not self._answered.wait(0.05):
            if self.isCanceled():
                return False
        return True

    def finished(self, result: bool) -> None:
        """GUI thread."""
        _LIVE.discard(self)
        if not result and not self._answered.is_set():
            self._connection.cancel(self.request_id)  # reports "cancelled" through on_error


def cancel_all() -> None:
    """Cancel every request task still in the task bar (plugin unload)."""
    for task in list(_LIVE):
        task.cancel()


def submit(task: BackendRequestTask) -> BackendRequestTask:
    _LIVE.add(task)
    QgsApplication.taskManager().addTask(task)
    return task
