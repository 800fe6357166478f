"""Request spans and /metrics, checked through an in-memory exporter."""

from __future__ import annotations

import json
import time

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode
from prometheus_client.parser import text_string_to_metric_families

from telemetry import Telemetry, TelemetrySettings
from telemetry.testing import sample_record

PARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def make(tmp_path, **kw) -> tuple[Telemetry, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    kw.setdefault("traces_path", None)
    kw.setdefault("energy_meters", ("estimate",))
    t = Telemetry(TelemetrySettings(**kw), "1.2.3", span_exporter_override=exporter)
    t.start()
    return t, exporter


def request_span(exporter: InMemorySpanExporter):
    [span] = [s for s in exporter.get_finished_spans() if s.attributes.get("gen_ai.operation.name")]
    return span


def test_success_span_carries_genai_and_edgevlm_attributes(tmp_path):
    t, exporter = make(tmp_path)
    rt = t.begin("chat", "smolvlm-256m", {})
    rt.finish(sample_record())
    span = request_span(exporter)
    a = span.attributes
    assert span.name == "chat smolvlm-256m"
    assert span.status.status_code is StatusCode.UNSET
    assert a["gen_ai.operation.name"] == "chat"
    assert a["gen_ai.provider.name"] == "llama.cpp"
    assert a["gen_ai.request.model"] == "smolvlm-256m"
    assert (a["gen_ai.request.max_tokens"], a["gen_ai.request.temperature"], a["gen_ai.request.seed"]) == (64, 0.2, 7)
    assert a["gen_ai.request.stream"] is True
    assert (a["gen_ai.usage.input_tokens"], a["gen_ai.usage.output_tokens"]) == (120, 33)
    assert tuple(a["gen_ai.response.finish_reasons"]) == ("stop",)
    assert a["gen_ai.response.id"] == "chatcmpl-123"
    assert "error.type" not in a
    assert a["edgevlm.ttft_ms"] == 95.0 and a["edgevlm.queue_ms"] == 4.0
    assert a["edgevlm.decode_tokens_per_s"] == pytest.approx(32 / 0.32)
    assert a["edgevlm.cache.reused_tokens"] == 10 and a["edgevlm.cache.restored_tokens"] == 40
    assert (a["edgevlm.image.count"], a["edgevlm.image.tokens_before"], a["edgevlm.image.tokens_after"]) == (1, 64, 32)
    assert a["edgevlm.image.pixels"] == 512 * 384
    assert tuple(a["edgevlm.image.resize.from"]) == ("1024x768",)
    assert tuple(a["edgevlm.image.resize.to"]) == ("512x384",)
    assert (a["edgevlm.prune.method"], a["edgevlm.prune.keep"]) == ("divprune", 0.5)
    assert a["edgevlm.profile"] == "balanced"
    assert a["edgevlm.budget.ttft_ms"] == 250.0 and a["edgevlm.predicted_ttft_ms"] == 180.0
    assert a["edgevlm.middleware.profile"] == "balanced"
    assert (a["edgevlm.model.quantization"], a["edgevlm.model.bits_per_weight"]) == ("Q4_K_M", 4.85)
    assert a["edgevlm.model.file"].endswith(".gguf") and a["edgevlm.model.n_ctx"] == 4096
    assert a["edgevlm.process.peak_rss_bytes"] > 0
    assert a["edgevlm.energy.source"] == "estimate" and a["edgevlm.energy.measured"] is False
    assert a["edgevlm.energy.joules"] >= 0 and a["edgevlm.energy.overlap_requests"] == 0
    assert "gen_ai.input.messages" not in a and "gen_ai.output.messages" not in a
    t.shutdown()


def test_phase_child_spans_are_laid_out_from_the_request_start(tmp_path):
    t, exporter = make(tmp_path)
    rt = t.begin("chat", "m", {})
    time.sleep(0.5)  # the request really lasted longer than its phases
    rt.finish(sample_record())
    parent = request_span(exporter)
    kids = {s.name: s for s in exporter.get_finished_spans() if s.parent is not None}
    assert set(kids) == {"queue", "image_encode", "prefill", "decode"}
    assert all(k.parent.span_id == parent.context.span_id for k in kids.values())
    ms = lambda ns: ns / 1e6  # noqa: E731
    # Images are encoded before the request queues for its model.
    assert kids["image_encode"].start_time == parent.start_time
    assert kids["queue"].start_time == kids["image_encode"].end_time
    assert ms(kids["queue"].end_time - kids["queue"].start_time) == pytest.approx(4.0, abs=0.01)
    assert kids["prefill"].start_time == kids["queue"].end_time
    assert ms(kids["decode"].end_time - kids["decode"].start_time) == pytest.approx(320.0, abs=0.01)
    assert kids["decode"].end_time <= parent.end_time
    t.shutdown()


def test_error_sets_status_and_error_type(tmp_path):
    t, exporter = make(tmp_path)
    rt = t.begin("text_completion", "m", {})
    rt.finish(sample_record(operation="text_completion", output_tokens=0, finish_reason=None), error=TimeoutError("slow"))
    span = request_span(exporter)
    assert span.status.status_code is StatusCode.ERROR
    assert span.attributes["error.type"] == "TimeoutError"
    assert any(e.name == "exception" for e in span.events)
    body, _ = t.metrics_response()
    fams = {f.name: f for f in text_string_to_metric_families(body.decode())}
    statuses = {(s.labels["status"], s.labels["error_type"]): s.value
                for s in fams["edgevlm_requests"].samples if s.name == "edgevlm_requests_total"}
    assert statuses == {("error", "TimeoutError"): 1.0}
    t.shutdown()


def test_content_is_only_recorded_when_opted_in(tmp_path):
    t, exporter = make(tmp_path, capture_content=True)
    t.begin("chat", "m", {}).finish(sample_record())
    a = request_span(exporter).attributes
    assert json.loads(a["gen_ai.input.messages"])[0]["parts"][0]["content"] == "What is in this picture?"
    assert json.loads(a["gen_ai.output.messages"])[0]["parts"][0]["content"] == "A cat on a mat."
    t.shutdown()


def test_traceparent_is_honoured_and_echoed(tmp_path):
    t, exporter = make(tmp_path)
    rt = t.begin("chat", "m", {"TraceParent": PARENT})
    assert rt.traceparent.startswith("00-0af7651916cd43dd8448eb211c80319c-")
    assert not rt.traceparent.startswith(PARENT[:-3])  # our own span id, not the caller's
    rt.finish(sample_record())
    span = request_span(exporter)
    assert f"{span.context.trace_id:032x}" == "0af7651916cd43dd8448eb211c80319c"
    assert f"{span.parent.span_id:016x}" == "b7ad6b7169203331"
    assert span.parent.is_remote
    t.shutdown()


def test_finish_is_idempotent_and_in_flight_returns_to_zero(tmp_path):
    t, exporter = make(tmp_path)
    rt = t.begin("chat", "m", {})
    other = t.begin("chat", "m", {})
    rt.finish(sample_record())
    rt.finish(sample_record())
    assert len([s for s in exporter.get_finished_spans() if s.attributes.get("gen_ai.operation.name")]) == 1
    other.finish(sample_record())
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(t.metrics_response()[0].decode()) for s in f.samples}
    assert samples[("edgevlm_requests_in_flight", (("gen_ai_request_model", "m"),))] == 0
    # the first request overlapped the second
    spans = [s for s in exporter.get_finished_spans() if s.attributes.get("gen_ai.operation.name")]
    assert [s.attributes["edgevlm.energy.overlap_requests"] for s in spans] == [1, 1]
    t.shutdown()


def test_metrics_text_parses_and_counts_match(tmp_path):
    t, _ = make(tmp_path)
    for _ in range(3):
        t.begin("chat", "m", {}).finish(sample_record())
    t.rejected("m")
    t.rejected("m")
    t.set_queue_depth("m", 4)
    body, ctype = t.metrics_response()
    assert ctype.startswith("text/plain")
    samples = {}
    for fam in text_string_to_metric_families(body.decode()):
        for s in fam.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    mo = (("edgevlm_profile", "none"), ("gen_ai_operation_name", "chat"), ("gen_ai_request_model", "m"))
    assert samples[("gen_ai_server_time_to_first_token_seconds_count", mo)] == 3
    assert samples[("gen_ai_server_time_to_first_token_seconds_sum", mo)] == pytest.approx(3 * 0.095)
    # 95 ms falls in the (0.08, 0.1] bucket of the semconv boundaries
    assert samples[("gen_ai_server_time_to_first_token_seconds_bucket", mo[:2] + (("gen_ai_request_model", "m"), ("le", "0.08")))] == 0
    assert samples[("gen_ai_server_time_to_first_token_seconds_bucket", mo[:2] + (("gen_ai_request_model", "m"), ("le", "0.1")))] == 3
    assert samples[("gen_ai_server_time_per_output_token_seconds_count", mo)] == 3
    assert samples[("gen_ai_server_request_duration_seconds_sum", mo)] == pytest.approx(3 * 0.42)
    assert samples[("edgevlm_tokens_total", mo[:2] + (("gen_ai_request_model", "m"), ("gen_ai_token_type", "output")))] == 99
    assert samples[("edgevlm_tokens_total", mo[:2] + (("gen_ai_request_model", "m"), ("gen_ai_token_type", "input")))] == 360
    assert samples[("edgevlm_requests_rejected_total", (("gen_ai_request_model", "m"),))] == 2
    assert samples[("edgevlm_queue_depth", (("gen_ai_request_model", "m"),))] == 4
    assert (("edgevlm_energy_joules_total", mo + (("source", "estimate"),))) in samples
    t.shutdown()


def test_two_apps_in_one_process_have_separate_registries(tmp_path):
    a, _ = make(tmp_path)
    b, _ = make(tmp_path)
    a.rejected("m")
    assert b"edgevlm_requests_rejected_total{" not in b.metrics_response()[0]
    assert b"edgevlm_requests_rejected_total{" in a.metrics_response()[0]
    a.shutdown()
    b.shutdown()


def test_begin_and_finish_are_cheap(tmp_path):
    t, _ = make(tmp_path, traces_path=str(tmp_path / "t.jsonl"), energy=False)
    rec = sample_record()
    n = 200
    t0 = time.perf_counter()
    for _ in range(n):
        t.begin("chat", "m", {"traceparent": PARENT}).finish(rec)
    per_request_ms = (time.perf_counter() - t0) / n * 1000
    assert per_request_ms < 5.0  # generous for a shared 2-core CI box; ~0.5 ms typical
    t.shutdown()


def test_resource_describes_the_device(tmp_path):
    t, exporter = make(tmp_path)
    t.begin("chat", "m", {}).finish(sample_record())
    res = request_span(exporter).resource.attributes
    assert res["service.name"] == "edgevlm" and res["service.version"] == "1.2.3"
    assert res["edgevlm.device.cpu_logical_cores"] >= 1
    assert res["edgevlm.device.memory_bytes"] > 0
    assert res["host.cpu.model.name"]
    t.shutdown()
