"""Recent requests read back from the JSONL trace file, for the web console.

The trace file is the record of what each request cost; the console shows its newest
request spans and, for one of them, the phase spans (image encode, queue, prefill,
decode) laid out under it. Only the file's tail is read, so a large file costs no more
than a small one. Prompt and answer text are dropped unless the operator opted in to
content capture: a file written earlier with ``--capture-content`` may still hold them.
"""

from __future__ import annotations

import json
import os
from typing import Any

from .otlp_json import flat_spans, from_key_values

TAIL_BYTES = 4 * 1024 * 1024  # newest part of the file read per call
CONTENT_KEYS = ("gen_ai.input.messages", "gen_ai.output.messages")


def _tail_spans(path: str, tail_bytes: int) -> list[dict[str, Any]]:
    """The spans of the file's last ``tail_bytes`` (the first, partial line skipped)."""
    try:
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            start = max(0, size - tail_bytes)
            f.seek(start)
            data = f.read()
    except FileNotFoundError:
        return []
    lines = data.split(b"\n")
    if start > 0:
        lines = lines[1:]
    spans: list[dict[str, Any]] = []
    for raw in lines:
        if not raw.strip():
            continue
        try:
            line = json.loads(raw)
        except ValueError:  # a torn line from a crash: the exporter keeps it on its own line
            continue
        spans.extend(flat_spans(line))
    return spans


def _ms(nanos: Any) -> float:
    return int(nanos or 0) / 1e6


def _row(span: dict[str, Any], attrs: dict[str, Any]) -> dict[str, Any]:
    finish = attrs.get("gen_ai.response.finish_reasons") or [None]
    return {
        "trace_id": span.get("traceId"), "span_id": span.get("spanId"),
        "time_ms": _ms(span.get("startTimeUnixNano")),
        "request_id": attrs.get("gen_ai.response.id"),
        "operation": attrs.get("gen_ai.operation.name"),
        "model": attrs.get("gen_ai.request.model"),
        "profile": attrs.get("edgevlm.profile"),
        "ttft_ms": attrs.get("edgevlm.ttft_ms"),
        "e2e_ms": attrs.get("edgevlm.e2e_ms"),
        "input_tokens": attrs.get("gen_ai.usage.input_tokens"),
        "output_tokens": attrs.get("gen_ai.usage.output_tokens"),
        "decode_tokens_per_s": attrs.get("edgevlm.decode_tokens_per_s"),
        "image_tokens_before": attrs.get("edgevlm.image.tokens_before"),
        "image_tokens_after": attrs.get("edgevlm.image.tokens_after"),
        "joules": attrs.get("edgevlm.energy.joules"),
        "energy_source": attrs.get("edgevlm.energy.source"),
        "finish_reason": finish[0],
        "status": attrs.get("error.type") or "ok",
    }


def _is_request(attrs: dict[str, Any]) -> bool:
    return "gen_ai.operation.name" in attrs


def recent_requests(path: str, limit: int = 50, tail_bytes: int = TAIL_BYTES) -> list[dict[str, Any]]:
    """The newest ``limit`` request spans in the file, newest first, as table rows."""
    rows = []
    for span in _tail_spans(path, tail_bytes):
        attrs = from_key_values(span.get("attributes"))
        if _is_request(attrs):
            rows.append(_row(span, attrs))
    rows.sort(key=lambda r: r["time_ms"], reverse=True)
    return rows[:limit]


def request_detail(path: str, trace_id: str, capture_content: bool,
                   tail_bytes: int = TAIL_BYTES) -> dict[str, Any] | None:
    """One request span (by trace id) with its attributes, events and phase spans.

    ``None`` when the span is not (or no longer) in the file's tail.
    """
    spans = [s for s in _tail_spans(path, tail_bytes) if s.get("traceId") == trace_id]
    request = next((s for s in spans if _is_request(from_key_values(s.get("attributes")))), None)
    if request is None:
        return None
    attrs = from_key_values(request.get("attributes"))
    if not capture_content:
        for key in CONTENT_KEYS:
            attrs.pop(key, None)
    start = _ms(request.get("startTimeUnixNano"))
    phases = [{
        "name": s.get("name"),
        "start_ms": round(_ms(s.get("startTimeUnixNano")) - start, 3),
        "duration_ms": round(_ms(s.get("endTimeUnixNano")) - _ms(s.get("startTimeUnixNano")), 3),
        "attributes": from_key_values(s.get("attributes")),
    } for s in spans if s.get("parentSpanId") == request.get("spanId")]
    phases.sort(key=lambda p: p["start_ms"])
    events = [{"name": e.get("name"), "time_ms": round(_ms(e.get("timeUnixNano")) - start, 3),
               "attributes": from_key_values(e.get("attributes"))} for e in request.get("events") or []]
    return {**_row(request, attrs), "name": request.get("name"),
            "duration_ms": round(_ms(request.get("endTimeUnixNano")) - start, 3),
            "attributes": attrs, "events": events, "phases": phases}
