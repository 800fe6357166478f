"""Warm-up at load time: one real request that seeds the TTFT cost model.

Without it the first requests' TTFT predictions come from generic defaults, and the
very first encode after loading (cold caches, first-touch of weights) is several
times slower than later ones, which would skew an online estimate for a while.
A warm-up that fails raises ``WarmupError``: its zero timings must never become rates.
"""

from __future__ import annotations

import logging
import threading

import numpy as np
from PIL import Image

from models.engine import Event, Failed, Finished, GenerationRequest, Segment
from models.registry import LoadedModel
from models.sampling import SamplingParams
from models.vision import ImageChunk
from server.images import segments_from_chunks
from server.policy.budget import CostModel
from telemetry.record import RequestRecord

__all__ = ["WarmupError", "measure_cost_model", "run_warmup_request"]

log = logging.getLogger("edgevlm.warmup")

WARMUP_IMAGE_PX = 256
WARMUP_TIMEOUT_S = 120.0


class WarmupError(RuntimeError):
    """The warm-up request failed or measured nothing; the cost model keeps its defaults."""


def _synthetic_image(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:WARMUP_IMAGE_PX, 0:WARMUP_IMAGE_PX]
    base = np.stack([xx, yy, (xx + yy) // 2], axis=-1).astype(np.float32)
    noise = rng.normal(0, 12, base.shape)
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8), "RGB")


def run_warmup_request(model: LoadedModel, segments: list[Segment],
                       sampling: SamplingParams | None = None) -> RequestRecord:
    """Run one request to its end on the model's engine and return its measured record.

    Raises ``WarmupError`` when the engine reports ``Failed`` (or times out, or prefills
    nothing): a failed request's zero timings would otherwise seed 0 ms/token.
    """
    engine = model.engine
    record = RequestRecord(operation="chat", model=engine.info)
    done = threading.Event()
    ended: list[Event] = []

    def sink(event: Event) -> None:
        if isinstance(event, (Finished, Failed)):
            ended.append(event)
            done.set()

    engine.submit(GenerationRequest(segments, sampling or SamplingParams(temperature=0), 1),
                  sink, max_queue=1 << 30)
    if not done.wait(WARMUP_TIMEOUT_S):
        raise WarmupError(f"warm-up request did not finish within {WARMUP_TIMEOUT_S:g} s")
    ended[0].figures.fill(record)  # on this thread, from the final event
    if isinstance(ended[0], Failed):
        raise WarmupError(f"warm-up request failed: {ended[0].error}") from ended[0].error
    if record.prefilled_tokens <= 0 or record.prefill_ms <= 0:
        raise WarmupError("warm-up request measured no prefill")
    return record


def measure_cost_model(model: LoadedModel) -> CostModel:
    """Encode (twice: the first is cold) and prefill once; rates become the start-up model."""
    engine = model.engine
    if model.vision is None:
        text = engine.template.render([{"role": "user", "content": "Warm-up."}])
        rec = run_warmup_request(model, [engine.tokenize(text)])
        return CostModel.from_warmup(0.0, 0, rec.prefill_ms, rec.prefilled_tokens)
    vision = model.vision
    text = engine.template.render([{"role": "user", "content": vision.media_marker + "\nDescribe."}])
    vision.tokenize(text, [_synthetic_image(1)])  # cold run, not measured
    chunks = vision.tokenize(text, [_synthetic_image(2)])
    images = [c for c in chunks if isinstance(c, ImageChunk)]
    encode_ms = sum(c.encode_ms for c in images)
    image_tokens = sum(c.n_tokens for c in images)
    rec = run_warmup_request(model, segments_from_chunks(chunks, engine))
    cm = CostModel.from_warmup(encode_ms, image_tokens, rec.prefill_ms, rec.prefilled_tokens)
    log.info("warm-up %s: encode %.2f ms/token, prefill %.3f ms/token", model.spec.id,
             encode_ms / max(1, image_tokens), rec.prefill_ms / max(1, rec.prefilled_tokens))
    return cm
