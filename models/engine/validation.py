"""What a request must satisfy before any engine queues it.

Checked once, at submit, by the in-process engine and by a runner's client alike, so a
request the model cannot serve is refused at once with the same error either way.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from models.engine.types import (EngineError, GenerationRequest, ImageSegment, PromptTooLong, QueueFull,
                                 segment_tokens)


@dataclass(frozen=True)
class Limits:
    """The facts of a loaded model that decide what it can serve."""

    n_ctx: int
    n_embd: int
    n_batch: int
    mrope: bool


def check_request(req: GenerationRequest, limits: Limits) -> int:
    """Raise the request's error, or return its prompt length."""
    n_prompt = segment_tokens(req.segments)
    if n_prompt == 0:
        raise EngineError("the prompt is empty", code="empty_prompt", status=400)
    if n_prompt >= limits.n_ctx:
        raise PromptTooLong(
            f"this model's context is {limits.n_ctx} tokens, but the prompt has "
            f"{n_prompt} tokens; shorten the messages or raise --ctx-size"
        )
    for seg in req.segments:
        if isinstance(seg, ImageSegment):
            _check_image(seg, limits)
    return n_prompt


def check_queue(model_id: str, queued: int, max_queue: int) -> None:
    """Refuse a request when ``queued`` requests already wait beyond the free slots.

    Only those are the real queue (they may also wait for KV room); running requests
    and ones about to take a free slot do not count.
    """
    if queued >= max_queue:
        raise QueueFull(f"the queue for model {model_id} is full ({max_queue} waiting)")


def _check_image(seg: ImageSegment, limits: Limits) -> None:
    if seg.embeddings.ndim != 2 or seg.embeddings.shape[1] != limits.n_embd:
        raise EngineError("image embeddings do not match the model width",
                          code="bad_embeddings", status=400)
    if limits.mrope and seg.positions is not None:
        p = seg.positions
        if p.ndim != 2 or p.shape != (4, seg.n_tokens) or not np.issubdtype(p.dtype, np.integer):
            raise EngineError("image positions must be an int (4, n_tokens) array",
                              code="bad_positions", status=400)
        if p.size and (int(p.min()) < 0 or int(p[:3].max()) >= seg.mrope_advance):
            raise EngineError("image positions fall outside the image's n_pos",
                              code="bad_positions", status=400)
    if limits.mrope and seg.mrope_advance < 1:
        raise EngineError("an image must advance at least one position",
                          code="bad_positions", status=400)
    if seg.non_causal and seg.n_tokens > limits.n_batch:
        raise EngineError(
            f"an image of {seg.n_tokens} tokens needs a batch of at least that size "
            f"(batch is {limits.n_batch})", code="image_too_large", status=400)
