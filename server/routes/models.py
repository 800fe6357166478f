"""``GET /v1/models``."""

from __future__ import annotations

import os

from fastapi import APIRouter, Depends, Request

from server.auth import check_api_key
from server.errors import error_responses
from server.protocol.models import ModelCard, ModelList

router = APIRouter()


@router.get("/v1/models", response_model=ModelList, dependencies=[Depends(check_api_key)],
            responses=error_responses(401))
async def list_models(request: Request) -> ModelList:
    registry = request.app.state.registry
    cards = []
    for spec in registry.list():
        try:
            created = int(os.path.getmtime(spec.path))
        except OSError:
            created = 0
        cards.append(ModelCard(id=spec.id, created=created, owned_by=spec.owned_by, meta={
            "vision": spec.mmproj is not None, "loaded": registry.is_loaded(spec.id),
            "default": spec.id == registry.default_id, "ctx_size": spec.ctx_size,
            **({"failed": failure} if (failure := registry.failure(spec.id)) else {}),
        }))
    return ModelList(data=cards)
