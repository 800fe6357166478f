"""``/openapi.json`` describes what the server really does: API-key schemes and its error statuses."""

from __future__ import annotations

import json

import httpx

from tests.conftest import chat_body

GENERATION_STATUSES = {"200", "400", "401", "404", "413", "429", "503"}


def test_openapi_declares_api_keys_and_real_errors(make_server) -> None:  # type: ignore[no-untyped-def]
    srv = make_server(api_key=["k1"], parallel=1, ctx_size=512, max_body_bytes=4096)
    with srv.client() as c:
        schema = c.get("/openapi.json").json()
        assert c.get("/docs").status_code == 200
        rejected = c.post("/v1/chat/completions", json=chat_body("hi"))
        key = {"Authorization": "Bearer k1"}
        too_big = c.post("/v1/chat/completions", json=chat_body("x" * 10_000), headers=key)

    schemes = schema["components"]["securitySchemes"]
    assert schemes["bearer"] == {"type": "http", "scheme": "bearer", "description": schemes["bearer"]["description"]}
    assert schemes["api-key"]["in"] == "header" and schemes["api-key"]["name"] == "api-key"

    paths = schema["paths"]
    for path in ("/v1/chat/completions", "/v1/completions"):
        op = paths[path]["post"]
        assert {"bearer": []} in op["security"]
        assert set(op["responses"]) == GENERATION_STATUSES, op["responses"].keys()
    assert set(paths["/v1/models"]["get"]["responses"]) == {"200", "401"}
    assert "security" not in paths["/health"]["get"]  # probes need no key
    assert '"422"' not in json.dumps(schema) and "HTTPValidationError" not in schema["components"]["schemas"]

    # The documented error body is the one the server sends, whatever the status.
    ref = paths["/v1/chat/completions"]["post"]["responses"]["401"]["content"]["application/json"]["schema"]["$ref"]
    body_schema = schema["components"]["schemas"][ref.rsplit("/", 1)[1]]
    detail_ref = body_schema["properties"]["error"]["$ref"]
    detail = schema["components"]["schemas"][detail_ref.rsplit("/", 1)[1]]
    for resp, status in ((rejected, 401), (too_big, 413)):
        assert resp.status_code == status
        body = resp.json()
        assert set(body) == set(body_schema["properties"]) == set(body_schema["required"])
        assert set(body["error"]) == set(detail["properties"])
        assert set(detail["required"]) <= set(body["error"])


def test_docs_try_it_out_sends_the_bearer_key(make_server) -> None:  # type: ignore[no-untyped-def]
    """What Swagger UI sends after "Authorize" with the declared bearer scheme."""
    srv = make_server(api_key=["k1"], parallel=1, ctx_size=512)
    scheme = httpx.get(srv.base_url + "/openapi.json").json()["components"]["securitySchemes"]["bearer"]
    header = {"Authorization": f"{scheme['scheme'].capitalize()} k1"}
    assert httpx.get(srv.base_url + "/v1/models", headers=header).status_code == 200
