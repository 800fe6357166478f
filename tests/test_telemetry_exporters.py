"""The JSONL file (shape, rotation, crash safety) and OTLP/HTTP export, up and down."""

from __future__ import annotations

import base64
import copy
import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from google.protobuf.json_format import Parse
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client.parser import text_string_to_metric_families

from telemetry import Telemetry, TelemetrySettings
from telemetry.exporters import LINE_SPANS, JsonlSpanExporter
from telemetry.otlp_json import from_key_values
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


def spans_of(path: Path) -> list[dict]:
    """Every span in a trace file, in file order (each line is an export request)."""
    return [s for line in read_lines(path) for rs in line["resourceSpans"] for ss in rs["scopeSpans"]
            for s in ss["spans"]]


def as_protobuf_json(line: dict) -> dict:
    """The line with ids in base64: OTLP JSON writes bytes ids as hex, the generic
    protobuf JSON mapping (what ``json_format.Parse`` reads) as base64."""
    line = copy.deepcopy(line)
    for rs in line["resourceSpans"]:
        for ss in rs["scopeSpans"]:
            for span in ss["spans"]:
                for key in ("traceId", "spanId", "parentSpanId"):
                    if key in span:
                        span[key] = base64.b64encode(bytes.fromhex(span[key])).decode()
    return line


def test_every_line_is_an_otlp_json_export_request(tmp_path):
    path = tmp_path / "traces" / "t.jsonl"
    sent = InMemorySpanExporter()  # what the OTLP/HTTP exporter would send for the same spans
    t = Telemetry(TelemetrySettings(traces_path=str(path), energy_meters=("estimate",)), "0.0.1",
                  span_exporter_override=sent)
    t.begin("chat", "m", {}).finish(sample_record())
    t.begin("chat", "m", {}).finish(sample_record(), error=RuntimeError("boom"))
    t.shutdown()  # flushes the batch
    lines = path.read_text().splitlines()
    assert lines
    parsed = []
    for text in lines:
        Parse(text, ExportTraceServiceRequest())  # the receiver's schema: names, types, enums
        parsed.append(Parse(json.dumps(as_protobuf_json(json.loads(text))), ExportTraceServiceRequest()))
    wire = {s.span_id: s for m in [encode_spans(sent.get_finished_spans())] for rs in m.resource_spans
            for ss in rs.scope_spans for s in ss.spans}
    in_file = {s.span_id: s for m in parsed for rs in m.resource_spans for ss in rs.scope_spans for s in ss.spans}
    assert in_file == wire and len(wire) == 10

    spans = spans_of(path)
    [req, failed] = [s for s in spans if s["name"] == "chat m"]
    assert re.fullmatch("[0-9a-f]{32}", req["traceId"]) and re.fullmatch("[0-9a-f]{16}", req["spanId"])
    assert "parentSpanId" not in req  # a root span
    assert req["kind"] == 2  # OTLP SPAN_KIND_SERVER, as an integer
    assert failed["status"]["code"] == 2  # STATUS_CODE_ERROR
    assert int(req["endTimeUnixNano"]) > int(req["startTimeUnixNano"])
    attrs = {kv["key"]: kv["value"] for kv in req["attributes"]}
    assert attrs["gen_ai.usage.output_tokens"] == {"intValue": "33"}
    assert attrs["edgevlm.ttft_ms"] == {"doubleValue": 95.0}
    assert attrs["gen_ai.request.stream"] == {"boolValue": True}
    assert attrs["gen_ai.response.finish_reasons"] == {"arrayValue": {"values": [{"stringValue": "stop"}]}}
    [rs] = read_lines(path)[0]["resourceSpans"]
    res = from_key_values(rs["resource"]["attributes"])
    assert res["service.name"] == "edgevlm" and "host.name" in res
    assert rs["scopeSpans"][0]["scope"]["name"] == "edgevlm.telemetry"
    kids = [s for s in spans if s["name"] != "chat m" and s["traceId"] == req["traceId"]]
    assert len(kids) == 4 and all(k["parentSpanId"] == req["spanId"] for k in kids)


def test_a_big_batch_is_split_into_bounded_lines(tmp_path):
    path = tmp_path / "t.jsonl"
    exporter = JsonlSpanExporter(str(path), fsync=False)
    exporter.export(_span_batch(LINE_SPANS * 2 + 1))
    exporter.shutdown()
    assert [sum(len(ss["spans"]) for rs in line["resourceSpans"] for ss in rs["scopeSpans"])
            for line in read_lines(path)] == [LINE_SPANS, LINE_SPANS, 1]


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
        assert all(span["name"].startswith("s") for span in spans_of(tmp_path / name))
    names = [s["name"] for n in ("t.jsonl.2", "t.jsonl.1", "t.jsonl") for s in spans_of(tmp_path / n)]
    assert names == [f"s{i}" for i in range(40 - len(names), 40)]  # newest kept, in order


def test_rotated_files_differ_in_their_first_1000_bytes(tmp_path):
    """The Collector's file receiver identifies a file by its first 1000 bytes: rotated
    files must not look alike there, or the new one would be taken as already read."""
    path = tmp_path / "t.jsonl"
    t = file_telemetry(path, traces_max_bytes=4000)
    for _ in range(3):
        t.begin("chat", "m", {}).finish(sample_record())
        t.force_flush()  # one batch each, so each starts a new file
    t.shutdown()
    files = sorted(tmp_path.iterdir())
    assert len(files) == 3
    assert len({f.read_bytes()[:1000] for f in files}) == 3


def test_a_torn_last_line_does_not_corrupt_the_next_run(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"name":"ok"}\n{"name":"torn", "attri')
    exporter = JsonlSpanExporter(str(path), fsync=False)
    exporter.export(_span_batch(1))
    exporter.shutdown()
    lines = path.read_text().splitlines()
    assert json.loads(lines[0]) == {"name": "ok"}
    assert lines[1] == '{"name":"torn", "attri'
    assert json.loads(lines[2])["resourceSpans"][0]["scopeSpans"][0]["spans"][0]["name"] == "s0"


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
    spans = [s for line in lines for rs in json.loads(line)["resourceSpans"] for ss in rs["scopeSpans"]
             for s in ss["spans"]]
    assert len(spans) > 10 and all(s["traceId"] for s in spans)
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
