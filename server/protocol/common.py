"""Shapes shared by chat and text completions."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from server.policy.extension import EdgeVLMExtension


class StreamOptions(BaseModel):
    include_usage: bool = False


class JSONSchemaFormat(BaseModel):
    name: str = "response"
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None
    description: str | None = None
    model_config = ConfigDict(populate_by_name=True)


class ResponseFormat(BaseModel):
    type: Literal["text", "json_object", "json_schema"] = "text"
    json_schema: JSONSchemaFormat | None = None


class SamplingFields(BaseModel):
    """OpenAI sampling parameters plus the llama.cpp extras edgevlm accepts.

    Unknown fields are ignored: newer OpenAI clients send parameters this server has
    never heard of (``store``, ``metadata``, ...). Known ones it cannot honour are refused
    in ``server.generation.check_unsupported``; the ``edgevlm`` extension is strict.
    """

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = 1
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    logprobs: bool | int | None = None
    user: str | None = None
    # llama.cpp-style extensions
    top_k: int = Field(40, ge=0)
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    repeat_penalty: float = Field(1.0, gt=0.0)
    ignore_eos: bool = False
    edgevlm: EdgeVLMExtension | None = Field(
        None, description="edgevlm's per-request speed/accuracy controls (profile, image "
                          "token budget, pruning, TTFT budget, long-chat truncation).")

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> str | list[str] | None:
        if isinstance(v, list) and len(v) > 4:
            raise ValueError("at most 4 stop sequences are allowed")
        return v

    def stop_list(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


# Left out of each streamed chunk: the stream adds ``timings`` to the last chunk and
# ``usage`` to its own final one, so per-token chunks stay as small as OpenAI's.
NOT_IN_CHUNKS = frozenset({"usage", "system_fingerprint", "timings"})


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None
