"""The console's JSON endpoints: /api/dashboard (figures from the /metrics registry over a
window) and /api/requests (spans read back from the trace file), against live servers."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from telemetry import Telemetry, TelemetrySettings
from telemetry.dashboard import MetricsWindow, histogram_quantile
from telemetry.record import ModelInfo, RequestRecord
from tests.conftest import LiveServer


def test_histogram_quantile_interpolates_like_prometheus() -> None:
    buckets = [(0.1, 2.0), (0.2, 6.0), (0.4, 10.0), (float("inf"), 10.0)]
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.175)  # rank 5 of 10: 3/4 into (0.1, 0.2]
    assert histogram_quantile(0.95, buckets) == pytest.approx(0.375)
    assert histogram_quantile(0.99, [(0.1, 1.0), (float("inf"), 5.0)]) == 0.1  # past the last bound
    assert histogram_quantile(0.5, [(0.1, 0.0), (float("inf"), 0.0)]) is None


def finished(t: Telemetry, ttft_ms: float, output_tokens: int = 11) -> None:
    record = RequestRecord(operation="chat", model=ModelInfo(model_id="m"), input_tokens=5,
                           output_tokens=output_tokens, ttft_ms=ttft_ms, decode_ms=100.0, e2e_ms=ttft_ms + 100)
    t.begin("chat", "m", {}).finish(record)


def test_window_counts_only_requests_since_its_start() -> None:
    now = [1000.0]
    t = Telemetry(TelemetrySettings(traces_path=None, energy=False), "0")
    window = MetricsWindow(t.metrics.registry, every_s=5, clock=lambda: now[0])
    finished(t, 50.0)
    finished(t, 50.0)
    [row] = window.summary(60)["models"]
    assert row["requests"] == 2 and row["output_tokens"] == 22
    assert 40 < row["ttft_p50_ms"] <= 60  # the (40, 60] ms bucket
    assert row["decode_tokens_per_s"] == pytest.approx(100.0)  # 10 tokens after the first in 100 ms
    now[0] += 120  # two minutes on: the dashboard looks (and takes a snapshot)
    assert window.summary(60)["models"][0]["requests"] == 2  # nothing older to subtract yet
    finished(t, 900.0)
    now[0] += 70
    summary = window.summary(60)
    [row] = summary["models"]
    assert summary["window_s"] == pytest.approx(70)
    assert row["requests"] == 1 and 750 < row["ttft_p50_ms"] <= 1000
    t.shutdown()


def test_dashboard_reports_live_figures(make_server: Any, tiny_llm: Path) -> None:
    srv: LiveServer = make_server(model=str(tiny_llm), energy=True)
    with srv.client() as c:
        for _ in range(2):
            assert c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                        "max_tokens": 6}).status_code == 200
        assert c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                    "max_tokens": 6, "edgevlm": {"profile": "fast"}}
                      ).status_code == 200
        body = c.get("/api/dashboard", params={"window_s": 60}).json()
    rows = {m["profile"]: m for m in body["models"] if m["operation"] == "chat"}
    assert set(rows) == {"quality", "fast"}  # the server's default profile and the one asked for
    row = rows["quality"]
    assert row["requests"] == 2 and row["errors"] == 0 and row["ttft_p95_ms"] >= row["ttft_p50_ms"] > 0
    assert rows["fast"]["requests"] == 1
    assert row["in_flight"] == 0 and row["queued"] == 0
    assert row["joules_per_output_token"] > 0 and row["energy_source"] == body["energy_meter"]
    assert body["energy_meter"] and body["energy"]["joules"][body["energy_meter"]] > 0
    assert body["energy"]["joules_per_output_token"] > 0
    assert body["traces"] is True and body["metrics"] is True and body["capture_content"] is False


def test_console_endpoints_need_the_api_key(make_server: Any, tiny_llm: Path) -> None:
    srv: LiveServer = make_server(model=str(tiny_llm), api_key=["k1"])
    with srv.client() as c:
        for path in ("/api/dashboard", "/api/requests"):
            r = c.get(path)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
            assert c.get(path, headers={"Authorization": "Bearer k1"}).status_code == 200
        assert c.get("/").status_code == 200  # the page itself asks for the key


def ask_and_find(srv: LiveServer, content: str) -> dict[str, Any]:
    with srv.client() as c:
        r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": content}],
                                                 "max_tokens": 4})
        trace = r.headers["traceparent"].split("-")[1]
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            detail = c.get(f"/api/requests/{trace}")
            if detail.status_code == 200:
                rows = c.get("/api/requests", params={"limit": 5}).json()["data"]
                assert rows[0]["trace_id"] == trace and rows[0]["status"] == "ok"
                return detail.json()
            assert detail.json()["error"]["code"] == "not_found"
            time.sleep(0.1)
    raise AssertionError("the span never reached the trace file")


@pytest.mark.parametrize("capture", [False, True])
def test_prompt_text_is_shown_only_with_capture_content(make_server: Any, tiny_llm: Path,
                                                        capture: bool) -> None:
    srv = make_server(model=str(tiny_llm), capture_content=capture, traces_flush_ms=50)
    detail = ask_and_find(srv, "the gauge reads 42 bar")
    assert ("gen_ai.input.messages" in detail["attributes"]) is capture
    assert ("42 bar" in str(detail)) is capture
    assert [p["name"] for p in detail["phases"]][-2:] == ["prefill", "decode"]
    assert detail["phases"][-1]["duration_ms"] > 0


def test_recent_requests_say_when_the_trace_file_is_off(make_server: Any, tiny_llm: Path) -> None:
    srv = make_server(model=str(tiny_llm), traces="none")
    with srv.client() as c:
        r = c.get("/api/requests")
        assert r.status_code == 404 and r.json()["error"]["code"] == "traces_off"
        assert c.get("/api/dashboard").json()["traces"] is False
