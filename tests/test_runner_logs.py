"""A runner's log records reach the server's own loggers (``models.runner.logs``).

Without forwarding they went to the runner's stderr, past the server's handlers and
levels: pytest's caplog, an operator's log file and ``--log-level`` never saw them.
"""

from __future__ import annotations

import logging

import httpx
import pytest

DEFAULT = "smollm2-135m-instruct-q4_1"


def from_runner(caplog: pytest.LogCaptureFixture, logger: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == logger and hasattr(r, "runner_pid")]


def test_the_fast_path_line_and_llama_cpp_warnings_logged_in_the_runner_reach_caplog(
        make_server, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="edgevlm.engine")
    # A context past the model's 8192 training tokens: llama.cpp warns at load, in the runner.
    srv = make_server(runners="on", parallel=1, ctx_size=8448)
    pid = httpx.get(srv.base_url + "/health", timeout=30).json()["models"][DEFAULT]["runner"]["pid"]

    verdicts = [r for r in from_runner(caplog, "edgevlm.engine") if "CPU fast paths" in r.getMessage()]
    assert verdicts, [r.getMessage() for r in caplog.records]
    record = verdicts[-1]
    assert record.levelno == logging.INFO and record.runner_pid == pid
    assert record.getMessage().startswith(f"runner {pid}: model {DEFAULT}: CPU fast paths")

    native = from_runner(caplog, "edgevlm.llama")
    assert native and all(r.levelno >= logging.WARNING for r in native)
    assert any(r.getMessage().startswith(f"runner {pid}: ") and "n_ctx_train (8192)" in r.getMessage()
               for r in native), [r.getMessage() for r in native]

