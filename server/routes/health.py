"""``GET /health``: 200 when the default model is loaded and serving, 503 while loading."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

router = APIRouter()


@router.get("/health", responses={503: {"description": "The default model is loading (with Retry-After) "
                                                     "or failed to load"}})
async def health(request: Request) -> JSONResponse:
    state = request.app.state
    registry = state.registry
    if state.load_error is not None:
        return JSONResponse({"status": "error", "error": state.load_error}, status_code=503)
    default = registry.default_id
    if default is not None and not registry.is_loaded(default):
        return JSONResponse({"status": "loading", "model": default}, status_code=503,
                            headers={"Retry-After": "1"})
    models = {lm.spec.id: {"active": lm.engine.active, "queued": lm.engine.queue_depth,
                           "slots": lm.engine.info.n_parallel} for lm in registry.loaded()}
    return JSONResponse({"status": "ok", "models": models})
