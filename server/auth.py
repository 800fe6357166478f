"""Optional API keys: ``Authorization: Bearer <key>`` (or ``api-key`` header)."""

from __future__ import annotations

import hmac

from fastapi import Request

from server.errors import APIError


def check_api_key(request: Request) -> None:
    keys: set[str] = request.app.state.api_keys
    if not keys:
        return
    header = request.headers.get("authorization", "")
    token = header[7:].strip() if header.lower().startswith("bearer ") else request.headers.get("api-key", "")
    # Compare bytes: ``compare_digest`` raises on non-ASCII str. Starlette decodes header
    # bytes as latin-1, so encoding back gives what was on the wire; keys are UTF-8 text.
    sent = token.encode("latin-1")
    if not token or not any(hmac.compare_digest(sent, k.encode("utf-8")) for k in keys):
        raise APIError(401, "Missing or incorrect API key. Send 'Authorization: Bearer <key>'.",
                       code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
