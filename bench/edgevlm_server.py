"""Start the edgevlm server under test, through its console script.

CLI contract::

    edgevlm serve --host 127.0.0.1 --port P [--model PATH_OR_ID] --threads N
                  --ctx-size C --parallel N --traces PATH|none

``edgevlm serve`` with no ``--model`` serves the default model as id
``smollm2-135m-instruct-q4_1``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx

from bench.model_files import DEFAULT_MODEL_ID
from bench.process import RunningServer, free_port, run_server


ENV_EXECUTABLE = "EDGEVLM_EXECUTABLE"


def edgevlm_executable() -> str:
    """``$EDGEVLM_EXECUTABLE``, else the ``edgevlm`` script next to this interpreter, else on PATH."""
    override = os.environ.get(ENV_EXECUTABLE)
    if override:
        return override
    local = Path(sys.executable).with_name("edgevlm")
    if local.is_file():
        return str(local)
    return shutil.which("edgevlm") or str(local)


def edgevlm_command(
    port: int,
    model: str | None,
    threads: int,
    ctx_size: int,
    parallel: int,
    traces: str | Path | None,
    executable: str | None = None,
    extra_args: Sequence[str] = (),
) -> list[str]:
    cmd = [
        executable or edgevlm_executable(), "serve",
        "--host", "127.0.0.1",
        "--port", str(port),
    ]
    if model is not None:
        cmd += ["--model", str(model)]
    cmd += [
        "--threads", str(threads),
        "--ctx-size", str(ctx_size),
        "--parallel", str(parallel),
        "--traces", str(traces) if traces is not None else "none",
        *extra_args,
    ]
    return cmd


@contextlib.contextmanager
def edgevlm_server(
    model: str | None = None,
    threads: int = 1,
    ctx_size: int = 4096,
    parallel: int = 1,
    traces: str | Path | None = None,
    executable: str | None = None,
    extra_args: Sequence[str] = (),
    startup_timeout_s: float = 180.0,
) -> Iterator[RunningServer]:
    """Run ``edgevlm serve`` on 127.0.0.1:<free port> until the block exits.

    ``model`` is a GGUF path or registry id (None: the default model). ``traces``
    None passes ``--traces none``. Yields once ``GET /health`` is 200; the request
    model id is the default id, or the first id ``/v1/models`` lists. Stops the
    server with SIGTERM, then SIGKILL after a grace period.
    """
    port = free_port()
    cmd = edgevlm_command(port, model, threads, ctx_size, parallel, traces, executable, extra_args)
    model_id = DEFAULT_MODEL_ID if model is None else None
    with run_server("edgevlm", cmd, port, model=model_id, startup_timeout_s=startup_timeout_s) as server:
        yield server


def health_models(server: RunningServer) -> dict[str, dict[str, Any]]:
    """Each loaded model's row of a running edgevlm server's ``GET /health`` (slots,
    resolved stream interval, runner process...), by model id."""
    return httpx.get(server.base_url + "/health", timeout=30).json().get("models", {})
