"""Repetition penalties through the official ``openai`` client against a live server."""

from __future__ import annotations

import re
from typing import Any

import openai
import pytest

MODEL = "smollm2-135m-instruct-q4_1"
# Unpenalised at temperature 0 the default model lists "White" and "Silver" twice each.
REPEATING = [{"role": "user", "content": "List some colors."}]


@pytest.fixture
def client(server):  # type: ignore[no-untyped-def]
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=120)


def repeated_items(text: str) -> int:
    """How many bullet items repeat an earlier one."""
    items = re.findall(r"\*\s*([A-Za-z]+)", text)
    return len(items) - len(set(items))


def answer(client: openai.OpenAI, stream: bool, **kw: Any) -> str:
    args: dict[str, Any] = dict(model=MODEL, messages=REPEATING, temperature=0, max_tokens=40, **kw)
    if not stream:
        return client.chat.completions.create(**args).choices[0].message.content or ""
    return "".join(c.choices[0].delta.content or ""
                   for c in client.chat.completions.create(stream=True, **args) if c.choices)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("penalty", [
    {"presence_penalty": 2.0},
    {"frequency_penalty": 2.0},
    {"extra_body": {"repeat_penalty": 1.3}},  # llama.cpp's own; not an OpenAI parameter
], ids=["presence", "frequency", "repeat"])
def test_penalty_reduces_repetition(client: openai.OpenAI, penalty: dict[str, Any], stream: bool) -> None:
    plain = answer(client, stream)
    penalised = answer(client, stream, **penalty)
    assert repeated_items(plain) >= 1, plain  # the prompt does repeat without a penalty
    assert repeated_items(penalised) < repeated_items(plain), (plain, penalised)
    assert penalised == answer(client, not stream, **penalty)  # streaming agrees with a whole answer
