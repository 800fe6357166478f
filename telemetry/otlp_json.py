"""OTLP/JSON for the trace file: spans -> ``ExportTraceServiceRequest`` lines, and back.

The writer uses the OpenTelemetry protobuf encoder (the one the OTLP/HTTP exporter
sends), so a line is exactly what the Collector's ``file`` exporter writes and its
``otlpjsonfile`` receiver reads. The reader also takes the older one-span-per-line
files (a flattened span with its ``resource`` on the line).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from google.protobuf.json_format import MessageToDict
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.trace import ReadableSpan

# Span and link fields that are bytes in the proto: the OTLP JSON encoding writes them as
# hex, where the generic protobuf JSON mapping would write base64.
_ID_FIELDS = (("traceId", "trace_id"), ("spanId", "span_id"), ("parentSpanId", "parent_span_id"))


def export_request(spans: Sequence[ReadableSpan]) -> dict[str, Any]:
    """``spans`` as one OTLP JSON ``ExportTraceServiceRequest`` (``{"resourceSpans": [...]}``).

    Per the OTLP JSON encoding: lowerCamelCase keys, enums as integers, 64-bit integers
    and nanosecond times as strings, trace and span ids as lowercase hex.
    """
    message = encode_spans(spans)
    out = MessageToDict(message, use_integers_for_enums=True)
    # Spans before the resource: a Collector tells files apart by their first 1000 bytes,
    # and the resource (the same for every file a process writes) is longer than that.
    out["resourceSpans"] = [{"scopeSpans": rs.pop("scopeSpans", []), **rs} for rs in out.get("resourceSpans", [])]
    for rs_json, rs in zip(out["resourceSpans"], message.resource_spans):
        for ss_json, ss in zip(rs_json.get("scopeSpans", []), rs.scope_spans):
            for span_json, span in zip(ss_json.get("spans", []), ss.spans):
                _hex_ids(span_json, span)
                for link_json, link in zip(span_json.get("links", []), span.links):
                    _hex_ids(link_json, link)
    return out


def _hex_ids(target: dict[str, Any], message: Any) -> None:
    for json_name, field in _ID_FIELDS:
        if json_name in target:
            target[json_name] = getattr(message, field).hex()


def flat_spans(line: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The spans of one trace-file line, each with its ``resource`` and ``scope`` attached.

    A line is either an ``ExportTraceServiceRequest`` or (files written before it was)
    a single span that already carries its resource.
    """
    if "resourceSpans" not in line:
        if "traceId" in line or "name" in line:
            yield line
        return
    for rs in line.get("resourceSpans") or []:
        resource = rs.get("resource") or {}
        for ss in rs.get("scopeSpans") or []:
            scope = ss.get("scope") or {}
            for span in ss.get("spans") or []:
                yield {**span, "resource": resource, "scope": scope}


def from_any_value(value: dict[str, Any]) -> Any:
    """One OTLP JSON ``AnyValue`` as a Python value (``intValue`` is a string on the wire)."""
    if "stringValue" in value:
        return value["stringValue"]
    if "intValue" in value:
        return int(value["intValue"])
    if "doubleValue" in value:
        return float(value["doubleValue"])
    if "boolValue" in value:
        return bool(value["boolValue"])
    if "arrayValue" in value:
        return [from_any_value(v) for v in value["arrayValue"].get("values", [])]
    return None


def from_key_values(items: list[dict[str, Any]] | None) -> dict[str, Any]:
    """OTLP JSON ``[{key, value}]`` as a dict."""
    return {kv["key"]: from_any_value(kv.get("value", {})) for kv in items or []}
