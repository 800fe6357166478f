"""``GET /api/dashboard``: the console's live figures per model, from /metrics' registry."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Query, Request

from server.auth import check_api_key
from server.errors import error_responses

router = APIRouter()


@router.get("/api/dashboard", dependencies=[Depends(check_api_key)], responses=error_responses(401))
async def dashboard(request: Request,
                    window_s: float = Query(300.0, gt=0, le=3600,
                                            description="Seconds of history the figures cover")
                    ) -> dict[str, Any]:
    """TTFT p50/p95, decode tok/s, errors, in-flight and queued requests per model and
    operation over the last ``window_s`` seconds, energy per meter source and J/token.

    ``metrics`` is false when the server runs with ``--no-metrics`` (no figures then);
    ``traces`` says whether the trace file behind ``/api/requests`` is on.
    """
    state = request.app.state
    window = state.metrics_window
    body: dict[str, Any] = window.summary(window_s) if window is not None else \
        {"window_s": 0.0, "models": [], "energy": {"joules": {}, "joules_per_output_token": None}}
    meter = state.telemetry.energy_meter
    body.update({
        "metrics": window is not None,
        "traces": state.telemetry.settings.traces_path is not None,
        "capture_content": state.settings.capture_content,
        "energy_meter": meter.source if meter is not None else None,
    })
    return body
