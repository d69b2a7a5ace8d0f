"""Start and stop a local backend (``unigeoseg serve``) as a child process of QGIS.

The backend lives in its own Python (a venv with torch); QGIS only starts it with ``QProcess``,
waits for the ``unigeoseg serving on ADDRESS`` line on its stdout, and copies its JSON-lines
stderr log into the plugin's tab of the Log Messages panel. Nothing here blocks the GUI except
:meth:`BackendLauncher.stop`, which waits (bounded) for the process to exit.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Sequence
from functools import partial

from qgis.core import Qgis
from qgis.PyQt.QtCore import QDir, QObject, QProcess, QProcessEnvironment, QTimer, pyqtSignal

from .core.log import log, warn

READY_PREFIX = "unigeoseg serving on "
BACKEND_MODULE = "unigeoseg_backend.cli.main"

#: Variables QGIS sets for its own Python and libraries (notably on Windows and macOS) that would
#: make another Python, or the GDAL/PROJ wheels of the backend venv, load the wrong files.
FOREIGN_ENVIRONMENT = ("PYTHONHOME", "PYTHONPATH", "PYTHONSTARTUP", "PYTHONEXECUTABLE",
                       "__PYVENV_LAUNCHER__", "PROJ_LIB", "PROJ_DATA", "GDAL_DATA",
                       "GDAL_DRIVER_PATH")

_STDERR_TAIL_LINES = 20
_CONTEXT_KEYS = ("request_id", "op", "code", "engine", "elapsed_ms")
_LEVELS = {"DEBUG": Qgis.MessageLevel.Info, "INFO": Qgis.MessageLevel.Info,
           "WARNING": Qgis.MessageLevel.Warning, "ERROR": Qgis.MessageLevel.Critical,
           "CRITICAL": Qgis.MessageLevel.Critical}


class BackendLauncher(QObject):
    """One local backend process at a time.

    Signals:
        started(str): the address the backend is bound to (from its ready line; a ``*`` port
            in the requested address is resolved here).
        failed(str): it could not start, exited before it was ready, or did not get ready in
            time; the reason includes the last lines of its stderr. Not emitted after stop().
        finished(int): the process ended (after ``failed`` when it never got ready): its exit
            code, 0 after a clean stop(); -1 when it was killed by a signal.
    """

    started = pyqtSignal(str)
    failed = pyqtSignal(str)
    finished = pyqtSignal(int)

    def __init__(self, parent: QObject | None = None):
        super().__init__(parent)
        self._process: QProcess | None = None
        self._python = ""
        self._address: str | None = None
        self._ready = False
        self._stopping = False
        self._failed = False
        self._stdout = b""
        self._stderr = b""
        self._stderr_tail: deque[str] = deque(maxlen=_STDERR_TAIL_LINES)
        self._ready_timer = QTimer(self)
        self._ready_timer.setSingleShot(True)
        self._ready_timer.timeout.connect(self._on_ready_timeout)

    # ------------------------------------------------------------------ public API

    @property
    def is_running(self) -> bool:
        return (self._process is not None
                and self._process.state() != QProcess.ProcessState.NotRunning)

    @property
    def is_ready(self) -> bool:
        """True after ``started`` and until the process ends."""
        return self._ready and self.is_running

    @property
    def address(self) -> str | None:
        """The bound address announced by the running backend, or None before that."""
        return self._address if self.is_ready else None

    def start(self, python: str, address: str, extra_args: Sequence[str] = (),
              ready_timeout_s: float = 300.0) -> None:
        """Run ``python -m unigeoseg_backend.cli.main serve --address ADDRESS *extra_args``.

        Returns at once; ``started`` or ``failed`` follows. Raises RuntimeError when a backend
        started by this launcher is still running.
        """
        if self.is_running:
            raise RuntimeError("a backend started by this launcher is still running; stop() it")
        self._python = python
        self._address = None
        self._ready = self._stopping = self._failed = False
        self._stdout = self._stderr = b""
        self._stderr_tail.clear()

        process = QProcess(self)
        process.setProgram(python)
        arguments = ["-m", BACKEND_MODULE, "serve", "--address", address, *extra_args]
        process.setArguments(arguments)
        environment = QProcessEnvironment.systemEnvironment()
        for name in FOREIGN_ENVIRONMENT:
            environment.remove(name)
        environment.insert("PYTHONUNBUFFERED", "1")
        environment.insert("PYTHONIOENCODING", "utf-8")
        environment.insert("PYTHONSAFEPATH", "1")  # 3.11+: the working folder is not on sys.path
        process.setProcessEnvironment(environment)
        process.setWorkingDirectory(QDir.homePath())
        # Bind the process to each slot: a late signal from an earlier run is ignored.
        process.readyReadStandardOutput.connect(partial(self._read_stdout, process))
        process.readyReadStandardError.connect(partial(self._read_stderr, process))
        process.errorOccurred.connect(partial(self._on_error, process))
        process.finished.connect(partial(self._on_finished, process))
        self._process = process
        log(f"starting the backend: {python} {' '.join(arguments)}")
        process.start()
        self._ready_timer.start(max(1, int(ready_timeout_s * 1000)))

    def stop(self, timeout_ms: int = 5000) -> None:
        """Terminate the backend (SIGTERM: it exits cleanly), kill it if it is still running
        after ``timeout_ms``. Waits for the exit (so this blocks up to ``timeout_ms`` + 3 s);
        ``finished`` is emitted before it returns. Safe to call at any time, and twice."""
        self._ready_timer.stop()
        process = self._process
        if process is None or process.state() == QProcess.ProcessState.NotRunning:
            return
        self._stopping = True
        process.terminate()  # on Windows a console process ignores this: killed below
        if not process.waitForFinished(max(0, int(timeout_ms))):
            warn(f"the backend did not stop within {timeout_ms} ms; killing it")
            process.kill()
            process.waitForFinished(3000)

    # ------------------------------------------------------------------ process signals

    def _read_stdout(self, process: QProcess) -> None:
        if process is not self._process:
            return
        self._stdout += bytes(process.readAllStandardOutput())
        *lines, self._stdout = self._stdout.split(b"\n")
        for line in lines:
            self._stdout_line(line.decode("utf-8", errors="replace").rstrip())

    def _read_stderr(self, process: QProcess) -> None:
        if process is not self._process:
            return
        self._stderr += bytes(process.readAllStandardError())
        *lines, self._stderr = self._stderr.split(b"\n")
        for line in lines:
            self._stderr_line(line.decode("utf-8", errors="replace").rstrip())

    def _stdout_line(self, line: str) -> None:
        if not line:
            return
        if line.startswith(READY_PREFIX) and not self._ready:
            self._ready = True
            self._ready_timer.stop()
            self._address = line[len(READY_PREFIX):].strip()
            log(f"the backend is ready at {self._address}")
            self.started.emit(self._address)
        else:
            log(f"backend: {line}")

    def _stderr_line(self, line: str) -> None:
        if not line.strip():
            return
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if not isinstance(record, dict) or "msg" not in record:
            self._stderr_tail.append(line)
            log(f"backend: {line}")
            return
        if record.get("msg") == "request" and record.get("op") == "hello":
            return  # the connection's heartbeat, every few seconds: not worth a log line
        level_name = str(record.get("level", "INFO")).upper()
        context = ", ".join(f"{key} {record[key]}" for key in _CONTEXT_KEYS if key in record)
        text = f"backend: {record['msg']}" + (f" [{context}]" if context else "")
        if record.get("traceback"):
            text += f"\n{record['traceback']}"
        self._stderr_tail.append(f"{level_name}: {record['msg']}"
                                 + (f" [{context}]" if context else ""))
        log(text, _LEVELS.get(level_name, Qgis.MessageLevel.Info))

    def _on_error(self, process: QProcess, error: QProcess.ProcessError) -> None:
        if process is not self._process:
            return
        if error == QProcess.ProcessError.FailedToStart:
            # No finished() follows a process that never started.
            self._ready_timer.stop()
            self._process = None
            process.deleteLater()
            self._fail(f"could not start the backend with {self._python!r}: "
                       f"{process.errorString()} (is this the path of a Python executable?)")
        elif not self._stopping:
            warn(f"backend process error: {process.errorString()}")

    def _on_finished(self, process: QProcess, exit_code: int,
                     exit_status: QProcess.ExitStatus) -> None:
        if process is not self._process:
            return
        self._ready_timer.stop()
        self._stdout += bytes(process.readAllStandardOutput())
        self._stderr += bytes(process.readAllStandardError())
        for line in self._stdout.split(b"\n"):
            self._stdout_line(line.decode("utf-8", errors="replace").rstrip())
        for line in self._stderr.split(b"\n"):
            self._stderr_line(line.decode("utf-8", errors="replace").rstrip())
        self._stdout = self._stderr = b""
        crashed = exit_status != QProcess.ExitStatus.NormalExit
        code = -1 if crashed else int(exit_code)
        was_ready = self._ready
        self._ready = False
        self._process = None
        process.deleteLater()
        if not was_ready and not self._stopping:
            how = "was killed" if crashed else f"exited with code {code}"
            self._fail(f"the backend {how} before it was ready")
        elif not self._stopping:
            warn(f"the backend {'crashed' if crashed else f'exited with code {code}'}")
        log(f"the backend process ended (exit code {code})")
        self.finished.emit(code)

    def _on_ready_timeout(self) -> None:
        if self._ready or not self.is_running:
            return
        seconds = self._ready_timer.interval() / 1000
        self._fail(f"the backend did not report ready within {seconds:g} s")
        self.stop()

    def _fail(self, reason: str) -> None:
        if self._failed:
            return
        self._failed = True
        tail = list(self._stderr_tail)[-10:]
        if tail:
            reason += ". Last backend messages:\n" + "\n".join(tail)
        warn(reason)
        self.failed.emit(reason)
