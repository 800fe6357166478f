"""Long chats: 400 by default, oldest turns dropped when the client or operator opts in."""

from __future__ import annotations

from typing import Any

from tests.test_api_errors import assert_error


def long_chat() -> list[dict[str, Any]]:
    msgs: list[dict[str, Any]] = [{"role": "system", "content": "You answer in one word."}]
    for i in range(6):
        msgs.append({"role": "user", "content": f"Question {i}: " + "tell me more " * 15})
        msgs.append({"role": "assistant", "content": "Answer " * 10})
    msgs.append({"role": "user", "content": "Final question: what colour is the sky?"})
    return msgs


def test_long_chat_is_400_without_opt_in_and_truncated_with_it(make_server) -> None:  # type: ignore[no-untyped-def]
    srv = make_server(ctx_size=256)
    body = {"messages": long_chat(), "max_tokens": 8, "temperature": 0}
    with srv.client() as c:
        assert_error(c.post("/v1/chat/completions", json=body), 400, "context_length_exceeded")
        r = c.post("/v1/chat/completions", json={**body, "edgevlm": {"truncate": True}})
        assert r.status_code == 200, r.text
        data = r.json()
        assert data["timings"]["dropped_tokens"] > 0
        assert data["usage"]["prompt_tokens"] < 256
        assert data["timings"]["middleware"]["truncate.dropped_tokens"] == data["timings"]["dropped_tokens"]


def test_operator_can_turn_truncation_on_for_everyone(make_server) -> None:  # type: ignore[no-untyped-def]
    srv = make_server(ctx_size=256, truncate_prompts=True, capture_content=True)
    body = {"messages": long_chat(), "max_tokens": 4, "temperature": 0}
    with srv.client() as c:
        r = c.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        assert r.json()["timings"]["dropped_tokens"] > 0
        # ... and a client can still ask for the strict behaviour.
        strict = c.post("/v1/chat/completions", json={**body, "edgevlm": {"truncate": False}})
        assert_error(strict, 400, "context_length_exceeded")
