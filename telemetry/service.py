"""The API the server calls: one Telemetry per app, one RequestTrace per request."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SpanExporter
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from .attributes import PROVIDER, record_attributes, span_model_id
from .energy import EnergyMeter, EnergyTracker, EnergyWindow, detect_meter
from .exporters import GuardedSpanExporter
from .metrics import Metrics
from .record import RequestRecord, peak_rss_bytes
from .settings import TelemetrySettings
from .tracing import build_resource, build_tracer_provider

log = logging.getLogger("edgevlm.telemetry")

_PROPAGATOR = TraceContextTextMapPropagator()
_MS = 1_000_000  # ns per ms
UNKNOWN_MODEL = "unknown"  # metric label for a model id the server does not offer


class RequestTrace:
    """One request's span, energy window and in-flight slot; ``finish`` closes all three."""

    def __init__(
        self, telemetry: Telemetry, span: trace.Span, window: EnergyWindow | None,
        operation: str, model_label: str, start_ns: int, start_perf: float,
    ) -> None:
        self._telemetry = telemetry
        self.span = span
        self._window = window
        self.operation = operation
        self.model_label = model_label  # the metric label, not necessarily the id sent
        self.start_ns = start_ns
        self._start_perf = start_perf
        self._done = False
        self._lock = threading.Lock()

    @property
    def span_context(self) -> trace.SpanContext:
        return self.span.get_span_context()

    @property
    def trace_id(self) -> str:
        return f"{self.span_context.trace_id:032x}"

    @property
    def traceparent(self) -> str:
        """W3C ``traceparent`` for this request's span, for the server to echo back."""
        c = self.span_context
        return f"00-{c.trace_id:032x}-{c.span_id:016x}-{int(c.trace_flags):02x}"

    @property
    def finished(self) -> bool:
        return self._done

    def add_event(self, name: str, attributes: Mapping[str, Any] | None = None) -> None:
        """Mark a moment on the span (e.g. client disconnected)."""
        if not self._done:
            self.span.add_event(name, dict(attributes or {}))

    def finish(self, record: RequestRecord, error: BaseException | None = None) -> None:
        """End the span with every attribute, child phase spans, energy and metrics. Idempotent."""
        with self._lock:
            if self._done:
                return
            self._done = True
        end_ns = time.time_ns()
        self._telemetry._finish(self, record, error, end_ns, (time.perf_counter() - self._start_perf) * 1000.0)
        self._window = None


class Telemetry:
    """Tracing, metrics and energy for one app; no global state, so tests can build many."""

    def __init__(
        self,
        settings: TelemetrySettings,
        service_version: str,
        span_exporter_override: SpanExporter | None = None,
    ) -> None:
        self.settings = settings
        self.service_version = service_version
        self._override = span_exporter_override
        self.metrics: Metrics | None = Metrics() if settings.metrics else None
        self.provider: TracerProvider | None = None
        self.exporters: list[GuardedSpanExporter] = []
        self.energy = EnergyTracker(None)
        self.energy_skipped: dict[str, str] = {}
        self._tracer: trace.Tracer | None = None
        self._start_lock = threading.Lock()
        self._model_labels: frozenset[str] | None = None

    def label_models(self, model_ids: Iterable[str]) -> None:
        """Only these ids become ``gen_ai_request_model`` label values; any other model a
        client names is counted as ``unknown``, so random names cannot grow /metrics."""
        self._model_labels = frozenset(model_ids)

    def watch_image_caches(self, stats: Callable[[], Mapping[str, Mapping[str, int]]]) -> None:
        """Show the image-embedding caches in /metrics; ``stats()`` maps model id -> counters
        (entries, bytes, max_bytes, hits, misses, evictions) and is read at each scrape."""
        if self.metrics is not None:
            self.metrics.watch_image_caches(stats)

    def watch_runners(self, stats: Callable[[], Mapping[str, Mapping[str, object]]]) -> None:
        """Show runner processes in /metrics; ``stats()`` maps model id -> its runner's row
        (pid, rss_bytes, restarts, last_exit, state) and is read at each scrape."""
        if self.metrics is not None:
            self.metrics.watch_runners(stats)

    def model_label(self, model_id: str) -> str:
        """The metric label for ``model_id`` (itself until :meth:`label_models` is called)."""
        if self._model_labels is None or model_id in self._model_labels:
            return model_id
        return UNKNOWN_MODEL

    # --- lifecycle --------------------------------------------------------------------

    def start(self) -> None:
        """Build exporters and detect the energy meter; safe to call twice."""
        with self._start_lock:
            if self._tracer is not None:
                return
            resource = build_resource(self.service_version)
            self.provider, self.exporters = build_tracer_provider(
                self.settings, resource, self._count_export_failure, self._override
            )
            if self.settings.energy:
                found = detect_meter(
                    self.settings.energy_sysfs_root, self.settings.energy_meters,
                    self.settings.cpu_watts_per_core, self.settings.cpu_tdp_watts,
                )
                self.energy = EnergyTracker(found.meter)
                self.energy_skipped = found.skipped
            self._tracer = self.provider.get_tracer("edgevlm.telemetry", self.service_version)

    def shutdown(self) -> None:
        """Flush every exporter and stop energy sampling (call on app exit)."""
        with self._start_lock:
            if self.provider is not None:
                try:
                    self.provider.shutdown()
                except Exception as exc:
                    log.warning("telemetry shutdown: %s", exc)
            if self.energy.meter is not None:
                self.energy.meter.close()
            self._tracer = None

    def force_flush(self, timeout_millis: int = 5000) -> bool:
        """Push buffered spans to every exporter now."""
        return self.provider.force_flush(timeout_millis) if self.provider is not None else True

    @property
    def energy_meter(self) -> EnergyMeter | None:
        return self.energy.meter

    def _count_export_failure(self, exporter: str) -> None:
        if self.metrics is not None:
            self.metrics.export_failures.labels(exporter).inc()

    # --- request path -----------------------------------------------------------------

    def begin(self, operation: str, model_id: str, headers: Mapping[str, str]) -> RequestTrace:
        """Start the request span (child of the caller's traceparent), energy window, in-flight +1."""
        if self._tracer is None:
            self.start()
        assert self._tracer is not None
        carrier = {k.lower(): v for k, v in headers.items() if k.lower() in ("traceparent", "tracestate")}
        parent = _PROPAGATOR.extract(carrier) if carrier else None
        start_ns = time.time_ns()
        span_model = span_model_id(model_id)
        span = self._tracer.start_span(
            f"{operation} {span_model}",
            context=parent,
            kind=SpanKind.SERVER,
            attributes={
                "gen_ai.operation.name": operation,
                "gen_ai.provider.name": PROVIDER,
                "gen_ai.request.model": span_model,
            },
            start_time=start_ns,
        )
        window = self.energy.open() if self.energy.meter is not None else None
        label = self.model_label(model_id)
        if self.metrics is not None:
            self.metrics.in_flight.labels(label).inc()
        return RequestTrace(self, span, window, operation, label, start_ns, time.perf_counter())

    def _finish(
        self, rt: RequestTrace, record: RequestRecord, error: BaseException | None, end_ns: int, elapsed_ms: float
    ) -> None:
        span = rt.span
        try:
            if error is not None and not record.error_type:
                record.error_type = type(error).__qualname__
            if record.e2e_ms <= 0:
                record.e2e_ms = elapsed_ms
            if record.peak_rss_bytes is None:  # the server's, plus the model runner's when it has one
                record.peak_rss_bytes = peak_rss_bytes() + (record.runner_peak_rss_bytes or 0)
            if rt._window is not None:
                record.energy.update(self.energy.close(rt._window, record.output_tokens))
            span.set_attributes(record_attributes(record, self.settings.capture_content))
            if record.error_type:
                span.set_status(Status(StatusCode.ERROR, str(error) if error is not None else record.error_type))
                if error is not None:
                    span.record_exception(error)
            self._phase_spans(span, record, rt.start_ns, end_ns)
        except Exception as exc:  # telemetry must never fail a request
            log.warning("telemetry finish failed: %s", exc, exc_info=True)
        finally:
            span.end(end_time=end_ns)
            self._record_metrics(rt, record)

    def _phase_spans(self, parent: trace.Span, record: RequestRecord, start_ns: int, end_ns: int) -> None:
        """Image encode, queue, prefill and decode laid out back to back from the span start."""
        assert self._tracer is not None
        ctx = trace.set_span_in_context(parent)
        t = start_ns

        def child(name: str, ms: float, attrs: dict[str, Any]) -> None:
            nonlocal t
            if ms <= 0:
                return
            s, e = t, min(t + int(ms * _MS), end_ns)
            span = self._tracer.start_span(name, context=ctx, attributes=attrs, start_time=s)  # type: ignore[union-attr]
            span.end(end_time=max(s, e))
            t = max(s, e)

        # Images are loaded and encoded before the request joins its model's queue.
        if record.images and any(im.encode_ms > 0 for im in record.images):
            for im in record.images:
                child("image_encode", im.encode_ms, {
                    "edgevlm.image.index": im.index,
                    "edgevlm.image.tokens_before": im.tokens_before,
                    "edgevlm.image.tokens_after": im.tokens_after,
                    "edgevlm.image.cache_hit": im.cache_hit,
                    "edgevlm.image.resize.from": f"{im.source_width}x{im.source_height}",
                    "edgevlm.image.resize.to": f"{im.encoded_width}x{im.encoded_height}",
                })
        else:
            child("image_encode", record.encode_ms, {"edgevlm.encode_ms": record.encode_ms})
        child("queue", record.queue_ms, {"edgevlm.queue_ms": record.queue_ms})
        child("prefill", record.prefill_ms, {
            "edgevlm.prefilled_tokens": record.prefilled_tokens,
            "edgevlm.cache.reused_tokens": record.cached_tokens,
        })
        child("decode", record.decode_ms, {"gen_ai.usage.output_tokens": record.output_tokens,
                                           "edgevlm.speculative.drafted_tokens": record.drafted_tokens,
                                           "edgevlm.speculative.accepted_tokens": record.accepted_tokens})

    def _record_metrics(self, rt: RequestTrace, record: RequestRecord) -> None:
        m = self.metrics
        if m is None:
            return
        try:
            labels = (rt.model_label, rt.operation, record.profile or "none")
            m.in_flight.labels(rt.model_label).dec()
            m.duration.labels(*labels).observe(record.e2e_ms / 1000.0)
            if record.output_tokens > 0 and record.ttft_ms > 0:
                m.ttft.labels(*labels).observe(record.ttft_ms / 1000.0)
            if record.output_tokens > 1 and record.decode_ms > 0:
                m.tpot.labels(*labels).observe(record.time_per_output_token_ms / 1000.0)
            m.tokens.labels(*labels, "input").inc(record.input_tokens)
            m.tokens.labels(*labels, "output").inc(record.output_tokens)
            status = "error" if record.error_type else "ok"
            m.requests.labels(*labels, status, record.error_type or "").inc()
            joules = record.energy.get("joules")
            if joules is not None:
                m.energy.labels(*labels, str(record.energy.get("source", "unknown"))).inc(float(joules))
        except Exception as exc:
            log.warning("telemetry metrics failed: %s", exc)

    def rejected(self, model_id: str) -> None:
        """Count a request refused with 429 (queue full)."""
        if self.metrics is not None:
            self.metrics.rejected.labels(self.model_label(model_id)).inc()

    def set_queue_depth(self, model_id: str, depth: int) -> None:
        """Current number of requests waiting for this model's engine."""
        if self.metrics is not None:
            self.metrics.queue_depth.labels(self.model_label(model_id)).set(depth)

    def metrics_response(self) -> tuple[bytes, str]:
        """(body, content-type) for GET /metrics; empty body when metrics are off."""
        if self.metrics is None:
            return b"", "text/plain; version=0.0.4; charset=utf-8"
        return self.metrics.render()

    def sample_idle_power(self, seconds: float = 1.0) -> float | None:
        """Measure idle watts now (call at start-up, before traffic); later windows subtract it."""
        if self._tracer is None:
            self.start()
        return self.energy.sample_idle(seconds)
