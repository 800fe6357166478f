"""``POST /v1/completions`` (legacy text completions) shapes."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from server.protocol.common import SamplingFields, Usage


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] = Field(...)
    max_tokens: int | None = Field(16, ge=1)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: str | None
    logprobs: None = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None
    timings: dict[str, Any] | None = None
