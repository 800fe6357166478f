"""``GET /metrics`` (Prometheus text) and ``POST /energy/idle-baseline``."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from server.auth import check_api_key
from server.errors import APIError, error_responses

router = APIRouter()


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    """Prometheus text exposition of the server's metrics."""
    # Queue depths are read now: a depth set when a request arrives or finishes goes
    # stale once the engine admits a waiting request, which would then show as queued.
    state = request.app.state
    waiting = {lm.spec.id: lm.engine.queue_depth for lm in state.registry.loaded()}
    for spec in state.registry.list():
        state.telemetry.set_queue_depth(spec.id, waiting.get(spec.id, 0))
    # Off the event loop: a runner's image-cache counters are a round trip to its process.
    body, content_type = await run_in_threadpool(state.telemetry.metrics_response)
    return Response(content=body, media_type=content_type)


@router.post("/energy/idle-baseline", dependencies=[Depends(check_api_key)],
             responses=error_responses(400, 401, 409, 413, 503))
async def idle_baseline(request: Request, seconds: float = Query(2.0, gt=0, le=60)) -> JSONResponse:
    """Re-sample idle power (e.g. after the room warmed up); refused while requests run."""
    state = request.app.state
    busy = [lm.spec.id for lm in state.registry.loaded() if lm.engine.busy]
    if busy:
        raise APIError(409, f"Models are serving requests ({', '.join(busy)}); sample idle power "
                       "when the server is idle.", code="server_busy")
    telemetry = state.telemetry
    watts = await asyncio.get_running_loop().run_in_executor(None, telemetry.sample_idle_power, seconds)
    meter = telemetry.energy_meter
    if watts is None or meter is None:
        raise APIError(503, "No energy meter is available on this device.", code="no_energy_meter")
    return JSONResponse({"idle_watts": watts, "source": meter.source, "seconds": seconds})
