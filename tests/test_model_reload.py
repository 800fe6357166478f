"""``POST /api/models/{model_id}/reload``: an operator brings back a failed model without
restarting the server, in runner mode and in process."""

from __future__ import annotations

from pathlib import Path

import httpx
import openai

from tests.browser import wait_for
from tests.conftest import chat_body
from tests.test_runners import DEFAULT, crash, restarted, runner_row

KEY = "reload-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


def test_reload_brings_back_a_model_whose_runner_crashed_too_often(make_server) -> None:
    srv = make_server(runners="on", runner_max_crashes=2, parallel=1, ctx_size=512, api_key=[KEY])
    pid = runner_row(srv, DEFAULT)["pid"]
    crash(pid)
    pid = wait_for(lambda: restarted(srv, DEFAULT, pid), 120, "the runner's restart")
    crash(pid)
    wait_for(lambda: runner_row(srv, DEFAULT)["state"] == "failed", 60, "the model marked failed")
    assert httpx.get(srv.base_url + "/health", timeout=30).status_code == 503

    url = f"{srv.base_url}/api/models/{DEFAULT}/reload"
    refused = httpx.post(url, timeout=30)
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
    assert runner_row(srv, DEFAULT)["state"] == "failed"  # nothing was unloaded
    unknown = httpx.post(f"{srv.base_url}/api/models/no-such-model/reload", headers=AUTH, timeout=30)
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"

    reloaded = httpx.post(url, headers=AUTH, timeout=120)
    assert reloaded.status_code == 200, reloaded.text
    card = reloaded.json()
    assert card["id"] == DEFAULT and card["object"] == "model"
    assert card["meta"]["loaded"] and "failed" not in card["meta"]

    client = openai.OpenAI(base_url=srv.base_url + "/v1", api_key=KEY, max_retries=0)
    answer = client.chat.completions.create(**chat_body("Hi", max_tokens=4))
    assert answer.choices[0].finish_reason in ("stop", "length")
    health = httpx.get(srv.base_url + "/health", timeout=30)
    assert health.status_code == 200 and health.json()["status"] == "ok"
    row = health.json()["models"][DEFAULT]["runner"]
    assert row["state"] == "ready" and row["pid"] not in (None, pid) and row["restarts"] == 0
    assert row["failure"] is None


def test_reload_in_process_swaps_the_engine_and_a_failed_load_is_a_503(
        make_server, tmp_path: Path, default_gguf: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    (models / "main.gguf").symlink_to(default_gguf)
    (models / "zz-broken.gguf").write_bytes(b"GGUF" + b"\0" * 64)  # a header and nothing else
    srv = make_server(runners="off", models_dir=str(models), parallel=1, ctx_size=512)
    registry = srv.app.state.registry
    engine = registry._loaded["main"].engine

    reloaded = httpx.post(f"{srv.base_url}/api/models/main/reload", timeout=120)
    assert reloaded.status_code == 200 and reloaded.json()["meta"]["loaded"]
    assert registry._loaded["main"].engine is not engine
    r = httpx.post(srv.base_url + "/v1/chat/completions", json=chat_body("Hi", model="main", max_tokens=4),
                   timeout=120)
    assert r.status_code == 200, r.text

    broken = httpx.post(f"{srv.base_url}/api/models/zz-broken/reload", timeout=120)
    assert broken.status_code == 503
    error = broken.json()["error"]
    assert error["code"] == "model_load_failed" and "zz-broken" in error["message"]
