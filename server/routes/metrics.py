"""``GET /metrics``: Prometheus text exposition of the telemetry metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

router = APIRouter()


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    body, content_type = request.app.state.telemetry.metrics_response()
    return Response(content=body, media_type=content_type)
