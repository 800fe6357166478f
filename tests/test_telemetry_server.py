"""Spans and metrics recorded by a live server for real requests."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client.parser import text_string_to_metric_families

from server import __version__
from telemetry import Telemetry, TelemetrySettings
from tests.conftest import chat_body

MODEL = "smollm2-135m-instruct-q4_1"


@pytest.fixture
def traced(make_server):  # type: ignore[no-untyped-def]
    exporter = InMemorySpanExporter()

    def make(**kw: Any):  # type: ignore[no-untyped-def]
        capture = kw.pop("capture_content", False)
        tel = Telemetry(TelemetrySettings(traces_path=None, energy=True, energy_meters=("estimate",),
                                          capture_content=capture),
                        service_version=__version__, span_exporter_override=exporter)
        srv = make_server(telemetry=tel, capture_content=capture, **kw)
        return srv, tel, exporter

    return make


def request_spans(tel: Telemetry, exporter: InMemorySpanExporter) -> list[Any]:
    tel.force_flush()
    return [s for s in exporter.get_finished_spans() if s.name.startswith(("chat ", "text_completion "))]


def test_non_streamed_chat_span(traced) -> None:  # type: ignore[no-untyped-def]
    srv, tel, exporter = traced()
    tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    with srv.client() as c:
        body = c.post("/v1/chat/completions", json=chat_body("The secret word is zebra.", max_tokens=6,
                                                              seed=3), headers={"traceparent": tp}).json()
    [span] = request_spans(tel, exporter)
    a = span.attributes
    assert span.name == f"chat {MODEL}"
    assert format(span.context.trace_id, "032x") == "0af7651916cd43dd8448eb211c80319c"
    assert a["gen_ai.operation.name"] == "chat"
    assert a["gen_ai.provider.name"] == "llama.cpp"
    assert a["gen_ai.request.model"] == MODEL
    assert a["gen_ai.request.max_tokens"] == 6 and a["gen_ai.request.seed"] == 3
    assert a["gen_ai.usage.input_tokens"] == body["usage"]["prompt_tokens"]
    assert a["gen_ai.usage.output_tokens"] == body["usage"]["completion_tokens"]
    assert list(a["gen_ai.response.finish_reasons"]) == [body["choices"][0]["finish_reason"]]
    assert a["gen_ai.response.id"] == body["id"]
    assert a["gen_ai.request.stream"] is False
    for key in ("edgevlm.ttft_ms", "edgevlm.prefill_ms", "edgevlm.e2e_ms", "edgevlm.queue_ms"):
        assert a[key] >= 0
    assert a["edgevlm.model.quantization"] == "Q4_1"
    assert 4 < a["edgevlm.model.bits_per_weight"] < 7
    assert a["edgevlm.energy.source"] == "estimate" and a["edgevlm.energy.measured"] is False
    assert a["edgevlm.energy.joules"] > 0
    # No content unless the operator opts in.
    assert not any("zebra" in json.dumps(v, default=str) for v in a.values())
    children = {s.name for s in exporter.get_finished_spans() if s.parent and s.parent.span_id == span.context.span_id}
    assert {"queue", "prefill", "decode"} <= children


def test_streamed_chat_span_covers_the_stream(traced) -> None:  # type: ignore[no-untyped-def]
    srv, tel, exporter = traced()
    with srv.client() as c:
        r = c.post("/v1/chat/completions", json=chat_body("hi", max_tokens=8, ignore_eos=True, stream=True))
        assert r.status_code == 200 and "[DONE]" in r.text
    [span] = request_spans(tel, exporter)
    a = span.attributes
    assert a["gen_ai.request.stream"] is True
    assert a["gen_ai.usage.output_tokens"] == 8
    assert list(a["gen_ai.response.finish_reasons"]) == ["length"]
    assert (span.end_time - span.start_time) / 1e6 >= a["edgevlm.ttft_ms"]


def test_error_span_and_content_capture(traced) -> None:  # type: ignore[no-untyped-def]
    srv, tel, exporter = traced(ctx_size=128, capture_content=True)
    with srv.client() as c:
        assert c.post("/v1/chat/completions", json=chat_body("word " * 300)).status_code == 400
        ok = c.post("/v1/chat/completions", json=chat_body("The secret word is zebra.", max_tokens=3))
        assert ok.status_code == 200
    failed, good = request_spans(tel, exporter)
    assert failed.attributes["error.type"] == "context_length_exceeded"
    assert failed.status.status_code.name == "ERROR"
    assert "zebra" in json.dumps(dict(good.attributes), default=str)


def test_metrics_count_requests(traced) -> None:  # type: ignore[no-untyped-def]
    srv, tel, exporter = traced()
    with srv.client() as c:
        for _ in range(3):
            assert c.post("/v1/chat/completions", json=chat_body("hi", max_tokens=4, ignore_eos=True)).status_code == 200
        text = httpx.get(srv.base_url + "/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    dur = families["gen_ai_server_request_duration_seconds"]
    count = [s.value for s in dur.samples if s.name.endswith("_count")]
    assert count == [3.0]
    tokens = families["edgevlm_tokens"]
    out = [s.value for s in tokens.samples if s.labels.get("gen_ai_token_type") == "output" and s.name.endswith("_total")]
    assert out == [12.0]


def test_jsonl_traces_survive_sigkill_mid_load(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import os
    import signal
    import subprocess
    import sys
    import threading
    import time

    from bench.process import free_port

    port = free_port()
    traces = tmp_path / "t.jsonl"
    env = {**os.environ, "EDGEVLM_TRACES_FLUSH_MS": "50"}
    proc = subprocess.Popen([sys.executable, "-m", "server.cli", "serve", "--port", str(port),
                             "--traces", str(traces), "--parallel", "2", "--no-energy",
                             "--log-level", "warning"], env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(base + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        stop = threading.Event()

        def load() -> None:
            with httpx.Client(base_url=base, timeout=30) as c:
                while not stop.is_set():
                    try:
                        c.post("/v1/chat/completions", json=chat_body("hi", max_tokens=3))
                    except httpx.HTTPError:
                        return

        workers = [threading.Thread(target=load) for _ in range(3)]
        for w in workers:
            w.start()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and (not traces.exists() or traces.stat().st_size < 10_000):
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        stop.set()
        for w in workers:
            w.join(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    lines = traces.read_bytes().split(b"\n")
    complete, last = lines[:-1], lines[-1]
    spans = [s for line in complete for rs in json.loads(line)["resourceSpans"] for ss in rs["scopeSpans"]
             for s in ss["spans"]]
    assert len(spans) >= 5
    assert all(s["traceId"] and s["name"] for s in spans)
    if last:  # a partial last line is allowed, nothing else
        with pytest.raises(json.JSONDecodeError):
            json.loads(last)


def test_idle_baseline_on_demand(traced) -> None:  # type: ignore[no-untyped-def]
    srv, tel, exporter = traced()
    r = httpx.post(srv.base_url + "/energy/idle-baseline", params={"seconds": 0.3}, timeout=30)
    assert r.status_code == 200, r.text
    assert r.json()["source"] == "estimate" and r.json()["idle_watts"] >= 0
    with srv.client() as c:
        assert c.post("/v1/chat/completions", json=chat_body("hi", max_tokens=4)).status_code == 200
    [span] = request_spans(tel, exporter)
    assert "edgevlm.energy.joules_idle_subtracted" in span.attributes
    assert span.attributes["edgevlm.energy.idle_watts"] == pytest.approx(r.json()["idle_watts"])
    bad = httpx.post(srv.base_url + "/energy/idle-baseline", params={"seconds": 0})
    assert bad.status_code == 400


def test_request_refused_while_preparing_still_leaves_a_span(traced) -> None:  # type: ignore[no-untyped-def]
    srv, tel, exporter = traced()
    body = {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]}
    with srv.client() as c:
        assert c.post("/v1/chat/completions", json=body).status_code == 400
    [span] = request_spans(tel, exporter)
    assert span.attributes["error.type"] == "model_not_multimodal"
    assert span.status.status_code.name == "ERROR"


def test_unknown_model_is_traced_as_an_error(traced) -> None:  # type: ignore[no-untyped-def]
    srv, tel, exporter = traced()
    with srv.client() as c:
        assert c.post("/v1/chat/completions", json=chat_body("hi", model="nope")).status_code == 404
    [span] = request_spans(tel, exporter)
    assert span.name == "chat nope" and span.attributes["error.type"] == "model_not_found"


def test_operators_sharing_a_system_prompt_report_shared_tokens(traced) -> None:  # type: ignore[no-untyped-def]
    import concurrent.futures as cf

    import openai

    srv, tel, exporter = traced(parallel=4, ctx_size=4096)
    manual = "You assist on press line 4. Lock out before clearing jams; log every stop. " * 10
    questions = ["The press stopped. What now?", "Can I clear a jam while running?",
                 "Where do I log a stop?", "Who may reset the guard?"]
    client = openai.OpenAI(base_url=srv.base_url + "/v1", api_key="unused", max_retries=0)

    def ask(question: str) -> Any:
        return client.chat.completions.create(
            model=MODEL, temperature=0, max_tokens=12,
            messages=[{"role": "system", "content": manual}, {"role": "user", "content": question}])

    with cf.ThreadPoolExecutor(len(questions)) as pool:  # four terminals at once, a cold server
        together = list(pool.map(ask, questions))
    spans = [s for s in request_spans(tel, exporter) if s.attributes.get("gen_ai.usage.input_tokens", 0) > 100]
    assert len(spans) == 4
    spans.sort(key=lambda s: s.attributes.get("edgevlm.cache.shared_tokens", 0))
    first, others = spans[0].attributes, [s.attributes for s in spans[1:]]
    n_manual = min(a["edgevlm.cache.shared_tokens"] for a in others)
    # the manual was prefilled once: the other three took it jointly or from the first one's cells
    assert n_manual > 100
    assert first.get("edgevlm.cache.shared_tokens", 0) < 10  # at most the template's first tokens
    assert first["edgevlm.prefilled_tokens"] > n_manual - 10
    assert all(a["edgevlm.prefilled_tokens"] <= a["gen_ai.usage.input_tokens"] - n_manual for a in others)
    # Each answer is its own question's: the same start as asked alone (exact equality is
    # the engine tests' job; over a dozen tokens the default model can flip a near-tie
    # between a batch of four and one, as llama.cpp's own server does).
    alone = [ask(q).choices[0].message.content for q in questions]
    for t, a in zip(together, alone):
        assert t.choices[0].message.content[:8] == a[:8], (t.choices[0].message.content, a)


def test_trace_files_and_their_directories_are_private(make_server, tmp_path) -> None:  # type: ignore[no-untyped-def]
    import stat

    traces = tmp_path / "private" / "spans" / "t.jsonl"
    srv = make_server(traces=str(traces), traces_max_bytes=1024, capture_content=True)
    with srv.client() as c:
        for word in ("zebra", "okapi"):  # one flushed batch each: the second rotates the first
            assert c.post("/v1/chat/completions", json=chat_body(f"The secret word is {word}.",
                                                                 max_tokens=3)).status_code == 200
            srv.app.state.telemetry.force_flush()
    files = sorted(traces.parent.iterdir())
    assert [f.name for f in files] == ["t.jsonl", "t.jsonl.1"]
    assert b"zebra" in (traces.parent / "t.jsonl.1").read_bytes()  # prompts are in there
    for f in files:
        assert stat.S_IMODE(f.stat().st_mode) == 0o600, f
    for d in (traces.parent, traces.parent.parent):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700, d


def test_unknown_model_names_cannot_grow_the_metrics(traced) -> None:  # type: ignore[no-untyped-def]
    import random
    import string

    srv, tel, exporter = traced()
    rng = random.Random(0)

    def series() -> set[tuple[str, tuple[tuple[str, str], ...]]]:
        text = httpx.get(srv.base_url + "/metrics").text
        return {(s.name, tuple(sorted(s.labels.items()))) for f in text_string_to_metric_families(text)
                for s in f.samples}

    names = ["".join(rng.choices(string.ascii_lowercase, k=rng.randint(4, 300))) for _ in range(60)]
    with srv.client() as c:
        assert c.post("/v1/chat/completions", json=chat_body("hi", max_tokens=2)).status_code == 200

        def ask(name: str) -> int:
            if len(name) % 2:
                return c.post("/v1/completions", json={"model": name, "prompt": "hi"}).status_code
            return c.post("/v1/chat/completions", json=chat_body("hi", model=name)).status_code

        assert [ask(n) for n in names[:30]] == [404] * 30
        after_30 = series()
        assert [ask(n) for n in names[30:]] == [404] * 30
    after_60 = series()
    models = {dict(labels).get("gen_ai_request_model") for _, labels in after_60} - {None}
    assert models == {MODEL, "unknown"}
    assert after_60 == after_30  # 30 more unknown names, not one more series
    assert len(after_60) < 200
    tel.force_flush()
    refused = [s for s in exporter.get_finished_spans() if s.attributes.get("error.type") == "model_not_found"]
    assert len(refused) == 60
    sent = {s.attributes["gen_ai.request.model"] for s in refused}
    assert sent == {n[:128] for n in names}  # the span keeps what the client sent, cut to 128 chars
