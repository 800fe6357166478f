"""Pruning policy: which projector rows to keep for this request, or why not to prune.

Precedence: ``edgevlm.prune`` in the request > the profile > a TTFT budget (which may
only lower the keep share, and is not asked for images whose detail the client chose). Pruning is refused, with a reason the response and the
span carry, when the model's image attention is not known to be causal: models like
Gemma 3 attend bidirectionally inside an image block and were trained on the full
fixed token grid, and for an unknown model we cannot tell. A refused decision keeps
every row (``method == "none"``). M-RoPE models (Qwen2-VL) are causal and may be
pruned: the engine prefills kept rows at their original (t, y, x) positions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from models.reduce import keep_count
from server.policy.extension import EdgeVLMExtension, ProfileName
from server.policy.profiles import DEFAULT_PROFILES, ProfileSet

__all__ = ["DEFAULT_TTFT_PRUNE_METHOD", "PruneDecision", "decide_prune"]

# Method used when only the TTFT budget asks for pruning (the profile prunes nothing):
# DivPrune-style diversity keeps the most information per kept row.
DEFAULT_TTFT_PRUNE_METHOD = "diverse"


@dataclass(frozen=True)
class PruneDecision:
    """What to prune. ``keep`` is a ratio (float) or count (int) as requested;
    ``cap_ratio`` is an extra upper bound from the TTFT budget."""

    method: str  # none | uniform | merge | diverse | relevant
    keep: float | int = 1.0
    source: str = "default"  # request | profile | ttft_budget | default
    reason: str = ""
    refused_reason: str | None = None
    cap_ratio: float | None = None

    @property
    def active(self) -> bool:
        return self.method != "none"

    def keep_for(self, n_tokens: int) -> int:
        """Rows to keep out of ``n_tokens`` encoded ones."""
        if not self.active:
            return n_tokens
        k = keep_count(n_tokens, self.keep)
        if self.cap_ratio is not None:
            k = min(k, keep_count(n_tokens, self.cap_ratio))
        return k

    def keep_for_parts(self, sizes: list[int]) -> list[int]:
        """Rows to keep of each part of one image (zoom's overview + tiles), exactly ``keep_for(sum)``.

        The image's count is decided once over all its parts, as for an image sent
        whole, then shared in proportion to the parts' sizes (largest remainder, ties
        to the earlier part). Every part keeps at least one row, so a part is never
        sent as an empty image; only a keep below one row per part exceeds the count.
        """
        if any(n < 1 for n in sizes):
            raise ValueError(f"every part needs at least one token, got {sizes}")
        total = sum(sizes)
        k = max(self.keep_for(total), len(sizes))
        if k >= total:
            return list(sizes)
        spare = [n - 1 for n in sizes]  # rows above each part's one guaranteed row
        extra = k - len(sizes)
        share = [extra * s / max(1, sum(spare)) for s in spare]
        out = [int(x) for x in share]
        order = sorted(range(len(sizes)), key=lambda i: (-(share[i] - out[i]), i))
        for i in order[:extra - sum(out)]:
            out[i] += 1
        return [1 + o for o in out]

    def attributes(self) -> dict[str, Any]:
        out: dict[str, Any] = {"prune_method": self.method, "prune_source": self.source, "prune_reason": self.reason}
        if self.active:
            out["prune_keep"] = self.keep
        if self.cap_ratio is not None:
            out["prune_cap_ratio"] = self.cap_ratio
        if self.refused_reason:
            out["prune_refused"] = self.refused_reason
        return out


def decide_prune(
    *,
    extension: EdgeVLMExtension | None = None,
    profiles: ProfileSet = DEFAULT_PROFILES,
    server_profile: ProfileName | None = None,
    ttft_keep: float | None = None,
    causal_image_attention: bool | None = None,
    relevance_available: bool = True,
) -> PruneDecision:
    """Decide pruning for one request.

    ``ttft_keep`` is the keep ratio ``budget.plan_for_budget`` needs (``None`` or 1.0:
    none needed); it only lowers a profile's keep and never overrides an explicit
    request. ``causal_image_attention`` is the model's flag: ``True`` allows pruning,
    ``False`` (bidirectional image attention) or ``None`` (unknown) refuse it.
    ``relevance_available`` is False without CLIP: a profile's ``relevant`` then
    falls back to ``diverse`` (a request for it is refused before, by the route).
    """
    ext = extension or EdgeVLMExtension()
    name = ext.profile or server_profile or profiles.default
    prof = profiles.get(name)

    if ext.prune is not None:
        method = ext.prune.method
        keep: float | int = ext.prune.keep if ext.prune.keep is not None else prof.prune_keep
        source, reason = "request", f"edgevlm.prune method={method} keep={keep}"
        cap = None
    else:
        method, keep = prof.prune_method, prof.prune_keep
        source, reason = "profile", f"profile {name}: method={method} keep={keep}"
        cap = None
        if ttft_keep is not None and ttft_keep < 1.0:
            if not 0.0 < ttft_keep <= 1.0:
                raise ValueError(f"ttft_keep must be in (0, 1], got {ttft_keep}")
            if method == "none":
                method, keep, source = DEFAULT_TTFT_PRUNE_METHOD, ttft_keep, "ttft_budget"
                reason += f"; TTFT budget needs keep={ttft_keep:.3g} ({method})"
            elif isinstance(keep, float) and ttft_keep < keep:
                keep, source = ttft_keep, "ttft_budget"
                reason += f"; lowered to keep={ttft_keep:.3g} by the TTFT budget"
            elif isinstance(keep, int):
                cap, source = ttft_keep, "ttft_budget"
                reason += f"; capped at {ttft_keep:.3g} of rows by the TTFT budget"

    if method == "relevant" and not relevance_available:
        method = "diverse"
        reason += "; CLIP not configured: relevant -> diverse"
    if method == "none":
        return PruneDecision("none", 1.0, source, reason)
    if causal_image_attention is not True:
        why = (
            "model uses non-causal (bidirectional) attention over image tokens; pruning would change what every kept token sees"
            if causal_image_attention is False
            else "model's image attention is unknown; pruning is only enabled for models known to be causal"
        )
        return PruneDecision("none", 1.0, source, reason, refused_reason=why)
    return PruneDecision(method, keep, source, reason, cap_ratio=cap)
