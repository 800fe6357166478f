"""Model registry: config file, models directory, LRU eviction, load-on-first-use, CLI."""

from __future__ import annotations

import asyncio
import shutil
import threading
import time
from pathlib import Path

import httpx
import pytest

from models.registry import (DEFAULT_MODEL_ID, ConfigError, UnknownModel, build_registry,
                             load_config, load_model, model_id_for, scan_dir)
from server.cli import _serve_parser, _settings_from, main
from tests.conftest import LiveServer, _free_port


def test_config_file_declares_models_with_relative_paths(tmp_path: Path, tiny_llm: Path) -> None:
    shutil.copy(tiny_llm, tmp_path / "tiny.gguf")
    (tmp_path / "mmproj.gguf").write_bytes(b"placeholder")
    (tmp_path / "models.toml").write_text(
        '[[models]]\nid = "tiny"\npath = "tiny.gguf"\nctx_size = 512\nthreads = 1\nparallel = 2\n'
        '[[models]]\nid = "tiny-vlm"\npath = "tiny.gguf"\nmmproj = "mmproj.gguf"\nimage_max_tokens = 256\n')
    specs = {s.id: s for s in load_config(tmp_path / "models.toml")}
    assert specs["tiny"].path == str(tmp_path / "tiny.gguf")
    assert (specs["tiny"].ctx_size, specs["tiny"].threads, specs["tiny"].parallel) == (512, 1, 2)
    assert specs["tiny-vlm"].mmproj == str(tmp_path / "mmproj.gguf")
    assert specs["tiny-vlm"].image_max_tokens == 256
    reg = build_registry(config=str(tmp_path / "models.toml"))
    assert reg.default_id == "tiny"  # the config's first model is the default
    assert DEFAULT_MODEL_ID not in {s.id for s in reg.list()}  # named models: no embedded one


@pytest.mark.parametrize("body, message", [
    ('[[models]]\nid = "x"\npath = "missing.gguf"\n', "not found"),
    ('[[models]]\nid = "x"\npath = "tiny.gguf"\nctx = 5\n', "unknown keys"),
    ('[[models]]\npath = "tiny.gguf"\n', "needs an id"),
    ('[[models]\n', "cannot read"),
])
def test_bad_config_is_refused_at_start(tmp_path: Path, tiny_llm: Path, body: str, message: str) -> None:
    shutil.copy(tiny_llm, tmp_path / "tiny.gguf")
    (tmp_path / "m.toml").write_text(body)
    with pytest.raises(ConfigError, match=message):
        load_config(tmp_path / "m.toml")


def test_models_directory_pairs_projectors(tmp_path: Path, tiny_llm: Path) -> None:
    shutil.copy(tiny_llm, tmp_path / "Alpha-Q4.gguf")
    shutil.copy(tiny_llm, tmp_path / "beta.gguf")
    (tmp_path / "mmproj-beta.gguf").write_bytes(b"x")
    specs = {s.id: s for s in scan_dir(tmp_path)}
    assert set(specs) == {"alpha-q4", "beta"}
    assert specs["beta"].mmproj == str(tmp_path / "mmproj-beta.gguf")
    assert specs["alpha-q4"].mmproj is None


def test_unknown_model_and_bad_model_flag() -> None:
    reg = build_registry()
    with pytest.raises(UnknownModel):
        reg.resolve("nope")
    with pytest.raises(ConfigError):
        build_registry(model="/no/such/file.gguf")


def test_models_load_on_first_use_and_lru_evicts(tmp_path: Path, tiny_llm: Path) -> None:
    for name in ("a", "b", "c"):
        shutil.copy(tiny_llm, tmp_path / f"{name}.gguf")
    reg = build_registry(models_dir=str(tmp_path), max_loaded=1, defaults={"ctx_size": 256})

    async def scenario() -> None:
        assert not reg.is_loaded("a")
        first, again = await asyncio.gather(reg.acquire("a"), reg.acquire("a"))
        assert first is again  # concurrent first uses share one load
        assert reg.is_loaded("a")
        # While a request still holds "a" (e.g. encoding its images), loading "b" must
        # not unload it: the cap is exceeded for a while instead.
        b = await reg.acquire("b")
        assert reg.is_loaded("a") and reg.is_loaded("b")
        assert first.engine.tokenize("still usable")
        for lm in (first, again, b):
            reg.release(lm)
        async with reg.use("a"):
            pass  # loading nothing new: no eviction yet
        async with reg.use("c"):
            assert reg.is_loaded("c")
        # LRU with a cap of one: loading "c" dropped both idle models
        assert not reg.is_loaded("a") and not reg.is_loaded("b")

    try:
        asyncio.run(scenario())
    finally:
        reg.close()


def test_health_is_503_while_the_default_model_loads(tmp_path: Path) -> None:
    from server.app import create_app
    from server.settings import Settings

    gate = threading.Event()
    reg = build_registry()

    def slow_load(spec):  # type: ignore[no-untyped-def]
        gate.wait(30)
        return load_model(spec)

    reg.loader = slow_load
    app = create_app(Settings(traces="none", energy=False), registry=reg)
    srv = LiveServer(app, _free_port())
    srv.thread.start()
    try:
        deadline = time.monotonic() + 30
        status = None
        while time.monotonic() < deadline:
            try:
                r = httpx.get(srv.base_url + "/health", timeout=2)
                status = r.status_code
                break
            except httpx.HTTPError:
                time.sleep(0.05)
        assert status == 503 and r.json()["status"] == "loading"
        assert r.headers["Retry-After"]
        gate.set()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and httpx.get(srv.base_url + "/health").status_code != 200:
            time.sleep(0.05)
        assert httpx.get(srv.base_url + "/health").json()["status"] == "ok"
    finally:
        gate.set()
        srv.stop()


def test_cli_flags_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    import argparse

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    _serve_parser(sub)
    monkeypatch.setenv("EDGEVLM_MAX_QUEUE", "3")
    monkeypatch.setenv("EDGEVLM_API_KEY", "k1,k2")
    s = _settings_from(parser.parse_args(["serve", "--ctx-size", "1024", "--port", "9000",
                                          "--capture-content"]))
    assert (s.ctx_size, s.port, s.capture_content, s.host) == (1024, 9000, True, "127.0.0.1")
    assert s.max_queue == 3 and s.api_keys() == {"k1", "k2"}
    s2 = _settings_from(parser.parse_args(["serve", "--max-queue", "5", "--no-energy"]))
    assert s2.max_queue == 5 and s2.energy is False  # a flag beats its environment variable


def test_models_list_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "list"]) == 0
    out = capsys.readouterr().out
    assert DEFAULT_MODEL_ID in out and "*" + DEFAULT_MODEL_ID in out.replace(" ", "")


def test_default_model_is_listed_first_and_embedded_one_only_when_asked(tmp_path: Path, tiny_llm: Path) -> None:
    vlm = tmp_path / "field-vlm.gguf"
    shutil.copy(tiny_llm, vlm)
    (tmp_path / "mmproj.gguf").write_bytes(b"x")
    reg = build_registry(model=str(vlm), mmproj=str(tmp_path / "mmproj.gguf"))
    assert [s.id for s in reg.list()] == ["field-vlm"]
    both = build_registry(model=str(vlm), embedded_model=True)
    assert [s.id for s in both.list()] == ["field-vlm", DEFAULT_MODEL_ID]  # the default first
    by_id = build_registry(model=DEFAULT_MODEL_ID, config=None, models_dir=str(tmp_path))
    assert by_id.list()[0].id == DEFAULT_MODEL_ID == by_id.default_id
    assert build_registry(models_dir=str(tmp_path)).default_id == "field-vlm"
    assert [s.id for s in build_registry().list()] == [DEFAULT_MODEL_ID]  # nothing named: as before


def test_models_endpoint_lists_the_default_first(make_server, tiny_llm: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import openai

    srv = make_server(model=str(tiny_llm), embedded_model=True)
    client = openai.OpenAI(base_url=srv.base_url + "/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list().data] == [model_id_for(tiny_llm), DEFAULT_MODEL_ID]
