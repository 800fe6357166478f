"""``GET /api/requests`` and ``GET /api/requests/{trace_id}``: recent requests from the
trace file, for the console's table and its span view."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Path, Query, Request
from starlette.concurrency import run_in_threadpool

from server.auth import check_api_key
from server.errors import APIError, ErrorBody, error_responses
from telemetry.trace_store import recent_requests, request_detail

router = APIRouter()

_RESPONSES = {**error_responses(401), 404: {
    "model": ErrorBody, "description": "The trace file is off, or the request is not in it (yet)"}}


def _trace_file(request: Request) -> str:
    path = request.app.state.telemetry.settings.traces_path
    if path is None:
        raise APIError(404, "The trace file is off (--traces none), so there are no recent requests "
                       "to show; start the server with --traces PATH.", code="traces_off")
    return path


@router.get("/api/requests", dependencies=[Depends(check_api_key)], responses=_RESPONSES)
async def requests(request: Request, limit: int = Query(50, ge=1, le=500)) -> dict[str, Any]:
    """The newest request spans in the trace file, newest first (spans reach the file
    within ``--traces-flush-ms``)."""
    rows = await run_in_threadpool(recent_requests, _trace_file(request), limit)
    return {"data": rows}


@router.get("/api/requests/{trace_id}", dependencies=[Depends(check_api_key)],
            responses=_RESPONSES)
async def request_span(request: Request,
                       trace_id: str = Path(pattern="^[0-9a-f]{32}$",
                                            description="The trace id from the response's traceparent")
                       ) -> dict[str, Any]:
    """One request's span: attributes, events and its phase spans (image encode, queue,
    prefill, decode). Prompt and answer text only with ``--capture-content``."""
    detail = await run_in_threadpool(request_detail, _trace_file(request), trace_id,
                                     request.app.state.settings.capture_content)
    if detail is None:
        raise APIError(404, f"No request with trace id {trace_id} in the trace file (yet).",
                       param="trace_id", code="not_found")
    return detail
