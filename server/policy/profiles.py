"""Server profiles: named speed/accuracy presets an operator configures once.

A profile says how many image tokens an image may cost (relative to what the model
can take, so one preset fits a 64-token SmolVLM tile and a 1280-token Qwen2-VL image)
and how much of the projector output to prune. Defaults:

=========  ===============  ==========  =====  =============
profile    image budget     prune       keep   content-aware
=========  ===============  ==========  =====  =============
quality    model max        none        1.0    no
balanced   max / 2, >= 64   diverse     0.75   yes
fast       max / 6, >= 64   diverse     0.5    yes
=========  ===============  ==========  =====  =============

``fast`` cuts resolution tokens 6x on a ~1000-token dynamic projector and then keeps
half of those, ~12x fewer prefilled image tokens than ``quality``. Diversity pruning
(DivPrune) is the default method because it is the best training-free method that
needs only the embedding matrix. ``detail: "low"`` costs a small fixed budget (64,
one SmolVLM tile / MiniCPM-V slice) and ``detail: "high"`` the model maximum.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, field_validator

from server.policy.extension import ProfileName, PruneMethodName, ResolutionMode, check_keep

__all__ = ["DEFAULT_PROFILES", "Profile", "ProfileSet"]


class Profile(BaseModel):
    """One preset. ``image_budget`` float in (0, 1] = fraction of model max; int = tokens."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    image_budget: StrictInt | StrictFloat = 1.0
    min_image_tokens: int = Field(default=64, ge=1)
    prune_method: PruneMethodName = "none"
    prune_keep: StrictInt | StrictFloat = 1.0
    content_aware: bool = False  # let image/prompt statistics scale the budget
    # "zoom" spends the budget on the tiles CLIP finds relevant; without CLIP the
    # server falls back to resizing and says so in the span.
    resolution: ResolutionMode = "resize"

    @field_validator("image_budget", "prune_keep")
    @classmethod
    def _ratio_or_count(cls, v: float | int) -> float | int:
        out = check_keep(v)
        assert out is not None
        return out

    def image_tokens(self, model_max_tokens: int) -> int:
        """This profile's per-image token budget for a model that takes at most ``model_max_tokens``."""
        if model_max_tokens < 1:
            raise ValueError("model_max_tokens must be >= 1")
        if isinstance(self.image_budget, int):
            tokens = self.image_budget
        else:
            tokens = int(round(model_max_tokens * self.image_budget))
        return max(1, min(model_max_tokens, max(tokens, self.min_image_tokens)))


class ProfileSet(BaseModel):
    """The three presets plus the ``detail`` budgets and the server's default profile.

    Build from config with ``ProfileSet.model_validate(dict)``; unknown keys are an error.
    ``default`` is ``quality`` so a plain OpenAI client gets full accuracy unless the
    operator (or the request) opts into trading it.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    quality: Profile = Profile()
    balanced: Profile = Profile(image_budget=0.5, prune_method="diverse", prune_keep=0.75, content_aware=True)
    fast: Profile = Profile(image_budget=1 / 6, prune_method="diverse", prune_keep=0.5, content_aware=True)
    detail_low_tokens: int = Field(default=64, ge=1)
    default: ProfileName = "quality"

    def get(self, name: ProfileName | None) -> Profile:
        """The named profile, or the default one when ``name`` is ``None``."""
        key = name or self.default
        if key not in ("quality", "balanced", "fast"):
            raise KeyError(f"unknown profile {key!r}")
        return getattr(self, key)


DEFAULT_PROFILES = ProfileSet()
