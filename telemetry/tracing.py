"""Build the TracerProvider: device resource, batch processors, exporters chosen by settings."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable

from opentelemetry.sdk.resources import SERVICE_NAME, SERVICE_VERSION, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
    SpanExporter,
)
from opentelemetry.sdk.trace.sampling import ALWAYS_ON

from .device import device_attributes
from .exporters import GuardedSpanExporter, JsonlSpanExporter
from .settings import TelemetrySettings

log = logging.getLogger("edgevlm.telemetry")

TRACES_PATH = "/v1/traces"


def build_resource(service_version: str) -> Resource:
    """service.name=edgevlm, the version and this device; OTEL_RESOURCE_ATTRIBUTES still merges in."""
    attrs = {SERVICE_NAME: "edgevlm", SERVICE_VERSION: service_version, **device_attributes()}
    return Resource.create(attrs)


def otlp_traces_endpoint(configured: str | None) -> str | None:
    """The OTLP/HTTP traces URL from settings, else from the standard env vars, else None."""
    if configured:
        return configured if configured.rstrip("/").endswith(TRACES_PATH) else configured.rstrip("/") + TRACES_PATH
    if os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        return os.environ["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"]
    if os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        return os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"].rstrip("/") + TRACES_PATH
    return None


def build_exporters(settings: TelemetrySettings) -> list[tuple[str, SpanExporter, int]]:
    """(name, exporter, batch delay ms) for each exporter the settings ask for."""
    out: list[tuple[str, SpanExporter, int]] = []
    if settings.traces_path:
        jsonl = JsonlSpanExporter(
            settings.traces_path, settings.traces_max_bytes, settings.traces_keep, fsync=settings.traces_fsync
        )
        out.append(("jsonl", jsonl, settings.traces_flush_ms))
    endpoint = otlp_traces_endpoint(settings.otlp_endpoint)
    if endpoint:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        out.append(("otlp", OTLPSpanExporter(endpoint=endpoint, timeout=settings.otlp_timeout_s), 5000))
        log.info("exporting spans over OTLP/HTTP to %s", endpoint)
    if settings.console:
        out.append(("console", ConsoleSpanExporter(out=sys.stderr), 1000))
    return out


def build_tracer_provider(
    settings: TelemetrySettings,
    resource: Resource,
    on_export_failure: Callable[[str], None] | None = None,
    span_exporter_override: SpanExporter | None = None,
) -> tuple[TracerProvider, list[GuardedSpanExporter]]:
    """A private TracerProvider (never the global one, so several apps can share a process).

    Every request is recorded (ALWAYS_ON) even if the caller's traceparent says
    unsampled: the local trace file is the benchmark record. Each exporter gets its
    own BatchSpanProcessor so a slow collector cannot delay the file.
    """
    provider = TracerProvider(resource=resource, sampler=ALWAYS_ON)
    guarded: list[GuardedSpanExporter] = []
    for name, exporter, delay_ms in build_exporters(settings):
        g = GuardedSpanExporter(exporter, name, on_export_failure)
        guarded.append(g)
        provider.add_span_processor(BatchSpanProcessor(g, schedule_delay_millis=delay_ms, max_queue_size=4096))
    if span_exporter_override is not None:
        g = GuardedSpanExporter(span_exporter_override, "override", on_export_failure)
        guarded.append(g)
        provider.add_span_processor(SimpleSpanProcessor(g))
    return provider, guarded
