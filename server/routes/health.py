"""``GET /health``: 200 when the default model is loaded and serving, 503 while loading."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from models.registry import LoadedModel

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
    models = {lm.spec.id: _model_row(lm) for lm in registry.loaded()}
    failed = {mid: row["failure"] for mid, row in models.items() if row.get("failure")}
    if default in failed:
        return JSONResponse({"status": "error", "error": f"model {default} failed: {failed[default]}",
                             "models": models}, status_code=503)
    return JSONResponse({"status": "degraded" if failed else "ok", "models": models})


def _model_row(lm: LoadedModel) -> dict[str, Any]:
    """Queue figures; in runner mode also the runner's pid, RSS, restarts, last exit and failure."""
    info = lm.engine.info
    row: dict[str, Any] = {"active": lm.engine.active, "queued": lm.engine.queue_depth,
                           "slots": info.n_parallel, "kv_layout": info.kv_layout, "ctx_per_request": info.n_ctx,
                           "stream_interval": info.stream_interval,
                           "attention": {None: "llama.cpp's choice", True: "flash", False: "plain"}[info.flash_attn]}
    if lm.runner is not None:
        row["runner"] = lm.runner.supervision()
        if lm.failure:
            row["failure"] = lm.failure
    return row
