"""OpenAI-shaped errors, defined once: ``{"error": {message, type, param, code}}``."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from models.engine import EngineError

log = logging.getLogger("edgevlm.errors")

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable",
}


_WHEN = {
    400: "Bad JSON or field value, unsupported parameter, bad image, prompt too long",
    401: "API keys are set and the request has none or a wrong one",
    404: "Unknown model id",
    409: "The server is busy (idle power can only be sampled when idle)",
    413: "Request body larger than --max-body-bytes",
    429: "The model's wait queue is full (retry after Retry-After seconds)",
    503: "The model is loading, failed to load, or was unloaded while the request waited",
}


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(BaseModel):
    """The one error shape every status uses (OpenAI's)."""

    error: ErrorDetail


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for a route: each status the route can answer, with the body."""
    return {status: {"model": ErrorBody, "description": _WHEN[status]} for status in statuses}


GENERATION_ERRORS = error_responses(400, 401, 404, 413, 429, 503)


class APIError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        detail = ErrorDetail(message=self.message, type=_TYPES.get(self.status, "server_error"),
                             param=self.param, code=self.code)
        return ErrorBody(error=detail).model_dump()

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def from_engine_error(exc: EngineError) -> APIError:
    headers = {"Retry-After": "1"} if exc.status == 429 else None
    param = "messages" if exc.code == "context_length_exceeded" else None
    return APIError(exc.status, str(exc), code=exc.code, param=param, headers=headers)


# Branch labels pydantic puts in an error's location when a value failed a union
# (``content: str | list[...]`` fails as ``content.str`` and ``content.list[...]``).
_UNION_LABELS = frozenset({"str", "int", "float", "bool", "dict", "list", "none"})


def _loc_param(loc: tuple[Any, ...]) -> str | None:
    """The dotted field path a client wrote (``messages.0.content.1.image_url.detail``).

    Union branch labels are dropped, and so is a tagged union's tag (``image_url`` in
    ``1.image_url.image_url``): neither is a key the client sent.
    """
    parts: list[str] = []
    for i, p in enumerate(loc):
        s = str(p)
        if (i == 0 and s == "body") or s in _UNION_LABELS or "[" in s:
            continue
        if isinstance(p, str) and i + 1 < len(loc) and loc[i + 1] == p and parts and parts[-1].isdigit():
            continue  # the tag of a tagged union ({"type": "image_url", "image_url": ...})
        parts.append(s)
    return ".".join(parts) or None


def _most_specific(errors: list[dict[str, Any]]) -> dict[str, Any]:
    """The error that got deepest into the body: for a union (``content`` is a string or
    a list of parts) it is the branch the client meant, not the first one tried."""
    return max(errors, key=lambda e: len((_loc_param(tuple(e.get("loc", ()))) or "").split(".")),
               default={})


def _validation_error(request: Request, errors: list[dict[str, Any]]) -> APIError:
    first = _most_specific(errors)
    if first.get("type") == "json_invalid":
        return APIError(400, "The request body is not valid JSON.", code="invalid_json")
    param = _loc_param(tuple(first.get("loc", ())))
    if param is None and first.get("type") in ("model_attributes_type", "dict_type", "model_type"):
        ctype = request.headers.get("content-type", "")
        if "json" not in ctype.lower():
            return APIError(400, "The request body must be JSON: send a JSON object with the header "
                                 f"'Content-Type: application/json' (got '{ctype or 'none'}').",
                            code="invalid_content_type")
        return APIError(400, "The request body must be a JSON object.", code="invalid_json")
    msg = str(first.get("msg", "invalid request")).removeprefix("Value error, ")
    text = f"Invalid value for '{param}': {msg}" if param else msg
    return APIError(400, text, param=param, code="invalid_value")


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(EngineError)
    async def _engine_error(_: Request, exc: EngineError) -> JSONResponse:
        return from_engine_error(exc).response()

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _validation_error(request, list(exc.errors())).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return APIError(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None)).response()

    @app.exception_handler(Exception)
    async def _unhandled(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return APIError(500, "internal server error", code="internal_error").response()
