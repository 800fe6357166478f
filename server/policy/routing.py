"""Image-type routing for ``auto`` detail: zero-shot CLIP labels -> content class.

The content-aware profiles scale an image's token budget by its content class
(``policy.resolution.classify_content``). Cheap image statistics guess that class from
edges and grey levels; a CLIP model can name what the image *is* (a document, a
screen, a gauge, a scene) and so replaces the statistics when it is configured. The
prompt cue still wins: a question that asks to read something makes the image text.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from server.policy.resolution import ContentClass

__all__ = ["CONTENT_LABELS", "route_content"]

# Zero-shot labels (prompted as "a photo of {label}.") and the budget class each implies.
# Text-like labels need resolution to stay legible; a plain surface loses nothing at
# half the tokens; scenes and objects keep the profile's budget.
CONTENT_LABELS: dict[str, ContentClass] = {
    "a document or a page of text": "text",
    "a computer screen or a display": "text",
    "a label, a sign or a gauge": "text",
    "a photo of a scene": "neutral",
    "a photo of an object": "neutral",
    "a plain empty surface": "plain",
}


def route_content(probs: np.ndarray) -> tuple[str, ContentClass, dict[str, Any]]:
    """The best label, its content class and span attributes, from ``probs`` over ``CONTENT_LABELS``."""
    p = np.asarray(probs, dtype=np.float64)
    labels = list(CONTENT_LABELS)
    if p.shape != (len(labels),):
        raise ValueError(f"expected {len(labels)} probabilities, got shape {p.shape}")
    best = int(np.argmax(p))
    label = labels[best]
    return label, CONTENT_LABELS[label], {"clip_label": label, "clip_label_p": round(float(p[best]), 4)}
