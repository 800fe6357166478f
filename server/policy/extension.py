"""The ``edgevlm`` request extension: per-request speed/accuracy knobs.

Clients send it as an extra body field next to the OpenAI parameters
(``extra_body={"edgevlm": {...}}`` in the ``openai`` client). Every shape is strict
(``extra="forbid"``, no bool-as-int) so a typo is a validation error the route turns
into HTTP 400 instead of a silently ignored setting.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, field_validator

__all__ = [
    "EdgeVLMExtension",
    "ProfileName",
    "PruneMethodName",
    "ResolutionMode",
    "PruneRequest",
    "check_keep",
    "parse_extension",
]

ProfileName = Literal["quality", "balanced", "fast"]
PruneMethodName = Literal["uniform", "merge", "diverse", "relevant", "none"]
# resize: the budget spread over the whole image; zoom: over the tiles CLIP finds
# relevant to the prompt (needs CLIP configured).
ResolutionMode = Literal["resize", "zoom"]


def check_keep(value: float | int | None) -> float | int | None:
    """A keep value is a ratio in (0, 1] (float) or a row count >= 1 (int)."""
    if value is None:
        return None
    if isinstance(value, int):
        if value < 1:
            raise ValueError("keep count must be >= 1")
        return value
    if not math.isfinite(value) or not (0.0 < value <= 1.0):
        raise ValueError("keep ratio must be in (0, 1]")
    return value


class PruneRequest(BaseModel):
    """``{"method": "diverse", "keep": 0.5}``; ``keep`` omitted -> the profile's keep,
    ``method`` omitted -> ``diverse`` (the default method: asking for a ``keep`` alone
    should prune, not fail)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: PruneMethodName = "diverse"
    keep: StrictInt | StrictFloat | None = None

    @field_validator("keep")
    @classmethod
    def _keep(cls, v: float | int | None) -> float | int | None:
        return check_keep(v)


class EdgeVLMExtension(BaseModel):
    """Everything a request may ask of the middleware; all fields optional."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    profile: ProfileName | None = None
    max_image_tokens: StrictInt | None = Field(default=None, gt=0)
    resolution: ResolutionMode | None = None
    prune: PruneRequest | None = None
    ttft_budget_ms: StrictInt | StrictFloat | None = Field(default=None, gt=0)
    truncate: StrictBool | None = None
    # false: never draft for this request (speculative decoding, when the model has it on)
    speculative: StrictBool | None = None

    @field_validator("ttft_budget_ms")
    @classmethod
    def _finite(cls, v: float | None) -> float | None:
        if v is not None and not math.isfinite(v):
            raise ValueError("ttft_budget_ms must be finite")
        return None if v is None else float(v)


def parse_extension(raw: Any) -> EdgeVLMExtension | None:
    """Validate the raw ``edgevlm`` body field; ``None`` when absent.

    Raises ``pydantic.ValidationError`` on bad input (the route maps it to 400).
    """
    if raw is None:
        return None
    if isinstance(raw, EdgeVLMExtension):
        return raw
    return EdgeVLMExtension.model_validate(raw)
