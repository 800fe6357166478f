"""Start, health-check and stop a server process under benchmark.

Both servers the benchmarks drive (edgevlm and llama.cpp's ``llama-server``) are
plain child processes that listen on ``127.0.0.1:<free port>`` and answer
``GET /health`` with 200 once the model is loaded. This module holds what the two
launchers share; :mod:`bench.edgevlm_server` and :mod:`bench.llama_server` only
build the command line.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx

HOST = "127.0.0.1"


class ServerStartError(RuntimeError):
    """The server process exited, or never became healthy, during start-up."""


@dataclass
class RunningServer:
    """A server process started by a benchmark, alive inside its context manager."""

    name: str
    base_url: str  # e.g. "http://127.0.0.1:8123" (no trailing slash, no /v1)
    model: str  # the model id to put in request bodies
    process: subprocess.Popen[bytes]
    log_path: Path
    command: list[str] = field(default_factory=list)

    @property
    def api_url(self) -> str:
        """Base URL of the OpenAI-compatible API (``.../v1``)."""
        return f"{self.base_url}/v1"

    def log_tail(self, n_chars: int = 4000) -> str:
        """The last characters of the server's combined stdout/stderr."""
        try:
            return self.log_path.read_text(errors="replace")[-n_chars:]
        except OSError:
            return ""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def default_threads() -> int:
    """All cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        return os.cpu_count() or 1


def wait_healthy(
    base_url: str,
    process: subprocess.Popen[bytes] | None = None,
    timeout_s: float = 180.0,
    poll_s: float = 0.1,
) -> None:
    """Poll ``GET {base_url}/health`` until it returns 200.

    Raises :class:`ServerStartError` when ``process`` exits first or the timeout passes.
    """
    deadline = time.monotonic() + timeout_s
    last: str = "no answer"
    with httpx.Client(timeout=5.0) as client:
        while time.monotonic() < deadline:
            if process is not None and process.poll() is not None:
                raise ServerStartError(f"server exited with status {process.returncode} before it was healthy")
            try:
                resp = client.get(f"{base_url}/health")
                if resp.status_code == 200:
                    return
                last = f"HTTP {resp.status_code}"
            except httpx.HTTPError as exc:
                last = type(exc).__name__
            time.sleep(poll_s)
    raise ServerStartError(f"server at {base_url} not healthy after {timeout_s:.0f}s (last: {last})")


def stop_process(process: subprocess.Popen[bytes], grace_s: float = 10.0) -> None:
    """SIGTERM, wait up to ``grace_s``, then SIGKILL."""
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        process.wait(timeout=grace_s)


def first_model_id(base_url: str) -> str | None:
    """The first id listed by ``GET /v1/models``, or None."""
    try:
        resp = httpx.get(f"{base_url}/v1/models", timeout=10.0)
        resp.raise_for_status()
        data = resp.json().get("data") or []
        return str(data[0]["id"]) if data else None
    except (httpx.HTTPError, ValueError, KeyError, TypeError):
        return None


@contextlib.contextmanager
def run_server(
    name: str,
    command: Sequence[str],
    port: int,
    model: str | None = None,
    startup_timeout_s: float = 180.0,
    env: dict[str, str] | None = None,
    log_dir: Path | None = None,
) -> Iterator[RunningServer]:
    """Start ``command`` (which must listen on ``port``), wait for /health, stop it on exit.

    ``model`` is the id to send in requests; when None it is read from ``/v1/models``.
    The server's output goes to a log file whose tail is shown if start-up fails.
    """
    log_dir = Path(log_dir or tempfile.gettempdir())
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"edgevlm-bench-{name}-{port}.log"
    base_url = f"http://{HOST}:{port}"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            list(command),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})},
        )
    server = RunningServer(name, base_url, model or "", process, log_path, list(command))
    try:
        try:
            wait_healthy(base_url, process, timeout_s=startup_timeout_s)
        except ServerStartError as exc:
            raise ServerStartError(
                f"{name}: {exc}\ncommand: {' '.join(command)}\n--- log tail ({log_path}) ---\n{server.log_tail()}"
            ) from None
        if not server.model:
            server.model = first_model_id(base_url) or "default"
        yield server
    finally:
        stop_process(process)
