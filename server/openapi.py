"""``/openapi.json`` as the server really behaves.

FastAPI documents a 422 validation error on every route with a body; this server
answers those as OpenAI-style 400s (``server.errors``), so the 422s and their schemas
are dropped. The statuses a route does send are declared on the route itself, and the
API-key schemes come from ``server.auth``'s security dependencies.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI


def install_openapi(app: FastAPI) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = FastAPI.openapi(app)  # builds and caches app.openapi_schema
            for path in schema.get("paths", {}).values():
                for operation in path.values():
                    operation.get("responses", {}).pop("422", None)
            schemas = schema.get("components", {}).get("schemas", {})
            for name in ("HTTPValidationError", "ValidationError"):
                schemas.pop(name, None)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
