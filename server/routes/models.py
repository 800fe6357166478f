"""``GET /v1/models``; ``POST /api/models/{model_id}/reload``."""

from __future__ import annotations

import logging
import os

from fastapi import APIRouter, Depends, Request

from models.registry import ModelSpec, Registry
from server.auth import check_api_key
from server.errors import APIError, error_responses
from server.protocol.models import ModelCard, ModelList

log = logging.getLogger("edgevlm.models")

router = APIRouter()


def model_card(registry: Registry, spec: ModelSpec) -> ModelCard:
    """One model's row of ``/v1/models``: the OpenAI fields plus what edgevlm knows of it."""
    try:
        created = int(os.path.getmtime(spec.path))
    except OSError:
        created = 0
    return ModelCard(id=spec.id, created=created, owned_by=spec.owned_by, meta={
        "vision": spec.mmproj is not None, "loaded": registry.is_loaded(spec.id),
        "default": spec.id == registry.default_id, "ctx_size": spec.ctx_size,
        **({"failed": failure} if (failure := registry.failure(spec.id)) else {}),
    })


@router.get("/v1/models", response_model=ModelList, dependencies=[Depends(check_api_key)],
            responses=error_responses(401))
async def list_models(request: Request) -> ModelList:
    registry = request.app.state.registry
    return ModelList(data=[model_card(registry, spec) for spec in registry.list()])


@router.post("/api/models/{model_id}/reload", response_model=ModelCard, dependencies=[Depends(check_api_key)],
             responses=error_responses(401, 404, 503))
async def reload_model(model_id: str, request: Request) -> ModelCard:
    """Unload the model and load it again; answers once it is loaded.

    A model whose runner crashed too often stays failed until this (or a restart of the
    server); so does a default model whose load failed at start-up. Requests still on
    the model end as they would on an unload.
    """
    state = request.app.state
    registry: Registry = state.registry
    spec = registry.resolve(model_id)  # a 404 before anything is unloaded
    try:
        await registry.reload(spec.id)
    except Exception as exc:
        log.warning("reloading model %s failed: %s", spec.id, exc)
        raise APIError(503, f"reloading model {spec.id} failed: {exc}", code="model_load_failed") from exc
    if spec.id == registry.default_id:
        state.load_error = None  # /health reported the start-up load's failure until now
    log.info("model %s reloaded", spec.id)
    return model_card(registry, spec)
