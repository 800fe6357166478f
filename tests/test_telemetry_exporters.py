"""The JSONL file (shape, rotation, crash safety) and OTLP/HTTP export, up and down."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from telemetry import Telemetry, TelemetrySettings
from telemetry.exporters import JsonlSpanExporter, from_key_values
from telemetry.testing import sample_record
from telemetry.tracing import otlp_traces_endpoint

ROOT = Path(__file__).resolve().parents[1]


def file_telemetry(path: Path, **kw) -> Telemetry:
    kw.setdefault("energy_meters", ("estimate",))
    t = Telemetry(TelemetrySettings(traces_path=str(path), **kw), "0.0.1")
    t.start()
    return t


def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_jsonl_lines_are_otlp_json_spans_with_resource(tmp_path):
    path = tmp_path / "traces" / "t.jsonl"
    t = file_telemetry(path)
    t.begin("chat", "m", {}).finish(sample_record())
    t.shutdown()  # flushes the batch
    lines = read_lines(path)
    [req] = [s for s in lines if s["name"] == "chat m"]
    assert {s["name"] for s in lines} == {"chat m", "queue", "image_encode", "prefill", "decode"}
    assert len(req["traceId"]) == 32 and len(req["spanId"]) == 16 and req["parentSpanId"] == ""
    assert req["kind"] == 2  # OTLP SPAN_KIND_SERVER
    assert int(req["endTimeUnixNano"]) > int(req["startTimeUnixNano"])
    attrs = {kv["key"]: kv["value"] for kv in req["attributes"]}
    assert attrs["gen_ai.usage.output_tokens"] == {"intValue": "33"}
    assert attrs["edgevlm.ttft_ms"] == {"doubleValue": 95.0}
    assert attrs["gen_ai.request.stream"] == {"boolValue": True}
    assert attrs["gen_ai.response.finish_reasons"] == {"arrayValue": {"values": [{"stringValue": "stop"}]}}
    res = from_key_values(req["resource"]["attributes"])
    assert res["service.name"] == "edgevlm" and "host.name" in res
    kids = [s for s in lines if s["name"] != "chat m"]
    assert all(k["parentSpanId"] == req["spanId"] and k["traceId"] == req["traceId"] for k in kids)


def _span_batch(n: int):
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    mem = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(mem))
    tracer = provider.get_tracer("t")
    for i in range(n):
        tracer.start_span(f"s{i}", attributes={"pad": "x" * 200}).end()
    return mem.get_finished_spans()


def test_rotation_keeps_n_files_and_every_line_parses(tmp_path):
    path = tmp_path / "t.jsonl"
    exporter = JsonlSpanExporter(str(path), max_bytes=8000, keep=2, fsync=False)
    spans = _span_batch(40)
    for i in range(0, 40, 4):
        exporter.export(spans[i:i + 4])
    exporter.shutdown()
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["t.jsonl", "t.jsonl.1", "t.jsonl.2"]
    for name in files:
        assert (tmp_path / name).stat().st_size <= 8000
        assert all(line["name"].startswith("s") for line in read_lines(tmp_path / name))
    names = [s["name"] for n in ("t.jsonl.2", "t.jsonl.1", "t.jsonl") for s in read_lines(tmp_path / n)]
    assert names == [f"s{i}" for i in range(40 - len(names), 40)]  # newest kept, in order


def test_a_torn_last_line_does_not_corrupt_the_next_run(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"name":"ok"}\n{"name":"torn", "attri')
    exporter = JsonlSpanExporter(str(path), fsync=False)
    exporter.export(_span_batch(1))
    exporter.shutdown()
    lines = path.read_text().splitlines()
    assert json.loads(lines[0]) == {"name": "ok"}
    assert lines[1] == '{"name":"torn", "attri'
    assert json.loads(lines[2])["name"] == "s0"


def test_unwritable_path_never_fails_a_request_and_is_counted(tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("file in the way")
    t = file_telemetry(blocker / "t.jsonl", traces_flush_ms=10)
    t.begin("chat", "m", {}).finish(sample_record())  # must not raise
    t.force_flush()
    body = t.metrics_response()[0].decode()
    fails = {s.labels["exporter"]: s.value for f in text_string_to_metric_families(body)
             for s in f.samples if s.name == "edgevlm_telemetry_export_failures_total"}
    assert fails.get("jsonl", 0) >= 1
    t.shutdown()


WRITER = textwrap.dedent("""
    import sys, time
    from telemetry import Telemetry, TelemetrySettings
    from telemetry.testing import sample_record
    t = Telemetry(TelemetrySettings(traces_path=sys.argv[1], traces_flush_ms=5, energy=False, metrics=False), "x")
    t.start()
    print("ready", flush=True)
    while True:
        t.begin("chat", "m", {}).finish(sample_record())
""")


def test_sigkill_mid_run_leaves_only_whole_lines_except_maybe_the_last(tmp_path):
    path = tmp_path / "t.jsonl"
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], cwd=ROOT, stdout=subprocess.PIPE)
    try:
        assert proc.stdout.readline().strip() == b"ready"
        deadline = time.monotonic() + 20
        while (not path.exists() or path.stat().st_size < 50_000) and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    lines = path.read_bytes().split(b"\n")
    tail = lines.pop()  # b"" when the file ends on a newline, else the torn line
    assert len(lines) > 10
    for line in lines:
        assert json.loads(line)["traceId"]
    if tail:
        assert not tail.endswith(b"}")


class _Receiver(BaseHTTPRequestHandler):
    posts: list[tuple[str, str, int]] = []

    def do_POST(self):  # noqa: N802
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        _Receiver.posts.append((self.path, self.headers.get("Content-Type", ""), len(body)))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


def test_otlp_http_export_reaches_a_local_receiver(tmp_path):
    _Receiver.posts = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        t = Telemetry(TelemetrySettings(traces_path=None, energy=False,
                                        otlp_endpoint=f"http://127.0.0.1:{server.server_port}"), "x")
        t.start()
        t.begin("chat", "m", {}).finish(sample_record())
        t.shutdown()
    finally:
        server.shutdown()
    assert _Receiver.posts, "no OTLP POST arrived"
    path, ctype, size = _Receiver.posts[0]
    assert path == "/v1/traces" and ctype == "application/x-protobuf" and size > 100


def test_otlp_receiver_down_costs_the_request_nothing(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens here
    t = Telemetry(TelemetrySettings(traces_path=None, energy=False, otlp_endpoint=f"http://127.0.0.1:{port}",
                                    otlp_timeout_s=1.0), "x")
    t.start()
    t0 = time.perf_counter()
    for _ in range(20):
        t.begin("chat", "m", {}).finish(sample_record())
    assert (time.perf_counter() - t0) / 20 < 0.02  # no network wait on the request path
    t.force_flush(timeout_millis=5000)
    fails = {s.labels["exporter"]: s.value for f in text_string_to_metric_families(t.metrics_response()[0].decode())
             for s in f.samples if s.name == "edgevlm_telemetry_export_failures_total"}
    assert fails.get("otlp", 0) >= 1
    t.shutdown()


def test_standard_otel_env_vars_pick_the_endpoint(monkeypatch):
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", raising=False)
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_ENDPOINT", raising=False)
    assert otlp_traces_endpoint(None) is None
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318/")
    assert otlp_traces_endpoint(None) == "http://collector:4318/v1/traces"
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://other:9999/custom")
    assert otlp_traces_endpoint(None) == "http://other:9999/custom"
    assert otlp_traces_endpoint("http://mine:4318") == "http://mine:4318/v1/traces"
    assert otlp_traces_endpoint("http://mine:4318/v1/traces") == "http://mine:4318/v1/traces"
    assert os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"]  # untouched by the lookups


def test_guard_counts_every_failure_but_logs_at_most_once_per_interval(caplog):
    from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

    from telemetry.exporters import GuardedSpanExporter

    class Broken(SpanExporter):
        def export(self, spans):
            raise OSError(28, "No space left on device")

    seen: list[str] = []
    guard = GuardedSpanExporter(Broken(), "jsonl", seen.append, log_every_s=60.0)
    with caplog.at_level("WARNING", logger="edgevlm.telemetry.export"):
        results = [guard.export(_span_batch(1)) for _ in range(3)]
    assert results == [SpanExportResult.FAILURE] * 3
    assert guard.failures == 3 and seen == ["jsonl"] * 3
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1 and "No space left on device" in messages[0]
