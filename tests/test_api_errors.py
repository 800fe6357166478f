"""Every bad request gets an OpenAI-shaped error with the right status, and the server keeps serving."""

from __future__ import annotations

import base64
import io

import httpx
from PIL import Image

from tests.conftest import chat_body


def assert_error(resp: httpx.Response, status: int, code: str | None = None,
                 param: str | None = None) -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["message"]
    if code is not None:
        assert err["code"] == code, err
    if param is not None:
        assert err["param"] == param, err
    return err


def test_malformed_json_is_400(server) -> None:  # type: ignore[no-untyped-def]
    with server.client() as c:
        r = c.post("/v1/chat/completions", content=b'{"messages": [', headers={"content-type": "application/json"})
        assert_error(r, 400, "invalid_json")


def test_schema_violations_are_400_not_422(server) -> None:  # type: ignore[no-untyped-def]
    with server.client() as c:
        assert_error(c.post("/v1/chat/completions", json=chat_body("hi", temperature=5)), 400, param="temperature")
        assert_error(c.post("/v1/chat/completions", json={"model": "x"}), 400, param="messages")
        assert_error(c.post("/v1/chat/completions", json=chat_body("hi", max_tokens=0)), 400, param="max_tokens")
        bad_role = {"messages": [{"role": "robot", "content": "hi"}]}
        assert_error(c.post("/v1/chat/completions", json=bad_role), 400)


def test_unknown_model_is_404(server) -> None:  # type: ignore[no-untyped-def]
    with server.client() as c:
        err = assert_error(c.post("/v1/chat/completions", json=chat_body("hi", model="no-such-model")),
                           404, "model_not_found")
        assert "no-such-model" in err["message"]


def test_unsupported_values_are_400(server) -> None:  # type: ignore[no-untyped-def]
    with server.client() as c:
        assert_error(c.post("/v1/chat/completions", json=chat_body("hi", n=2)), 400, "unsupported_value", "n")
        assert_error(c.post("/v1/chat/completions", json=chat_body("hi", logprobs=True)), 400, param="logprobs")
        assert_error(c.post("/v1/completions", json={"prompt": ["a", "b"]}), 400, param="prompt")
        schema_fmt = {"type": "json_schema", "json_schema": {"name": "x"}}
        assert_error(c.post("/v1/chat/completions", json=chat_body("hi", response_format=schema_fmt)),
                     400, param="response_format")
        assert_error(c.post("/v1/chat/completions", json=chat_body("hi", edgevlm={"profile": "turbo"})),
                     400, "invalid_value")
        assert_error(c.post("/v1/chat/completions", json=chat_body("hi", edgevlm={"bogus": 1})), 400)


def test_image_to_text_only_model_is_400(server) -> None:  # type: ignore[no-untyped-def]
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(buf, "PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    body = {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": {"url": url}}]}]}
    with server.client() as c:
        err = assert_error(c.post("/v1/chat/completions", json=body), 400, "model_not_multimodal")
        assert "vision projector" in err["message"]


def test_prompt_longer_than_context_is_400(make_server) -> None:  # type: ignore[no-untyped-def]
    srv = make_server(ctx_size=256)
    with srv.client() as c:
        err = assert_error(c.post("/v1/chat/completions", json=chat_body("word " * 400)),
                           400, "context_length_exceeded")
        assert "256" in err["message"]
        # Still serving.
        assert c.post("/v1/chat/completions", json=chat_body("hi", max_tokens=2)).status_code == 200


def test_body_over_limit_is_413(make_server) -> None:  # type: ignore[no-untyped-def]
    srv = make_server(max_body_bytes=4096)
    with srv.client() as c:
        assert_error(c.post("/v1/chat/completions", json=chat_body("x" * 10_000)), 413, "request_too_large")

        def chunks():  # no Content-Length: the cap must hold while streaming the body
            yield b'{"messages": [{"role": "user", "content": "'
            for _ in range(20):
                yield b"y" * 1000
            yield b'"}]}'

        assert_error(c.post("/v1/chat/completions", content=chunks(),
                            headers={"content-type": "application/json"}), 413)
        assert c.post("/v1/chat/completions", json=chat_body("hi", max_tokens=2)).status_code == 200


def test_api_keys(make_server) -> None:  # type: ignore[no-untyped-def]
    srv = make_server(api_key=["k1", "k2"])
    with srv.client() as c:
        assert_error(c.get("/v1/models"), 401, "invalid_api_key")
        assert_error(c.get("/v1/models", headers={"Authorization": "Bearer wrong"}), 401)
        assert_error(c.post("/v1/chat/completions", json=chat_body("hi")), 401)
        assert c.get("/v1/models", headers={"Authorization": "Bearer k2"}).status_code == 200
        ok = c.post("/v1/chat/completions", json=chat_body("hi", max_tokens=2),
                    headers={"Authorization": "Bearer k1"})
        assert ok.status_code == 200
        assert c.get("/health").status_code == 200  # probes need no key


def test_non_ascii_api_key_is_401_not_500(make_server) -> None:  # type: ignore[no-untyped-def]
    srv = make_server(api_key=["k1", "clé"])
    with srv.client() as c:
        for header in ("Authorization", "api-key"):
            prefix = b"Bearer " if header == "Authorization" else b""
            wrong = c.get("/v1/models", headers={header: prefix + "ключ".encode()})
            assert_error(wrong, 401, "invalid_api_key")
            assert_error(c.get("/v1/models", headers={header: prefix + "k1\xe9".encode("latin-1")}), 401)
            # The operator's non-ASCII key matches the UTF-8 bytes a client sends for it.
            assert c.get("/v1/models", headers={header: prefix + "clé".encode()}).status_code == 200
