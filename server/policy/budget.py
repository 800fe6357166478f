"""TTFT budget: predict time-to-first-token and pick image tokens / pruning to meet it.

TTFT on an edge CPU is, to first order, linear in work:

    ttft = queue_wait + overhead + encode_ms/token * image tokens encoded
                                 + prefill_ms/token * (text tokens + image tokens kept)

``CostModel`` keeps online (rolling-median) estimates of those rates per loaded model,
learned from every finished request (time spent loading the model is not one of them); ``plan_for_budget`` inverts the formula. Resolution is
lowered first (it saves encoder *and* prefill time, and plain downsampling is the
strongest cheap baseline); pruning (prefill only) is used once images are down to
their floor. Queue wait (requests ahead x mean service time) is subtracted from the
budget, so plans tighten as the queue grows.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from models.reduce import ProjectorGrid

__all__ = [
    "DEFAULT_ENCODE_MS_PER_TOKEN",
    "DEFAULT_OVERHEAD_MS",
    "DEFAULT_PREFILL_MS_PER_TOKEN",
    "DEFAULT_REQUEST_MS",
    "BudgetPlan",
    "CostEstimate",
    "CostModel",
    "ImagePlan",
    "ImageSpec",
    "plan_for_budget",
]

# Start-up guesses for a ~2B Q4 VLM on a 4-core laptop CPU, used until a warm-up
# measurement or real requests replace them (the first observations dominate).
DEFAULT_ENCODE_MS_PER_TOKEN = 8.0
DEFAULT_PREFILL_MS_PER_TOKEN = 4.0
DEFAULT_OVERHEAD_MS = 20.0
DEFAULT_REQUEST_MS = 1500.0  # one queued request's full service time (prefill + decode)
# Observations per rate the robust estimate is the median of (~15 requests of memory).
DEFAULT_WINDOW = 15
# Smallest per-image budget the planner lowers resolution to before it starts pruning
# (one SmolVLM tile; below this images stop being legible for most VLMs).
DEFAULT_FLOOR_TOKENS = 64
# Never keep fewer than this share of an image's rows to meet a budget.
DEFAULT_MIN_KEEP = 0.25


@dataclass(frozen=True)
class CostEstimate:
    """A consistent snapshot of a ``CostModel``'s rates (milliseconds)."""

    encode_ms_per_token: float
    prefill_ms_per_token: float
    overhead_ms: float
    request_ms: float
    observations: int = 0

    def queue_wait_ms(self, queue_depth: int) -> float:
        return max(0, queue_depth) * self.request_ms

    def predict_ttft_ms(
        self,
        text_tokens: int,
        image_tokens_each: Sequence[int] = (),
        queue_depth: int = 0,
        kept_tokens_each: Sequence[int] | None = None,
    ) -> float:
        """Predicted TTFT. ``image_tokens_each``: tokens encoded per image;
        ``kept_tokens_each``: tokens prefilled per image after pruning (default: all)."""
        encoded = sum(image_tokens_each)
        kept = encoded if kept_tokens_each is None else sum(kept_tokens_each)
        return (
            self.queue_wait_ms(queue_depth)
            + self.overhead_ms
            + self.encode_ms_per_token * encoded
            + self.prefill_ms_per_token * (text_tokens + kept)
        )


class CostModel:
    """Online per-model cost estimates; safe to share between request threads.

    Each rate is the median of its last ``window`` observations (a warm-up measurement
    counts as one). One slow request (a page-in, another process's burst) cannot swing
    it, while a lasting change (thermal throttling, other load) takes over once it fills
    half the window. With an even count the lower middle value is taken (slow outliers
    are far more common than fast ones), so a single slow request right after the
    warm-up is ignored too. Until a rate has been observed once, its start-up guess stands.
    """

    def __init__(
        self,
        encode_ms_per_token: float = DEFAULT_ENCODE_MS_PER_TOKEN,
        prefill_ms_per_token: float = DEFAULT_PREFILL_MS_PER_TOKEN,
        overhead_ms: float = DEFAULT_OVERHEAD_MS,
        request_ms: float = DEFAULT_REQUEST_MS,
        window: int = DEFAULT_WINDOW,
    ) -> None:
        if window < 1:
            raise ValueError("window must be >= 1")
        for v in (encode_ms_per_token, prefill_ms_per_token, overhead_ms, request_ms):
            if v < 0:
                raise ValueError("cost rates must be >= 0")
        self._lock = threading.Lock()
        self._est = CostEstimate(encode_ms_per_token, prefill_ms_per_token, overhead_ms, request_ms)
        self._seen: dict[str, deque[float]] = {k: deque(maxlen=window) for k in ("encode", "prefill", "overhead", "request")}

    @classmethod
    def from_warmup(
        cls,
        encode_ms: float,
        image_tokens: int,
        prefill_ms: float,
        prefill_tokens: int,
        overhead_ms: float = DEFAULT_OVERHEAD_MS,
        request_ms: float = DEFAULT_REQUEST_MS,
        window: int = DEFAULT_WINDOW,
    ) -> CostModel:
        """Start-up rates from one warm-up request's measured phases.

        A measured rate counts as one observation, so the first real request is
        weighed against it instead of replacing it.
        """
        cm = cls(
            encode_ms / image_tokens if image_tokens > 0 else DEFAULT_ENCODE_MS_PER_TOKEN,
            prefill_ms / prefill_tokens if prefill_tokens > 0 else DEFAULT_PREFILL_MS_PER_TOKEN,
            overhead_ms,
            request_ms,
            window,
        )
        if image_tokens > 0:
            cm._seen["encode"].append(cm._est.encode_ms_per_token)
        if prefill_tokens > 0:
            cm._seen["prefill"].append(cm._est.prefill_ms_per_token)
        return cm

    def _robust(self, key: str, new: float) -> float:
        seen = self._seen[key]
        seen.append(new)
        return sorted(seen)[(len(seen) - 1) // 2]

    def observe(
        self,
        encode_ms: float,
        image_tokens: int,
        prefill_ms: float,
        prefill_tokens: int,
        *,
        overhead_ms: float | None = None,
        request_ms: float | None = None,
    ) -> None:
        """Learn from one finished request's measured phases.

        Pass ``image_tokens=0`` when no image was encoded (text only, or embedding
        cache hit) so the encode rate is left alone.
        """
        with self._lock:
            e = self._est
            enc, pre, ovh, req = e.encode_ms_per_token, e.prefill_ms_per_token, e.overhead_ms, e.request_ms
            if image_tokens > 0 and encode_ms >= 0:
                enc = self._robust("encode", encode_ms / image_tokens)
            if prefill_tokens > 0 and prefill_ms >= 0:
                pre = self._robust("prefill", prefill_ms / prefill_tokens)
            if overhead_ms is not None and overhead_ms >= 0:
                ovh = self._robust("overhead", overhead_ms)
            if request_ms is not None and request_ms >= 0:
                req = self._robust("request", request_ms)
            self._est = CostEstimate(enc, pre, ovh, req, e.observations + 1)

    def snapshot(self) -> CostEstimate:
        with self._lock:
            return self._est


@dataclass(frozen=True)
class ImageSpec:
    """One image of the request as the planner sees it: the most tokens it may cost.

    ``locked``: the client chose this image's detail (``detail`` low/high or
    ``edgevlm.max_image_tokens``); the plan keeps it as chosen, neither lowered nor pruned.
    """

    max_tokens: int
    grid: ProjectorGrid | None = None
    locked: bool = False

    @property
    def fixed(self) -> bool:
        return self.grid is not None and self.grid.fixed_tokens is not None

    @property
    def ceiling(self) -> int:
        if self.grid is not None and self.grid.fixed_tokens is not None:
            return self.grid.fixed_tokens
        return max(1, self.max_tokens)


@dataclass(frozen=True)
class ImagePlan:
    """Budget for one image: tokens to encode at (resolution) and rows to keep."""

    tokens: int
    keep_tokens: int

    @property
    def keep_ratio(self) -> float:
        return self.keep_tokens / self.tokens if self.tokens else 1.0


@dataclass(frozen=True)
class BudgetPlan:
    """Per-image budgets, the TTFT they predict and whether the budget is met."""

    images: tuple[ImagePlan, ...]
    predicted_ttft_ms: float
    budget_ms: float
    achievable: bool
    queue_wait_ms: float
    reason: str

    @property
    def keep_ratio(self) -> float:
        """One ratio for the pruning policy that keeps no image above its plan."""
        return min((im.keep_ratio for im in self.images), default=1.0)

    def attributes(self) -> dict[str, object]:
        return {
            "ttft_budget_ms": self.budget_ms,
            "ttft_predicted_ms": round(self.predicted_ttft_ms, 3),
            "ttft_achievable": self.achievable,
            "ttft_queue_wait_ms": round(self.queue_wait_ms, 3),
            "ttft_plan_tokens": [im.tokens for im in self.images],
            "ttft_plan_keep": [im.keep_tokens for im in self.images],
            "ttft_plan_reason": self.reason,
        }


def _scale_tokens(ceilings: list[int], floors: list[int], dynamic: list[bool], total: float) -> list[int]:
    """Largest uniform scale s with sum(max(floor, s * ceiling)) <= total (dynamic images)."""
    lo, hi = 0.0, 1.0
    for _ in range(40):
        mid = (lo + hi) / 2
        t = [max(f, int(mid * c)) if d else c for c, f, d in zip(ceilings, floors, dynamic)]
        if sum(t) <= total:
            lo = mid
        else:
            hi = mid
    return [max(f, int(lo * c)) if d else c for c, f, d in zip(ceilings, floors, dynamic)]


def plan_for_budget(
    budget_ms: float,
    text_tokens: int,
    images: Sequence[ImageSpec],
    queue_depth: int,
    est: CostEstimate,
    *,
    floor_tokens: int = DEFAULT_FLOOR_TOKENS,
    min_keep: float = DEFAULT_MIN_KEEP,
    allow_prune: bool = True,
) -> BudgetPlan:
    """Choose per-image token budgets and keep counts so predicted TTFT <= ``budget_ms``.

    Order of levers: full quality if it fits; else lower dynamic images' resolution
    uniformly (down to ``max(floor_tokens, grid.min_tokens)``); else prune every image
    down to ``min_keep`` (if ``allow_prune``). Locked images (the client's explicit
    choice) use neither lever: they cost what the client asked for. If even that misses,
    the cheapest plan is returned with ``achievable=False`` and its (over-budget)
    predicted TTFT.
    """
    if budget_ms <= 0:
        raise ValueError("budget_ms must be > 0")
    if not 0.0 < min_keep <= 1.0:
        raise ValueError("min_keep must be in (0, 1]")
    enc, pre = est.encode_ms_per_token, est.prefill_ms_per_token
    qwait = est.queue_wait_ms(queue_depth)
    base = qwait + est.overhead_ms + pre * text_tokens

    ceilings = [im.ceiling for im in images]
    locked = [im.locked for im in images]
    dynamic = [not im.fixed and not im.locked for im in images]
    floors = [
        c if not d else min(c, max(floor_tokens, (im.grid.min_tokens or 1) if im.grid else 1))
        for im, c, d in zip(images, ceilings, dynamic)
    ]

    def done(tokens: list[int], keep: list[int], reason: str) -> BudgetPlan:
        ttft = est.predict_ttft_ms(text_tokens, tokens, queue_depth, keep)
        ok = ttft <= budget_ms
        if not ok:
            reason += f"; budget {budget_ms:g} ms not achievable (minimum {ttft:.1f} ms)"
        plans = tuple(ImagePlan(t, k) for t, k in zip(tokens, keep))
        return BudgetPlan(plans, ttft, budget_ms, ok, qwait, reason)

    if not images:
        return done([], [], "no images")
    if base + (enc + pre) * sum(ceilings) <= budget_ms:
        return done(ceilings, ceilings, "full resolution fits the budget")

    # Stage 1: lower resolution (r = 1): enc + pre per image token.
    if any(dynamic) and enc + pre > 0:
        total = (budget_ms - base) / (enc + pre)
        tokens = _scale_tokens(ceilings, floors, dynamic, total)
        if sum(tokens) <= total:
            return done(tokens, tokens, f"resolution lowered to {sum(tokens)} of {sum(ceilings)} image tokens")
    tokens = floors
    if all(locked):
        return done(tokens, tokens, "images kept at the client's explicit detail")
    floor = "images at floor resolution" + (" (explicit ones as chosen)" if any(locked) else "")

    # Stage 2: prune unlocked images at the floor resolution: only prefill shrinks.
    prunable = sum(t for t, lk in zip(tokens, locked) if not lk)
    if not allow_prune or pre <= 0 or prunable == 0:
        return done(tokens, tokens, f"{floor}; pruning not allowed")
    room = budget_ms - base - enc * sum(tokens) - pre * (sum(tokens) - prunable)
    r = min(1.0, max(min_keep, room / (pre * prunable)))
    keep = [t if lk else max(1, int(r * t)) for t, lk in zip(tokens, locked)]
    return done(tokens, keep, f"{floor}, pruned to keep {r:.3g}")
