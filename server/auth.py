"""Optional API keys: ``Authorization: Bearer <key>`` (or ``api-key`` header).

The keys are read through FastAPI's security classes so ``/openapi.json`` declares
both schemes and ``/docs`` "Authorize" can send a key; checking stays here.
"""

from __future__ import annotations

import hmac

from fastapi import Request, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from server.errors import APIError

_BEARER = HTTPBearer(auto_error=False, scheme_name="bearer",
                     description="An API key from --api-key / --api-key-file (needed only when keys are set).")
_HEADER = APIKeyHeader(name="api-key", auto_error=False, scheme_name="api-key",
                       description="The same key in an api-key header (Azure OpenAI style).")


def check_api_key(request: Request,
                  bearer: HTTPAuthorizationCredentials | None = Security(_BEARER),
                  header: str | None = Security(_HEADER)) -> None:
    keys: set[str] = request.app.state.api_keys
    if not keys:
        return
    token = bearer.credentials if bearer is not None else (header or "").strip()
    # Compare bytes: ``compare_digest`` raises on non-ASCII str. Starlette decodes header
    # bytes as latin-1, so encoding back gives what was on the wire; keys are UTF-8 text.
    sent = token.encode("latin-1")
    if not token or not any(hmac.compare_digest(sent, k.encode("utf-8")) for k in keys):
        raise APIError(401, "Missing or incorrect API key. Send 'Authorization: Bearer <key>'.",
                       code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
