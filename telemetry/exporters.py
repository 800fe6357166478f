"""Span exporters: an append-only JSONL file of OTLP JSON export requests and a guard
that keeps exporter failures off the request path."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from .otlp_json import export_request

log = logging.getLogger("edgevlm.telemetry.export")


# --- JSONL file -----------------------------------------------------------------------

# Spans per line: a line is one OTLP export request; this keeps lines far below the
# Collector file receiver's default 1 MiB line limit unless prompts are captured.
LINE_SPANS = 64

# Spans can hold prompts and answers (--capture-content): only the server's user reads them.
FILE_MODE = 0o600
DIR_MODE = 0o700


def make_private_dirs(path: str) -> None:
    """Create ``path`` and any missing parents as 0700 (``os.makedirs`` applies the mode
    only to the last one); directories that already exist are left as they are."""
    if not path or os.path.isdir(path):
        return
    make_private_dirs(os.path.dirname(os.path.abspath(path)))
    try:
        os.mkdir(path, DIR_MODE)
    except FileExistsError:
        return
    os.chmod(path, DIR_MODE)  # the umask may have removed bits, never added: make it exact


class JsonlSpanExporter(SpanExporter):
    """Appends each batch as OTLP JSON ``ExportTraceServiceRequest`` lines (up to
    :data:`LINE_SPANS` spans each); one write + fsync per batch; size-rotated.

    A crash loses at most the batch being written. If the previous process died in the
    middle of a line, a newline is written first so the torn line stays a single bad
    line instead of corrupting the next good one. Files are 0600 and the directories
    created for them 0700 (see :data:`FILE_MODE`).
    """

    def __init__(self, path: str, max_bytes: int = 50_000_000, keep: int = 5, fsync: bool = True) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.keep = keep
        self.fsync = fsync
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._size = 0

    def _open(self) -> int:
        if self._fd is None:
            make_private_dirs(os.path.dirname(self.path))
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, FILE_MODE)
            os.fchmod(fd, FILE_MODE)  # a file left by an older version may be world-readable
            size = os.fstat(fd).st_size
            if size > 0 and not self._ends_with_newline():
                size += os.write(fd, b"\n")
            self._fd, self._size = fd, size
        return self._fd

    def _ends_with_newline(self) -> bool:
        with open(self.path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            return f.read(1) == b"\n"

    def _rotate(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self.keep <= 0:
            os.unlink(self.path)
            return
        for i in range(self.keep - 1, 0, -1):
            src = f"{self.path}.{i}"
            if os.path.exists(src):
                os.replace(src, f"{self.path}.{i + 1}")
        os.replace(self.path, f"{self.path}.1")

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        if not spans:
            return SpanExportResult.SUCCESS
        blob = "".join(
            json.dumps(export_request(spans[i:i + LINE_SPANS]), separators=(",", ":")) + "\n"
            for i in range(0, len(spans), LINE_SPANS)
        ).encode()
        with self._lock:
            self._open()
            if self._size > 0 and self._size + len(blob) > self.max_bytes:
                self._rotate()
            fd = self._open()
            view = memoryview(blob)
            while view:
                n = os.write(fd, view)
                view = view[n:]
            if self.fsync:
                os.fsync(fd)
            self._size += len(blob)
        return SpanExportResult.SUCCESS

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True  # every export is already on disk

    def shutdown(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None


# --- failure guard --------------------------------------------------------------------

class GuardedSpanExporter(SpanExporter):
    """Wraps an exporter so a failure (collector down, disk full) is logged and counted.

    Failures are logged at most once per ``log_every_s`` per exporter, so a dead
    collector does not flood the log; ``on_failure(name)`` feeds the metrics counter.
    """

    def __init__(
        self,
        inner: SpanExporter,
        name: str,
        on_failure: Callable[[str], None] | None = None,
        log_every_s: float = 60.0,
    ) -> None:
        self.inner = inner
        self.name = name
        self.on_failure = on_failure
        self.log_every_s = log_every_s
        self.failures = 0
        self._last_log = -float("inf")
        self._suppressed = 0

    def _failed(self, why: str) -> None:
        self.failures += 1
        if self.on_failure is not None:
            try:
                self.on_failure(self.name)
            except Exception:
                pass
        now = time.monotonic()
        if now - self._last_log >= self.log_every_s:
            extra = f" ({self._suppressed} more since last message)" if self._suppressed else ""
            log.warning("span export to %s failed: %s%s", self.name, why, extra)
            self._last_log, self._suppressed = now, 0
        else:
            self._suppressed += 1

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        try:
            result = self.inner.export(spans)
        except Exception as exc:
            self._failed(f"{type(exc).__name__}: {exc}")
            return SpanExportResult.FAILURE
        if result is not SpanExportResult.SUCCESS:
            self._failed(f"exporter returned {result.name}")
        return result

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        try:
            return self.inner.force_flush(timeout_millis)
        except Exception as exc:
            self._failed(f"flush: {exc}")
            return False

    def shutdown(self) -> None:
        try:
            self.inner.shutdown()
        except Exception as exc:
            log.warning("span exporter %s shutdown failed: %s", self.name, exc)
