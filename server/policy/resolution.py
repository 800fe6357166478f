"""Resolution policy: how many tokens one image may cost for this request.

Precedence (first that applies wins; the TTFT budget then may only *lower* a budget
that came from the profile):

1. ``edgevlm.max_image_tokens`` in the request           -> source ``request``
2. OpenAI ``image_url.detail`` ``low`` / ``high``          -> source ``detail``
   (``auto`` or absent falls through)
3. the profile (``edgevlm.profile`` > server profile)      -> source ``profile``;
   content-aware profiles scale it by cheap image/prompt statistics
4. a TTFT budget's per-image tokens, when lower            -> source ``ttft_budget``

Explicit client choices (1, 2) are final: they state the accuracy the client needs,
so a latency budget does not silently override them. Everything is clamped to the
model's [min, max] tokens. ``source`` values match ``telemetry.record.ImageRecord``.
"""

from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
from PIL import Image

from server.policy.extension import EdgeVLMExtension, ProfileName
from server.policy.profiles import DEFAULT_PROFILES, ProfileSet

__all__ = [
    "BudgetDecision",
    "ContentClass",
    "ImageStats",
    "classify_content",
    "decide_budget",
    "image_stats",
    "prompt_text_cue",
]

ContentClass = Literal["text", "plain", "neutral"]

# Statistics are taken on a grayscale thumbnail no larger than this (px, long side):
# enough to see text strokes and edges, cheap (<1 ms) even for a 12 MP photo.
THUMBNAIL_PX = 128
# A pixel is an edge when its np.gradient magnitude (0..1 intensity per pixel,
# central difference) exceeds this: ~25 grey levels across two pixels. Sensor noise
# and smooth shading stay below it; printed strokes and object outlines exceed it.
EDGE_MAGNITUDE = 0.1
# Text-heavy needs many edge pixels: printed text on the thumbnail gives 0.1-0.5
# (small fonts blur out, hence the low bar); smooth shading gives ~0 ...
TEXT_MIN_EDGE_DENSITY = 0.08
# ... on a dominant background tone: paper, a display or a label fills >= 20% of the
# pixels with one grey level (one of HISTOGRAM_BINS bins), while a busy photo spreads
# over many (its largest bin holds <10%) ...
TEXT_MIN_BACKGROUND_SHARE = 0.2
# ... or, failing that, a nearly two-tone image (grey-histogram entropy in bits, max
# log2(HISTOGRAM_BINS) = 5): large ink-on-paper text; photos sit at 4-5 bits.
TEXT_MAX_ENTROPY_BITS = 3.0
HISTOGRAM_BINS = 32
# Plain scene: fewer edge pixels than this (sky, walls, smooth gradients) -> few
# tokens carry all there is to see.
PLAIN_MAX_EDGE_DENSITY = 0.03
# Budget multipliers for content-aware profiles (text needs resolution to be legible;
# plain scenes lose nothing at half the tokens). Results stay within model limits and
# never fall below the profile's min_image_tokens.
TEXT_BUDGET_SCALE = 2.0
PLAIN_BUDGET_SCALE = 0.5
# Prompt words that mean "read something in the image" (OCR-ish asks): whole-word,
# case-insensitive. A cue makes the image count as text-heavy whatever it looks like
# (a gauge or a serial plate may not look like a document).
TEXT_PROMPT_CUES: tuple[str, ...] = (
    r"read(?:s|ing)?",
    r"text",
    r"what does (?:it|this|that) say",
    r"labels?",
    r"gauges?",
    r"numbers?",
    r"digits?",
    r"serial",
    r"ocr",
    r"transcribe",
    r"written",
    r"writing",
    r"barcode",
    r"meter",
    r"display(?:ed)?",
    r"(?:fine|small) print",
    r"spell(?:ed|ing)?",
    r"letters?",
)
_CUE_RE = re.compile(r"\b(?:" + "|".join(TEXT_PROMPT_CUES) + r")\b", re.IGNORECASE)


@dataclass(frozen=True)
class ImageStats:
    """Cheap statistics of one image, kept for telemetry."""

    edge_density: float  # share of thumbnail pixels with gradient > EDGE_MAGNITUDE
    entropy_bits: float  # grey-histogram entropy, HISTOGRAM_BINS bins
    background_share: float  # share of pixels in the most common grey bin
    thumb_width: int
    thumb_height: int
    ms: float


@dataclass(frozen=True)
class BudgetDecision:
    """Per-image token budget and why; ``attributes()`` feeds the span/middleware dict."""

    tokens: int
    source: str  # request | detail | profile | ttft_budget | model
    reason: str
    profile: str | None = None
    content: ContentClass | None = None
    prompt_cue: str | None = None
    stats: ImageStats | None = None

    def attributes(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "budget_tokens": self.tokens,
            "budget_source": self.source,
            "budget_reason": self.reason,
        }
        if self.profile is not None:
            out["profile"] = self.profile
        if self.content is not None:
            out["content"] = self.content
        if self.prompt_cue is not None:
            out["prompt_cue"] = self.prompt_cue
        if self.stats is not None:
            out.update({f"stats.{k}": v for k, v in asdict(self.stats).items()})
        return out


def image_stats(img: Image.Image) -> ImageStats:
    """Edge density and grey-histogram shape of a <= THUMBNAIL_PX grayscale thumbnail."""
    t0 = time.perf_counter()
    src = img if img.mode in ("L", "LA", "RGB", "RGBA") else img.convert("RGB")
    factor = max(1, max(src.size) // (2 * THUMBNAIL_PX))
    if factor > 1:  # cheap box reduction first, so a 12 MP photo is not converted whole
        src = src.reduce(factor)
    thumb = src.convert("L")
    thumb.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX), Image.Resampling.BILINEAR, reducing_gap=2.0)
    a = np.asarray(thumb, dtype=np.float32) / 255.0
    if min(a.shape) >= 2:
        gy, gx = np.gradient(a)
        density = float(np.mean(np.hypot(gx, gy) > EDGE_MAGNITUDE))
    else:
        density = 0.0
    hist = np.bincount((a.ravel() * (HISTOGRAM_BINS - 1) + 0.5).astype(np.int64), minlength=HISTOGRAM_BINS)
    p = hist[hist > 0] / a.size
    entropy = float(-(p * np.log2(p)).sum())
    return ImageStats(density, entropy, float(p.max()), thumb.width, thumb.height, (time.perf_counter() - t0) * 1000.0)


def prompt_text_cue(prompt: str | None) -> str | None:
    """The first OCR-ish cue in the prompt (lower-cased), or ``None``."""
    if not prompt:
        return None
    m = _CUE_RE.search(prompt)
    return m.group(0).lower() if m else None


def classify_content(stats: ImageStats | None, prompt_cue: str | None = None) -> ContentClass:
    """``text`` (needs more tokens), ``plain`` (fewer suffice) or ``neutral``."""
    if prompt_cue is not None:
        return "text"
    if stats is None:
        return "neutral"
    if stats.edge_density >= TEXT_MIN_EDGE_DENSITY and (
        stats.background_share >= TEXT_MIN_BACKGROUND_SHARE or stats.entropy_bits <= TEXT_MAX_ENTROPY_BITS
    ):
        return "text"
    if stats.edge_density < PLAIN_MAX_EDGE_DENSITY:
        return "plain"
    return "neutral"


def decide_budget(
    *,
    model_max_tokens: int,
    model_min_tokens: int = 1,
    extension: EdgeVLMExtension | None = None,
    detail: str | None = None,
    profiles: ProfileSet = DEFAULT_PROFILES,
    server_profile: ProfileName | None = None,
    ttft_tokens: int | None = None,
    image: Image.Image | None = None,
    prompt: str | None = None,
    clip_label: tuple[str, ContentClass] | None = None,
) -> BudgetDecision:
    """Token budget for one image (see the module docstring for the precedence).

    ``model_max_tokens`` is what the projector can emit at most (for a fixed projector,
    its fixed count: the budget then only informs pruning). ``ttft_tokens`` is this
    image's share from ``budget.plan_for_budget``. ``image``, ``prompt`` and
    ``clip_label`` (CLIP's zero-shot label and its class, ``policy.routing``) are only
    looked at by content-aware profiles; the label replaces the image statistics.
    """
    if model_max_tokens < 1:
        raise ValueError("model_max_tokens must be >= 1")
    lo = max(1, min(model_min_tokens, model_max_tokens))

    def clamp(t: float) -> int:
        return int(max(lo, min(model_max_tokens, int(t))))

    ext = extension or EdgeVLMExtension()
    if ext.max_image_tokens is not None:
        t = clamp(ext.max_image_tokens)
        return BudgetDecision(t, "request", f"edgevlm.max_image_tokens={ext.max_image_tokens}")
    if detail == "low":
        t = clamp(profiles.detail_low_tokens)
        return BudgetDecision(t, "detail", f"detail=low -> {profiles.detail_low_tokens} tokens")
    if detail == "high":
        return BudgetDecision(model_max_tokens, "detail", "detail=high -> model max")
    if detail not in (None, "auto"):
        raise ValueError(f"unknown detail {detail!r}; expected low, high or auto")

    name = ext.profile or server_profile or profiles.default
    prof = profiles.get(name)
    base = prof.image_tokens(model_max_tokens)
    tokens, reason = base, f"profile {name}: {base} tokens"
    content: ContentClass | None = None
    cue: str | None = None
    stats: ImageStats | None = None
    if prof.content_aware:
        cue = prompt_text_cue(prompt)
        if clip_label is not None and cue is None:
            content = clip_label[1]
        else:
            stats = image_stats(image) if image is not None and clip_label is None else None
            content = classify_content(stats, cue)
        scale = {"text": TEXT_BUDGET_SCALE, "plain": PLAIN_BUDGET_SCALE, "neutral": 1.0}[content]
        if scale != 1.0:
            floor = min(prof.min_image_tokens, model_max_tokens)
            tokens = max(floor, min(model_max_tokens, int(round(base * scale))))
            why = (f"prompt cue {cue!r}" if cue else
                   f"CLIP label {clip_label[0]!r}" if clip_label is not None else "image statistics")
            reason += f"; {content} content ({why}) x{scale:g} -> {tokens}"
    tokens = clamp(tokens)
    source = "profile"
    if ttft_tokens is not None and ttft_tokens < tokens:
        tokens = clamp(ttft_tokens)
        source = "ttft_budget"
        reason += f"; lowered to {tokens} by the TTFT budget"
    return BudgetDecision(tokens, source, reason, name, content, cue, stats)
